"""Many tasks, one backbone: load per-task MiMi adapters onto one base model and classify mixed-task batches.

    model = load_task_adapters(backbone, {"digits": "runs/digits/adapter", "faces": "runs/faces/adapter"})
    labels = read_task_labels({"digits": "runs/digits/adapter", "faces": "runs/faces/adapter"})
    predictions = classify_mixed(model, pixel_values, ["digits", "faces", "digits"], labels=labels)
    predictions[1].label, predictions[1].score, predictions[1].logits   # 'face', 0.97, tensor of 2 logits

The backbone is held once; each task adds its adapters (only live neurons) and its own classification head,
whatever its number of classes. ``classify_mixed`` runs the whole batch in one forward pass, every image through
its own task's adapters and head (``model(pixel_values, adapter_names=...)``, see `MiMiModel`), and cuts each
image's logits to its own head's classes. ``set_adapter(task)`` still switches the whole model to one task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .layer import BASE_ADAPTER_NAME

__all__ = [
    "BASE_ADAPTER_NAME",
    "RUN_FILE",
    "Prediction",
    "classify_mixed",
    "head_sizes",
    "load_task_adapters",
    "parameter_bytes",
    "read_task_labels",
]

# The run summary `peft_mimi.train` writes next to the adapter; its "labels" list names the head's classes.
RUN_FILE = "mimi_run.json"  # written by peft_mimi.train next to every adapter it saves


@dataclass(frozen=True)
class Prediction:
    """One image's answer: its task, the predicted class (index and name), the softmax probability of that
    class, and the image's logits over its own task's classes only, shape ``(num_classes,)``."""

    task: str
    class_id: int
    label: str
    score: float
    logits: torch.Tensor


def load_task_adapters(
    base_model: nn.Module, adapter_dirs: Mapping[str, str | os.PathLike], *, low_cpu_mem_usage: bool = False
) -> PeftModel:
    """Load one saved MiMi adapter per task onto ``base_model`` (modified in place), each under its task's name,
    and return the `PeftModel` in eval mode with the first task active.

    Each adapter keeps its own widths and its own head from ``modules_to_save``, built at the number of classes it
    was saved with (the base model's head size does not matter; its ``config.num_labels`` keeps describing the
    base head, so compute a loss from the logits rather than through ``labels=``). Memory grows by the adapters'
    tensors only. Raises ``ValueError``, before touching ``base_model``, for an empty mapping, a reserved task
    name or a directory that holds no MiMi adapter.
    """
    if not adapter_dirs:
        raise ValueError("adapter_dirs is empty: give {task name: saved adapter directory}.")
    for task, path in adapter_dirs.items():
        _check_adapter_dir(task, Path(path))
    model = None
    for task, path in adapter_dirs.items():
        if model is None:
            model = PeftModel.from_pretrained(base_model, path, adapter_name=task, low_cpu_mem_usage=low_cpu_mem_usage)
        else:
            model.load_adapter(path, adapter_name=task, low_cpu_mem_usage=low_cpu_mem_usage)
    model.set_adapter(next(iter(adapter_dirs)))
    return model.eval()


def read_task_labels(adapter_dirs: Mapping[str, str | os.PathLike]) -> dict[str, list[str]]:
    """``{task: class names}`` from each adapter directory's ``mimi_run.json`` (``peft_mimi.train`` writes it);
    tasks whose directory has none are left out (their predictions are named by class index)."""
    labels = {}
    for task, path in adapter_dirs.items():
        run_file = Path(path) / RUN_FILE
        if run_file.is_file():
            names = json.loads(run_file.read_text()).get("labels")
            if names:
                labels[task] = [str(name) for name in names]
    return labels


def head_sizes(model: PeftModel) -> dict[str, int]:
    """``{adapter name: number of classes of its head}``, plus ``"__base__"`` for the base model's head. The head
    is the last Linear in ``modules_to_save`` (the classifier); an adapter without its own copy uses the base
    head. Empty when the model has no such head."""
    heads = [
        module for module in model.modules()
        if isinstance(module, ModulesToSaveWrapper) and isinstance(module.original_module, nn.Linear)
    ]
    if not heads:
        return {}
    head = heads[-1]
    sizes = {BASE_ADAPTER_NAME: head.original_module.out_features}
    for name in model.peft_config:
        copy = head.modules_to_save[name] if name in head.modules_to_save else head.original_module
        sizes[name] = copy.out_features
    return sizes


@torch.no_grad()
def classify_mixed(
    model: PeftModel,
    pixel_values: torch.Tensor,
    adapter_names: Sequence[str],
    *,
    labels: Mapping[str, Sequence[str]] | None = None,
) -> list[Prediction]:
    """Classify a batch whose images belong to different tasks, in one forward pass: image ``i`` goes through the
    adapters and the head of task ``adapter_names[i]`` (``"__base__"``: the base model). ``pixel_values`` is
    ``(N, 3, H, W)``; ``labels`` gives class names per task (e.g. from :func:`read_task_labels`). Returns one
    :class:`Prediction` per image, its logits cut to its own head's classes. The model must be in eval mode;
    a wrong number of names or an unknown task raises ``ValueError``.
    """
    adapter_names = list(adapter_names)
    logits = model(pixel_values=pixel_values, adapter_names=adapter_names).logits
    sizes = head_sizes(model)
    # columns beyond an image's own head are -inf: they get probability 0 and never win the argmax
    scores, class_ids = logits.float().softmax(-1).max(-1)
    predictions = []
    for i, task in enumerate(adapter_names):
        class_id = int(class_ids[i])
        names = (labels or {}).get(task)
        predictions.append(Prediction(
            task=task,
            class_id=class_id,
            label=str(names[class_id]) if names is not None and class_id < len(names) else str(class_id),
            score=float(scores[i]),
            logits=logits[i, : sizes.get(task, logits.shape[-1])],
        ))
    return predictions


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each tensor counted once): what a model, or one more
    task's adapter, costs in memory apart from activations."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _check_adapter_dir(task: str, path: Path) -> None:
    if task == BASE_ADAPTER_NAME:
        raise ValueError(f"{BASE_ADAPTER_NAME!r} is reserved for the base model without adapters; rename the task.")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"Task {task!r}: {path} is not a saved adapter (no adapter_config.json). Pass the directory "
                         "that save_pretrained() (or peft_mimi.train's 'adapter') wrote.")
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if peft_type != "MIMI":
        raise ValueError(f"Task {task!r}: {path} holds a {peft_type} adapter, not a MiMi adapter; one model can only "
                         "serve adapters of one PEFT method.")
