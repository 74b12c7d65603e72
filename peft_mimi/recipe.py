"""`TrainingRecipe`: how `peft_mimi.train` trains (epochs, batches, optimizer, learning-rate schedule,
preprocessing), and the MiMi settings a run records. Each setting is declared once, as a dataclass field with its
help text: the ``peft-mimi train`` options and the checkpoint's settings are derived from these fields."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from peft.config import PeftConfig

from . import schedule
from .config import MiMiConfig
from .schedule import EPOCHS_PER_SEGMENT

# Chosen by benchmarks/lr_sweep.py (results/lr_sweep.md and results/lr_sweep_dinov2/lr_sweep.md): the peak AdamW
# learning rate for short schedules (2 epochs per round). On the Fashion-MNIST backbones 1e-2 is best, but it
# diverges on DINOv2-S (10 % on digits); 3e-3 is among the best on DINOv2-S. A 10x faster head gains 3 points on
# the tiny backbones but throws DINOv2-S's first steps to a loss of 8-10 (its features have a norm near 50), so
# the head trains at the same rate by default.
DEFAULT_LR = 3e-3
DEFAULT_HEAD_LR = None  # None: the head trains at `lr`
DEFAULT_VALIDATION_FRACTION = 0.1  # the budget search's validation split when the recipe names none


def _setting(default: Any, help: str, *, check: str | None = None, changes_results: bool = True) -> Any:
    """A recipe field. ``check``: ``"count"`` (an int >= 1) or ``"positive"`` (a number > 0), None also accepted
    when it is the default. ``changes_results=False``: how the run executes, not what it computes (a resumed run may
    change it)."""
    return field(default=default, metadata={"help": help, "check": check, "changes_results": changes_results})


@dataclass
class TrainingRecipe:
    """How to train: epochs, batches, optimizer, schedule, preprocessing. Every field has a default that the
    project's own measurements chose for short schedules on small datasets (the paper's recipe is 100 epochs per
    round at ``lr = 5e-4 x batch / 512``, with mixup, cutmix and RandAugment).

    The schedule (`peft_mimi.schedule`): ``epochs_per_round`` epochs before each of the ``R`` cuts, then the final
    widths train ``final_epochs``, by default the rest of ``2·(R+1)`` epochs; one warm-up + cosine over the whole
    run. The paper's schedule is ``TrainingRecipe(epochs_per_round=2, restart_lr=True)``: equal segments, the
    learning rate restarted at every cut. With the budget search (``MiMiConfig.budget_tolerance``) every round,
    the last one too, trains ``epochs_per_round`` and ``final_epochs`` finish the round the search keeps, with a
    fresh optimizer and its own warm-up + cosine. A subclass may override :meth:`segment_epochs` (the benchmarks
    do).
    """

    epochs_per_round: int = _setting(1, "E: epochs trained before each pruning round (the paper's recipe: 2, with "
                                        "restart_lr).", check="count")
    final_epochs: Optional[int] = _setting(
        None, f"Epochs trained after the last pruning round, at the final widths (default: what the rounds leave of "
              f"{EPOCHS_PER_SEGMENT}·(R+1) epochs, and at least epochs_per_round: R + 2 with E = 1, E with "
              f"E >= {EPOCHS_PER_SEGMENT}; a model without pruning rounds trains E). With budget_tolerance: the "
              "epochs that finish the round the search keeps (default: the rest of "
              f"{EPOCHS_PER_SEGMENT}·(R+1), at least E).", check="count")
    batch_size: int = _setting(64, "Images per batch on each process.", check="count")
    gradient_accumulation_steps: int = _setting(1, "Batches per optimizer step.", check="count")
    lr: float = _setting(DEFAULT_LR, "Peak learning rate of AdamW (adapters, and the head unless head_lr is "
                                     "given).", check="positive")
    head_lr: Optional[float] = _setting(DEFAULT_HEAD_LR, "Peak learning rate of the classification head (None: the "
                                                         "same as lr).", check="positive")
    weight_decay: float = _setting(0.05, "AdamW weight decay (none on biases and 1-D weights).")
    warmup_ratio: float = _setting(0.1, "Linear warm-up, as a fraction of the whole run's steps (of each round's "
                                        "with restart_lr); then cosine decay to 0.")
    restart_lr: bool = _setting(False, "Restart the warm-up + cosine schedule at every round (the paper's recipe). "
                                       "Default: one warm-up + cosine over the whole run, continued across the cuts "
                                       "(the optimizer is still rebuilt for the shrunk adapters), the schedule "
                                       "vanilla adapters get.")
    max_grad_norm: float = _setting(5.0, "Gradient clipping (the paper's 5.0).", check="positive")
    image_size: Optional[int] = _setting(None, "Train and evaluate at this size (default: the backbone's); resize "
                                               "and crop keep the image processor's ratio.", check="count")
    flip: Optional[bool] = _setting(None, "Random horizontal flips in training (default: unless the built-in "
                                          "dataset forbids them).")
    random_crop: bool = _setting(True, "Random resized crops in training (0.8 to 1 of the area, aspect ratio 3/4 to "
                                       "4/3). Turn them off, and flip too, when the label depends on where an object "
                                       "is, how large it looks or which way it faces (VTAB-1k's structured tasks "
                                       "train on the evaluation transform's images).")
    max_train_samples: Optional[int] = _setting(None, "Train on a class-balanced random subset of this many "
                                                      "images.", check="count")
    max_eval_samples: Optional[int] = _setting(None, "Evaluate on a class-balanced subset of this many images.",
                                               check="count")
    validation_fraction: Optional[float] = _setting(
        None, "Hold out this fraction of the training images (stratified by class, seeded) as a validation split, "
              "measured after every round and never trained on; the test split is never used for choices. "
              f"Default: {DEFAULT_VALIDATION_FRACTION:g} when MiMiConfig.budget_tolerance is set, else no split.")
    seed: int = _setting(0, "Seed of the head, the adapters, data order and augmentation.")
    mixed_precision: Optional[str] = _setting(None, "'no', 'fp16' or 'bf16' (default: accelerate's configuration).",
                                              changes_results=False)
    checkpoint_every_steps: Optional[int] = _setting(None, "Also checkpoint every N optimizer steps (always at the "
                                                           "end of each round).", check="count",
                                                   changes_results=False)
    num_workers: int = _setting(0, "DataLoader worker processes.", changes_results=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, check, optional = getattr(self, f.name), f.metadata.get("check"), f.default is None
            if check is None or (value is None and optional):
                continue
            if check == "count" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"TrainingRecipe.{f.name} must be an int >= 1{' (or None)' if optional else ''}, "
                                 f"got {value!r}.")
            if check == "positive" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not 0 < value < math.inf):
                raise ValueError(f"TrainingRecipe.{f.name} must be a number > 0, got {value!r}.")
        if self.validation_fraction is not None and (
            isinstance(self.validation_fraction, bool) or not isinstance(self.validation_fraction, (int, float))
            or not 0 < self.validation_fraction < 1
        ):
            raise ValueError(f"TrainingRecipe.validation_fraction is the share of the training images held out for "
                             f"validation and must be in (0, 1) (e.g. 0.1), got {self.validation_fraction!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainingRecipe.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainingRecipe.weight_decay must be >= 0, got {self.weight_decay!r}.")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"TrainingRecipe.mixed_precision must be 'no', 'fp16' or 'bf16', got "
                             f"{self.mixed_precision!r}.")
        if self.num_workers < 0:
            raise ValueError(f"TrainingRecipe.num_workers must be >= 0, got {self.num_workers!r}.")

    def segment_epochs(self, rounds: int, finish: bool = False) -> list[int]:
        """Epochs of every segment of a run with ``rounds`` pruning rounds (round 0, ..., the last, and with
        ``finish`` the budget search's finish of the round it keeps): `peft_mimi.schedule.segment_epochs` of this
        recipe."""
        return schedule.segment_epochs(rounds, self.epochs_per_round, self.final_epochs, finish=finish)

    def settings(self) -> dict[str, Any]:
        """The fields that decide what a run computes (a resumed run must use the same)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("changes_results", True)}


def mimi_setting_fields() -> list[dataclasses.Field]:
    """The fields of `MiMiConfig` that describe the method (budget, σ0, ρ, selection, score, ...): its own fields of
    a single value, without PEFT's, the module lists, the recorded ``rounds_done`` and those a `TrainingRecipe`
    also has (``seed``). ``peft-mimi train`` offers them as options and a checkpoint records them."""
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    recipe = {f.name for f in dataclasses.fields(TrainingRecipe)}
    return [f for f in dataclasses.fields(MiMiConfig)
            if f.name not in inherited | recipe | {"rounds_done"}
            and not any(kind in str(f.type) for kind in ("list", "dict", "List", "Dict"))]

