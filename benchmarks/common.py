"""What every benchmark shares: backbones, the methods compared, counting, and how a method is trained: by
`peft_mimi.train.train`, the loop `peft-mimi train` runs, so every published number is what a user gets.

Fairness rules (so that methods differ only in what they train):
- every method sees the same class-balanced training subset for a given seed, the same test subset, the same
  batch order and augmentation for a given seed, the same number of epochs, AdamW with
  `peft_mimi.train.build_optimizer`'s groups and a warm-up + cosine schedule (the recipe's defaults unless a
  benchmark says otherwise);
- MiMi's schedule (docs/method.md §4) is that loop cut into rounds of ``epochs_per_round`` epochs with a pruning round
  between them (the optimizer and its schedule are rebuilt after each pruning, as in the paper's code) and a round
  of training after the last pruning; every other method is one round of the same total epochs.
- the sanity floors (logistic regression on pixels, a converged linear probe on frozen features) come from
  `floors.py` beside this file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# after the offline switches, which huggingface_hub and datasets read when they are imported
from peft_mimi.config import TARGET_MODULES_BY_MODEL_TYPE  # noqa: E402
from peft_mimi.recipe import TrainingRecipe  # noqa: E402
from peft_mimi.schedule import EPOCHS_PER_SEGMENT  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The paper's targets (attention and MLP outputs) of the benchmarks' backbones (ViT, DINOv2 and Swin share them),
# shared by LoRA and the vanilla adapters
TARGET_MODULES = list(TARGET_MODULES_BY_MODEL_TYPE["vit"])
# The benchmarks' MiMi and adapter rows run the paper's design unless a row names another: every result published
# before MiMiConfig's default became Adapter+'s adapter (2026-12-07) ran it, and vanilla adapters are its plain ones.
# bench_structured.py's "mimi" row names the product's default.
PAPER = {"design": "paper"}
TINY = "tiny-vit"  # fmnist-vit's exact architecture with random weights: for smoke runs, and for cost measurements
# (FLOPs, latency, bytes) that do not depend on weight values when the pretrained weights are not there
SMOKE = "smoke-vit"  # a much smaller random ViT (width 32, depth 2, patch 8) for the --smoke runs CI makes


# --------------------------------------------------------------------------------------------- backbones
def load_model(name: str, num_labels: int, image_size: int | None = None) -> tuple[nn.Module, Any]:
    """``(classifier with a fresh head of num_labels classes, image processor)``. ``tiny-vit``: random weights.
    ``image_size``: the processor set to that final size (:func:`peft_mimi.data.processor_at_size`)."""
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
    from peft_mimi.data import processor_at_size

    model, processor = load_backbone(name, id2label=labels, label2id={v: k for k, v in labels.items()})
    return model, processor_at_size(processor, image_size) if image_size else processor


def backbone_params(model: nn.Module) -> int:
    """Parameters of the backbone without its classification head."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))


def image_size_of(processor: Any) -> int:
    from peft_mimi.data import ImageTransform

    return ImageTransform.from_processor(processor, train=False).image_size[0]


# ------------------------------------------------------------------------------------------------- data
_DATASETS: dict[str, Any] = {}


def task_dataset(task: str):
    """The dataset ``task`` (a ``DatasetDict``), loaded once per process: a built-in dataset of `peft_mimi.data`,
    or a task of the structured suite (`structured_tasks.TASKS`; ``<task>:val`` is its 800 / 200
    learning-rate-selection split)."""
    from peft_mimi.data import load_builtin_dataset

    if task not in _DATASETS:
        import structured_tasks

        name, _, part = task.partition(":")
        if name in structured_tasks.TASKS:
            _DATASETS[task] = structured_tasks.load_task(name, validation=part == "val")
        else:
            _DATASETS[task] = load_builtin_dataset(task)
    return _DATASETS[task]


def num_labels_of(task: str) -> int:
    from peft_mimi.data import dataset_labels

    return len(dataset_labels(task_dataset(task))[0])


# ---------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """A fine-tuning method at a budget: ``kind`` in mimi | adapter | widths | adapter_plus | lora | adalora |
    linear | bitfit | full (``adapter_plus``: Adapter+, `adapter_plus.py`, at the budget of ``target_compression``).
    ``lora_rank`` is LoRA's rank, and AdaLoRA's target average rank (it starts at 4x that rank and prunes)."""

    kind: str
    label: str
    init_compression: float = 4.0
    target_compression: float | None = None
    lora_rank: int = 0
    mimi_options: dict = field(default_factory=dict)  # selection / score / prune_ratio overrides (ablation)
    recipe_options: dict = field(default_factory=dict)  # TrainingRecipe overrides for this method (e.g. restart_lr)
    widths: dict[str, int] | None = None  # kind "widths": fixed adapters of these per-layer widths, never pruned
    final_epochs: int | None = None  # MiMi: epochs after the last cut (default: the benchmark's epochs_per_round)
    lr: float | None = None  # this method's learning rate (default: the benchmark's)


FLOORS = ("pixels", "probe")  # kinds measured by floors.py, not trained


@dataclass
class BenchmarkRecipe(TrainingRecipe):
    """`TrainingRecipe` with a schedule setting only the benchmarks use: ``first_epochs`` before the first cut
    (`beyond.py`'s ``long_ends`` candidate; ``bench_accuracy.py --mimi-options first_epochs=2 ...``). It is
    recorded in the run's settings like every recipe field."""

    first_epochs: Optional[int] = field(default=None, metadata={
        "help": "Epochs trained before the first pruning round (default: epochs_per_round).", "check": "count",
        "changes_results": True})

    def segment_epochs(self, rounds: int, finish: bool = False) -> list[int]:
        """The recipe's segments with ``first_epochs`` in the first one; without ``final_epochs`` the last one still
        trains the rest of ``EPOCHS_PER_SEGMENT·(R+1)`` epochs (and at least ``epochs_per_round``)."""
        epochs = super().segment_epochs(rounds, finish)
        if self.first_epochs and (rounds > 0 or finish):
            epochs[0] = self.first_epochs
            if self.final_epochs is None:
                epochs[-1] = max(self.epochs_per_round, EPOCHS_PER_SEGMENT * (rounds + 1) - sum(epochs[:-1]))
        return epochs


def paper_schedule(epochs_per_round: int) -> dict:
    """`TrainingRecipe` fields of the paper's schedule: ``epochs_per_round`` epochs in every segment, the last one
    too, and the learning rate restarted at every cut (the product's default spends the epochs differently)."""
    return {"epochs_per_round": epochs_per_round, "final_epochs": epochs_per_round, "restart_lr": True}


def build(method: Method, model: nn.Module, seed: int, total_steps: int | None = None) -> nn.Module:
    """Wrap (or unfreeze parts of) ``model`` for ``method``; returns the module to train. AdaLoRA needs the
    ``total_steps`` of its training."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from peft_mimi import MiMiConfig

    torch.manual_seed(seed)
    if method.kind in ("mimi", "adapter"):
        budget = {} if "target_params" in method.mimi_options else {
            "target_compression": method.target_compression or method.init_compression}
        # the paper's adapters unless the row names a design (PAPER): vanilla adapters are the paper's plain ones
        config = MiMiConfig(init_compression=method.init_compression, modules_to_save=["classifier"], seed=seed,
                            **budget, **{**PAPER, **method.mimi_options})
        return get_peft_model(model, config)
    if method.kind == "adapter_plus":
        from adapter_plus import add_adapter_plus

        return add_adapter_plus(model, adapter_budget(model, method.target_compression), seed)
    if method.kind == "widths":  # MiMi's final allocation trained from scratch: a budget it already meets, with the
        # paper's adapters unless the row names a design
        from peft_mimi.pruning import adapter_params

        design = {**PAPER, **method.mimi_options}
        terms = MiMiConfig(**design).param_terms
        dims = {n: m.out_features for n, m in model.named_modules() if n in method.widths}
        config = MiMiConfig(adapter_widths=dict(method.widths), modules_to_save=["classifier"], seed=seed, **design,
                            target_params=sum(adapter_params(dims[n], w, **terms) for n, w in method.widths.items()))
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


# ---------------------------------------------------------------------------------------------- training
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
    floor: dict | None = None


def run(method: Method, backbone: str, task: str, *, seed: int, epochs_per_round: int, total_epochs: int | None,
        lr: float, batch_size: int, image_size: int | None = None, max_train: int | None = None,
        max_test: int | None = None, run_dir: Path | None = None, mixed_precision: str | None = None,
        checkpoint_every_steps: int | None = None, head_lr: float | None = None, num_workers: int = 0,
        augment: bool = True) -> RunResult:
    """Train ``method`` on built-in ``task`` with `peft_mimi.train.train` and return test accuracy, counts and
    timings. MiMi trains ``(R+1)·epochs_per_round`` epochs (R = planned rounds), by default on the paper's schedule
    (the same epochs in every segment, the learning rate restarted at every cut; the product's default schedule is
    ``recipe_options`` ``epochs_per_round=1, final_epochs=R+2, restart_lr=False``); every other method trains
    ``total_epochs`` (pass MiMi's total for matched-epoch comparisons) in one round. ``run_dir`` keeps the run's
    files and checkpoints, so an interrupted benchmark resumes inside the run (default: a temporary directory).
    ``augment=False`` trains without random crops and flips (VTAB-1k's protocol: the structured suite's labels are
    positions, orientations and distances, which crops and flips change)."""
    import tempfile

    from peft_mimi.train import train

    data = task_dataset(task)
    model, processor = load_model(backbone, num_labels_of(task))
    if method.kind in FLOORS:
        return _floor(method, model, processor, data, seed=seed, image_size=image_size, max_train=max_train,
                      max_test=max_test)
    mimi = method.kind == "mimi"
    n_train = min(max_train or len(data["train"]), len(data["train"]))
    model = build(method, model, seed, total_steps=(total_epochs or 0) * math.ceil(n_train / batch_size))
    initial = dict(model.base_model.adapter_widths()) if mimi else None
    # a plain "MiMi" row is the paper's schedule; every other method trains total_epochs in its one round
    schedule = {**paper_schedule(epochs_per_round), "final_epochs": method.final_epochs or epochs_per_round} \
        if mimi else {"epochs_per_round": total_epochs}
    recipe = BenchmarkRecipe(**{  # the method's own recipe options (e.g. a MiMi schedule) over the benchmark's
        **schedule, "batch_size": batch_size, "lr": method.lr or lr,
        "head_lr": head_lr, "seed": seed, "image_size": image_size, "max_train_samples": max_train,
        "max_eval_samples": max_test, "mixed_precision": mixed_precision,
        "checkpoint_every_steps": checkpoint_every_steps, "num_workers": num_workers,
        **({} if augment else {"flip": False, "random_crop": False}), **method.recipe_options})
    if mimi and total_epochs is not None:  # refused before any training, from the schedule the recipe plans
        planned = sum(recipe.segment_epochs(model.base_model.planned_rounds()))
        if planned != total_epochs:
            raise ValueError(f"{method.label} would have trained {planned} epochs where its rivals train "
                             f"{total_epochs}: choose final_epochs so that the rounds and the last segment add up "
                             f"to {total_epochs}")
    with tempfile.TemporaryDirectory() as scratch:
        result = train(model, data, run_dir or Path(scratch) / "run", recipe, processor=processor, resume=True)
    segments = [{"round": row["round"], "epochs": row["epoch"] - (previous["epoch"] if previous else 0),
                 "loss": row["epoch_losses"], "live_params": row["live_params"], "test_accuracy": row["accuracy"],
                 "seconds": row["seconds"], "adapters_alive": row["adapters_kept"]}
                for previous, row in zip([None, *result.history], result.history)]
    return RunResult(accuracy=result.accuracy, method_params=method_params(result.model),
                     head_params=head_params(result.model), epochs=result.history[-1]["epoch"],
                     wall_s=result.seconds, segments=segments, widths=result.widths, initial_widths=initial)


def _floor(method: Method, model: nn.Module, processor: Any, data, *, seed: int, image_size: int | None,
           max_train: int | None, max_test: int | None) -> RunResult:
    """A sanity floor: logistic regression on raw pixels, or a converged linear probe on the frozen features."""
    from floors import linear_probe, pixel_floor

    from peft_mimi.data import balanced_subset, processor_at_size

    train_split = balanced_subset(data["train"], max_train, seed=seed)
    test_split = balanced_subset(data["test"], max_test, seed=0)
    if method.kind == "pixels":
        floor = pixel_floor(train_split, test_split, seed=seed)
    else:
        processor = processor_at_size(processor, image_size) if image_size else processor
        floor = linear_probe(model, processor, train_split, test_split, seed=seed)
    return RunResult(accuracy=floor["accuracy"], method_params=0, head_params=0, epochs=0, wall_s=floor["seconds"],
                     segments=[], floor=floor)


def planned_rounds(backbone: str, num_labels: int, method: Method) -> int:
    """MiMi's pruning rounds R for ``method`` on ``backbone`` (no training)."""
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
            "cpu_count": os.cpu_count(), "device": device_name(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def device_name() -> str:
    """The accelerator that `peft_mimi.train` (accelerate) trains on here: the GPU's name, else "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def command_line() -> str:
    # quoted as a shell needs it, so that the line at the top of a results file can be pasted back (--notes "...")
    return "python " + shlex.join([os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1]), *sys.argv[1:]])


def write_results(out: Path, name: str, raw: dict, markdown: str) -> None:
    """``<out>/<name>.json`` (raw numbers, environment, command) and ``<out>/<name>.md`` (command on top)."""
    out.mkdir(parents=True, exist_ok=True)
    raw = {"command": command_line(), "environment": environment(), **raw}
    # written aside and renamed: a run killed mid-write never leaves a truncated file that --resume cannot read
    for path, text in ((out / f"{name}.json", json.dumps(raw, indent=1, default=str) + "\n"),
                       (out / f"{name}.md", f"Command: `{command_line()}`\n\n{markdown.strip()}\n")):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)


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
