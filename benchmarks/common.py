"""What every benchmark shares: backbones, cached task tensors, the methods compared, ONE training loop, counting.

Fairness rules (so that methods differ only in what they train):
- every method sees the same split, the same pre-transformed tensors (eval transform, no augmentation), the same
  batch order for a given seed, the same number of epochs, AdamW with `peft_mimi.train.build_optimizer`'s
  groups and a cosine schedule with warm-up;
- MiMi's schedule (METHOD.md §4) is the same loop cut into segments of ``epochs_per_round`` epochs, with
  ``tuner.prune_round(compact=True)`` between segments (the optimizer and its cosine schedule are rebuilt after
  each pruning, as in the paper's code) and a segment of training after the last pruning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_MODULES = ["attention.o_proj", "mlp.fc2"]  # the MiMi defaults (transformers 5), shared by LoRA and adapters
TINY = "tiny-vit"  # fmnist-vit's exact architecture with random weights: for smoke runs, and for cost measurements
# (FLOPs, latency, bytes) that do not depend on weight values when the pretrained weights are not there
SMOKE = "smoke-vit"  # a much smaller random ViT (width 32, depth 2, patch 8) for the --smoke runs CI makes


# --------------------------------------------------------------------------------------------- backbones
def load_model(name: str, num_labels: int, image_size: int | None = None) -> tuple[nn.Module, Any]:
    """``(classifier with a fresh head of num_labels classes, image processor)``. ``tiny-vit``: random weights."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if name in (TINY, SMOKE):
        torch.manual_seed(0)
        shape = dict(patch_size=4, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128)
        if name == SMOKE:
            shape = dict(patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        config = ViTConfig(image_size=32, num_labels=num_labels, **shape)
        processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return ViTForImageClassification(config), processor
    from peft_mimi.backbones import load_backbone

    labels = {i: str(i) for i in range(num_labels)}
    model, processor = load_backbone(name, id2label=labels, label2id={v: k for k, v in labels.items()})
    if image_size is not None:  # run a ViT-like backbone at a lower resolution (position embeddings interpolate)
        processor.size = {"height": image_size, "width": image_size}
        processor.crop_size = {"height": image_size, "width": image_size}
        processor.do_center_crop = False
    return model, processor


def backbone_params(model: nn.Module) -> int:
    """Parameters of the backbone without its classification head."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))


def image_size_of(processor: Any) -> int:
    from peft_mimi.data import ImageTransform

    return ImageTransform.from_processor(processor, train=False).image_size[0]


# ------------------------------------------------------------------------------------------------- data
_TENSORS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def task_tensors(dataset: str, processor: Any, max_train: int | None = None, max_test: int | None = None,
                 cache_dir: Path | None = Path("/tmp/peft_mimi_bench_cache")) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test, num_labels)``: the built-in dataset's split through the eval transform
    of ``processor``, once per (dataset, transform, sizes); kept in memory and in ``cache_dir``. ``max_train`` /
    ``max_test`` keep a class-balanced subset (:func:`balanced_subset`): the built-in splits keep their source's
    order, which is sorted by class for mnist, textures and faces, so a plain prefix would drop whole classes."""
    from peft_mimi.data import ImageTransform, dataset_labels, load_builtin_dataset

    transform = ImageTransform.from_processor(processor, train=False)
    key = (dataset, repr(transform), max_train, max_test)
    if key in _TENSORS:
        return _TENSORS[key]
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(repr(transform).encode()).hexdigest()[:12]  # str hash() varies per process
        tag = f"{dataset}-{digest}-balanced-{max_train}-{max_test}.pt"
        path = cache_dir / tag
        if path.is_file():
            _TENSORS[key] = tuple(torch.load(path, weights_only=True))
            return _TENSORS[key]
    data = load_builtin_dataset(dataset)
    num_labels = len(dataset_labels(data["train"])[0])
    out = []
    for split, limit in (("train", max_train), ("test", max_test)):
        part = data[split]
        if limit is not None and limit < len(part):
            part = part.select(balanced_subset(part["label"], limit))
        images = [part[i]["image"] for i in range(len(part))]
        x = torch.cat([transform(images[i : i + 256]) for i in range(0, len(images), 256)])
        out += [x, torch.tensor(part["label"], dtype=torch.long)]
    result = (*out, num_labels)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, path)
    _TENSORS[key] = result
    return result


def balanced_subset(labels: list[int], limit: int) -> list[int]:
    """``limit`` indices taking the classes in turn (the 1st example of every class, then the 2nd, ...), each class
    in its original order; sorted, so the subset keeps the split's order."""
    seen: dict[int, int] = {}
    rank = []
    for label in labels:
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    order = sorted(range(len(labels)), key=lambda i: (rank[i], labels[i]))
    return sorted(order[:limit])


# ---------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """A fine-tuning method at a budget: ``kind`` in mimi | adapter | widths | lora | adalora | linear | bitfit |
    full.
    ``lora_rank`` is LoRA's rank, and AdaLoRA's target average rank (it starts at 4x that rank and prunes)."""

    kind: str
    label: str
    init_compression: float = 4.0
    target_compression: float | None = None
    lora_rank: int = 0
    mimi_options: dict = field(default_factory=dict)  # selection / score / prune_ratio overrides (ablation)
    widths: dict[str, int] | None = None  # kind "widths": fixed adapters of these per-layer widths, never pruned
    final_epochs: int | None = None  # MiMi: epochs after the last cut (default: epochs_per_round)


def build(method: Method, model: nn.Module, seed: int, total_steps: int | None = None) -> nn.Module:
    """Wrap (or unfreeze parts of) ``model`` for ``method``; returns the module to train. AdaLoRA needs the
    ``total_steps`` of its training."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from peft_mimi import MiMiConfig

    torch.manual_seed(seed)
    if method.kind in ("mimi", "adapter"):
        config = MiMiConfig(init_compression=method.init_compression,
                            target_compression=method.target_compression or method.init_compression,
                            modules_to_save=["classifier"], seed=seed, **method.mimi_options)
        return get_peft_model(model, config)
    if method.kind == "widths":  # MiMi's final allocation trained from scratch: a budget it already meets
        from peft_mimi.pruning import adapter_params

        dims = {n: m.out_features for n, m in model.named_modules() if n in method.widths}
        config = MiMiConfig(adapter_widths=dict(method.widths), modules_to_save=["classifier"], seed=seed,
                            target_params=sum(adapter_params(dims[n], w) for n, w in method.widths.items()))
        return get_peft_model(model, config)
    if method.kind == "lora":
        config = LoraConfig(r=method.lora_rank, lora_alpha=method.lora_rank, target_modules=TARGET_MODULES,
                            modules_to_save=["classifier"])
        return get_peft_model(model, config)
    if method.kind == "adalora":  # its three phases over total_steps: 10 % warm-up at 4x the target rank, budget
        # shrinking, the last 20 % at the final ranks
        init_r = 4 * method.lora_rank
        config = AdaLoraConfig(init_r=init_r, target_r=method.lora_rank, lora_alpha=init_r,
                               target_modules=TARGET_MODULES, modules_to_save=["classifier"], total_step=total_steps,
                               tinit=max(1, total_steps // 10), tfinal=max(1, total_steps // 5),
                               deltaT=max(1, total_steps // 50))
        return get_peft_model(model, config)
    for name, p in model.named_parameters():
        head = name.startswith("classifier")
        p.requires_grad_(method.kind == "full" or head or (method.kind == "bitfit" and name.endswith(".bias")))
    return model


def adalora_live_params(model: nn.Module) -> int:
    """Parameters of AdaLoRA's surviving ranks: each rank kept (``lora_E`` non-zero) holds a row of A, a column of
    B and its singular value, ``in + out + 1`` numbers."""
    total = 0
    for module in model.modules():
        if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            kept = int((module.lora_E["default"].detach() != 0).sum())
            total += kept * (module.in_features + module.out_features + 1)
    return total


def method_params(model: nn.Module) -> int:
    """Parameters the method adds or changes, the classification head excluded (the same for every method): live
    adapter neurons for MiMi, LoRA matrices, biases for BitFit, the backbone for full fine-tuning, 0 for a probe."""
    from peft_mimi import MiMiModel

    base = getattr(model, "base_model", None)
    if isinstance(base, MiMiModel):
        return base.live_params()
    if type(base).__name__ == "AdaLoraModel":
        return adalora_live_params(model)
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and "classifier" not in n)


def head_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)


def lora_rank_for_budget(model: nn.Module, budget: int) -> int:
    """The LoRA rank whose parameter count on TARGET_MODULES is closest to ``budget`` (at least 1)."""
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and any(n.endswith(t) for t in TARGET_MODULES))
    return max(1, round(budget / per_rank))


def adapter_budget(model: nn.Module, compression: float) -> int:
    """``B(σ)`` on the MiMi target modules of ``model``."""
    from peft_mimi.pruning import budget_for_compression

    dims = [m.out_features for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n.endswith(t) for t in TARGET_MODULES)]
    return budget_for_compression(dims, compression)


# ------------------------------------------------------------------------------------------ training loop
@dataclass
class RunResult:
    accuracy: float
    method_params: int
    head_params: int
    epochs: int
    wall_s: float
    segments: list[dict]
    widths: dict[str, int] | None = None
    initial_widths: dict[str, int] | None = None


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(pixel_values=x[i : i + batch_size]).logits.argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)


def train_segment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                  generator: torch.Generator, weight_decay: float = 0.05, warmup_ratio: float = 0.1,
                  clip: float = 5.0, after_step: Callable[[int], None] | None = None) -> dict:
    """``epochs`` epochs of AdamW + cosine (fresh optimizer) over the trainable parameters. Returns timings.

    The loss is the model's own (``labels=`` passed), so a method that adds a regulariser to it (AdaLoRA's
    orthogonality term) gets it; ``after_step(step)`` runs after each optimizer step, before the next zero_grad."""
    from peft_mimi.train import build_optimizer

    steps_per_epoch = math.ceil(len(x) / batch_size)
    optimizer, scheduler = build_optimizer(model, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                                           num_training_steps=epochs * steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    epoch_s, losses = [], []
    step = 0
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(step)
            step += 1
            total += loss.item() * len(idx)
        epoch_s.append(time.perf_counter() - start)
        losses.append(total / len(x))
    return {"epochs": epochs, "epoch_s": epoch_s, "loss": losses}


def run(method: Method, backbone: str, data: tuple, *, seed: int, epochs_per_round: int, total_epochs: int | None,
        lr: float, batch_size: int, image_size: int | None = None, eval_each_segment: bool = False) -> RunResult:
    """Train ``method`` on ``data`` (from :func:`task_tensors`) and return test accuracy, counts and timings.

    MiMi trains ``(R+1)·epochs_per_round`` epochs (R = planned rounds); every other method trains ``total_epochs``
    (pass MiMi's total for matched-epoch comparisons) in one cosine schedule."""
    x_train, y_train, x_test, y_test, num_labels = data
    model, _ = load_model(backbone, num_labels, image_size)
    model = build(method, model, seed, total_steps=(total_epochs or 0) * math.ceil(len(x_train) / batch_size))
    after_step = model.base_model.update_and_allocate if method.kind == "adalora" else None
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(lr=lr, batch_size=batch_size, generator=generator)
    start = time.perf_counter()
    segments = []
    widths = initial = None
    if method.kind == "mimi":
        tuner = model.base_model
        initial = dict(tuner.adapter_widths())
        rounds = tuner.num_rounds()
        for r in range(rounds + 1):
            if r > 0:
                tuner.prune_round(compact=True)
            epochs = method.final_epochs if r == rounds and method.final_epochs else epochs_per_round
            seg = train_segment(model, x_train, y_train, epochs=epochs, **kwargs)
            seg.update(round=r, live_params=tuner.live_params(), adapters_alive=sum(
                w > 0 for w in tuner.adapter_widths().values()))
            if eval_each_segment:
                seg["test_accuracy"] = accuracy(model, x_test, y_test)
            segments.append(seg)
        widths = dict(tuner.adapter_widths())
    else:
        segments.append(train_segment(model, x_train, y_train, epochs=total_epochs, after_step=after_step, **kwargs))
    wall = time.perf_counter() - start
    acc = accuracy(model, x_test, y_test)
    return RunResult(accuracy=acc, method_params=method_params(model), head_params=head_params(model),
                     epochs=sum(s["epochs"] for s in segments), wall_s=wall, segments=segments, widths=widths,
                     initial_widths=initial)


def planned_rounds(backbone: str, num_labels: int, method: Method) -> int:
    model, _ = load_model(backbone, num_labels)
    return build(method, model, 0).base_model.num_rounds()


# -------------------------------------------------------------------------------------------- reporting
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def environment() -> dict:
    import peft
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1]), *sys.argv[1:]])


def write_results(out: Path, name: str, raw: dict, markdown: str) -> None:
    """``<out>/<name>.json`` (raw numbers, environment, command) and ``<out>/<name>.md`` (command on top)."""
    out.mkdir(parents=True, exist_ok=True)
    raw = {"command": command_line(), "environment": environment(), **raw}
    (out / f"{name}.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(f"Command: `{command_line()}`\n\n{markdown.strip()}\n")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
