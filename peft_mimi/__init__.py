"""MiMi ("Mini but Mighty") adapters for Vision Transformers, as a Hugging Face PEFT method."""

__version__ = "0.1.0"
