"""Accuracy of a model during training, and a saved adapter loaded back and evaluated (``peft-mimi eval``)."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader

from .backbones import load_backbone
from .checkpoint import ADAPTER_DIR, read_json
from .data import ImageTransform, balanced_subset, dataset_labels, load_image_dataset, make_collate_fn
from .serving import RUN_FILE

__all__ = ["evaluate", "evaluate_adapter", "load_adapter"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, **forward_kwargs: Any) -> float:
    """Top-1 accuracy of ``model`` on a prepared ``loader`` of ``{"pixel_values", "labels"}`` batches, over all
    processes (the same value on each). Leaves the model in eval mode."""
    model.eval()
    correct = total = 0
    for batch in loader:
        predictions = model(pixel_values=batch["pixel_values"], **forward_kwargs).logits.argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += int((predictions == labels).sum())
        total += labels.numel()
    return correct / total if total else float("nan")


def evaluate_adapter(
    adapter_dir: str | os.PathLike,
    data: str,
    *,
    model: str | None = None,
    batch_size: int = 64,
    max_eval_samples: int | None = None,
) -> float:
    """Test accuracy of a saved MiMi adapter on dataset ``data``. The backbone is the adapter config's
    ``base_model_name_or_path`` unless ``model`` overrides it; images are preprocessed as in training."""
    accelerator = Accelerator()
    dataset = load_image_dataset(data)
    peft_model, processor = load_adapter(adapter_dir, model=model, num_labels=len(dataset_labels(dataset)[0]))
    test = balanced_subset(dataset["test"], max_eval_samples, seed=0)
    transform = ImageTransform.from_processor(processor, train=False)
    num_labels = getattr(getattr(peft_model, "config", None), "num_labels", None)
    loader = DataLoader(test, batch_size=batch_size, collate_fn=make_collate_fn(transform, num_labels))
    prepared, loader = accelerator.prepare(peft_model, loader)
    return evaluate(prepared, loader, accelerator, **forward_kwargs(peft_model, transform))


def load_adapter(
    adapter_dir: str | os.PathLike, *, model: str | None = None, num_labels: int | None = None
) -> tuple[PeftModel, Any]:
    """A saved MiMi adapter on its backbone, in eval mode, and the image processor to feed it: the one saved
    with the adapter, else the backbone's. ``model`` overrides the backbone named in the adapter config."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a saved adapter (no adapter_config.json). Pass the "
                                f"'{ADAPTER_DIR}' directory that train() writes, e.g. OUTPUT_DIR/{ADAPTER_DIR}.")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "MIMI":
        raise ValueError(f"{adapter_dir} holds a {config.get('peft_type')} adapter, not a MiMi adapter.")
    base_name = model or config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{config_file} names no base model (base_model_name_or_path); pass the backbone with "
                         "model=... (--model).")
    run = read_json(adapter_dir / RUN_FILE) or {}
    labels = run.get("labels")
    if labels and num_labels is not None and len(labels) != num_labels:
        raise ValueError(f"The adapter's head classifies {len(labels)} classes but the dataset has {num_labels}: "
                         "evaluate it on the dataset it was trained on.")
    label_kwargs = (dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={name: i for i, name in enumerate(labels)}) if labels
                    else dict(num_labels=num_labels) if num_labels else {})
    base, processor = load_backbone(base_name, **label_kwargs)
    if (adapter_dir / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(adapter_dir)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    return peft_model.eval(), processor


def forward_kwargs(model: nn.Module, transform: ImageTransform) -> dict[str, Any]:
    """``{"interpolate_pos_encoding": True}`` when the images differ in size from what the model was pretrained
    on and its forward can interpolate position embeddings (ViT, DeiT, Swin); DINOv2 always interpolates."""
    pretrained = getattr(getattr(model, "config", None), "image_size", None)
    pretrained = (pretrained, pretrained) if isinstance(pretrained, int) else tuple(pretrained or ())
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    accepts = "interpolate_pos_encoding" in inspect.signature(base.forward).parameters
    return {"interpolate_pos_encoding": True} if accepts and pretrained and pretrained != transform.image_size else {}
