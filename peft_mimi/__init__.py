"""MiMi ("Mini but Mighty") adapters for Vision Transformers, as a Hugging Face PEFT method.

``import peft_mimi`` registers the PEFT method "MIMI" (``PeftType.MIMI``); then ``get_peft_model(model,
MiMiConfig(...))`` and ``PeftModel.from_pretrained(model, path)`` work as for any PEFT method.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ._peft_type import PeftType
from .callback import MiMiPruningCallback
from .config import TARGET_MODULES_BY_MODEL_TYPE, MiMiConfig
from .files import save_adapter
from .layer import Linear, MiMiLayer
from .model import MiMiModel

__version__ = "0.1.0"


def _register() -> None:
    # importlib.reload(peft_mimi) re-runs this: replace the old registration instead of failing
    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        mapping.pop(PeftType.MIMI, None)
    register_peft_method(name="mimi", config_cls=MiMiConfig, model_cls=MiMiModel, prefix=MiMiModel.prefix)


_register()

__all__ = [
    "TARGET_MODULES_BY_MODEL_TYPE",
    "Linear",
    "MiMiConfig",
    "MiMiLayer",
    "MiMiModel",
    "MiMiPruningCallback",
    "PeftType",
    "__version__",
    "save_adapter",
]
