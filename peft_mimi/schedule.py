"""MiMi's schedule as numbers: how long each segment trains, where the cuts fall, the learning rate at every step,
and which round the budget search keeps (docs/method.md, section 4).

A run with ``R`` pruning rounds trains ``R + 1`` segments: segment ``r`` trains at the widths that ``r`` cuts left,
and a cut ends every segment but the last. The product's default spends one epoch on each segment before a cut and
the rest of the paper's ``2·(R+1)`` epochs at the final widths; the paper's recipe is ``epochs_per_round=2`` with
the learning rate restarted at every cut. Pure functions and small value objects, no model, optimizer or Trainer:
`peft_mimi.train` (epochs, one optimizer per segment) and `MiMiPruningCallback` (the Trainer's steps, one optimizer)
both drive this module, so both cut and schedule the learning rate the same way.

With the budget search (``MiMiConfig.budget_tolerance``) the rounds are trained alike, ``epochs_per_round`` each
(the last round too), so that their validation accuracies compare like with like; then the round the search keeps
is *finished*: its adapter comes back and trains the rest of the run (by default the rest of ``2·(R+1)`` epochs).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from .pruning import budget_search

__all__ = ["EPOCHS_PER_SEGMENT", "BudgetSearch", "cut_steps", "lr_boundaries", "lr_factor", "segment_epochs",
           "standard_error"]

# The length of a MiMi run unless told otherwise: this many epochs per segment, 2·(R+1) in all (the paper's E = 2).
# By default the R cuts take one epoch each and the final widths train the remaining R + 2 epochs (peft_mimi.train,
# and MiMiPruningCallback over the Trainer's steps), which beat the paper's even split on DINOv2-S
# (benchmarks/results/dinov2-s14-long-last-one-schedule*/).
EPOCHS_PER_SEGMENT = 2


def segment_epochs(rounds: int, epochs_per_round: int = 1, final_epochs: int | None = None, *,
                   finish: bool = False) -> list[int]:
    """Epochs of the segments ``0..rounds`` of a run with ``rounds`` pruning rounds: ``epochs_per_round`` before
    every cut; after the last cut ``final_epochs``, else what the cuts leave of ``EPOCHS_PER_SEGMENT·(rounds+1)``
    epochs and at least ``epochs_per_round``. A run without pruning rounds trains ``final_epochs`` or
    ``epochs_per_round``.

    ``finish=True`` (the budget search): every round, the last one too, trains ``epochs_per_round``, so that the
    search compares rounds trained alike, and one more segment, the finish of the round it keeps, trains
    ``final_epochs``, else the rest of ``EPOCHS_PER_SEGMENT·(rounds+1)`` epochs and at least ``epochs_per_round``."""
    if finish:
        rest = EPOCHS_PER_SEGMENT * (rounds + 1) - (rounds + 1) * epochs_per_round
        return [epochs_per_round] * (rounds + 1) + [final_epochs or max(epochs_per_round, rest)]
    if rounds == 0:
        return [final_epochs or epochs_per_round]
    rest = EPOCHS_PER_SEGMENT * (rounds + 1) - rounds * epochs_per_round
    return [epochs_per_round] * rounds + [final_epochs or max(epochs_per_round, rest)]


def cut_steps(
    max_steps: int, num_train_epochs: float, rounds: int, *, epochs_per_round: float | None = None,
    steps_per_round: int | None = None, finish: bool = False,
) -> list[int]:
    """The optimizer steps after which the ``rounds`` cuts fall, in a run of ``max_steps`` steps over
    ``num_train_epochs`` epochs: every ``steps_per_round`` steps, or every ``epochs_per_round`` epochs, or by default
    every epoch (every ``max_steps / (EPOCHS_PER_SEGMENT·(rounds+1))`` steps in a shorter run), the final widths
    training the rest. ``finish=True`` (the budget search): the last round trains as long as the others and one more
    step follows the cuts, where that round ends and the finish of the chosen round starts. Raises ValueError when
    the last cut (or the finish's start) leaves no step to train after it."""
    if rounds == 0 and not finish:
        return []
    steps_per_epoch = max_steps / max(num_train_epochs, 1e-9)
    if steps_per_round is not None:
        segment = steps_per_round
    elif epochs_per_round is not None:
        segment = max(1, round(epochs_per_round * steps_per_epoch))
    else:
        segment = min(max(1, round(steps_per_epoch)), max_steps // (EPOCHS_PER_SEGMENT * (rounds + 1)))
    cuts = [segment * (r + 1) for r in range(rounds + finish)]
    if segment < 1 or cuts[-1] >= max_steps:
        after = "the search's last round" if finish else "the last one"
        raise ValueError(
            f"MiMi needs {rounds} pruning rounds and training after {after}, but the run has only {max_steps} "
            f"steps for segments of {segment} steps. Train longer (num_train_epochs / max_steps >= "
            f"{segment * (len(cuts) + 1) if segment else len(cuts) + 1}), shorten the segments, or choose a budget "
            "that needs fewer rounds."
        )
    return cuts


def lr_boundaries(cuts: Sequence[int], total_steps: int, restart_lr: bool) -> tuple[int, ...]:
    """The steps where the learning-rate schedule (re)starts, then ``total_steps``: ``(0, *cuts, total_steps)`` when
    it restarts at every cut (the paper's recipe), ``(0, total_steps)`` for one schedule over the whole run. Raises
    ValueError unless the cuts are increasing steps strictly between 0 and ``total_steps``."""
    boundaries = (0, *cuts, total_steps)
    if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"The cuts must be increasing steps strictly between 0 and {total_steps}, got {list(cuts)}.")
    return boundaries if restart_lr else (0, total_steps)


def lr_factor(step: int, boundaries: Sequence[int], warmup_ratio: float) -> float:
    """The learning rate at step ``step`` (0-based) as a fraction of the peak, for a schedule that starts afresh at
    every boundary of ``boundaries = (0, ..., total_steps)`` (see :func:`lr_boundaries`).

    In a segment of ``L`` steps the factor rises linearly from 0 over its first ``floor(warmup_ratio · L)`` steps,
    then follows a cosine from 1 down to 0 at the segment's end: exactly
    ``transformers.get_cosine_schedule_with_warmup`` over that segment. Steps at or past ``total_steps`` give 0."""
    segment = min(max(bisect_right(boundaries, step) - 1, 0), len(boundaries) - 2)
    start, end = boundaries[segment], boundaries[segment + 1]
    length, k = end - start, step - start
    warmup = math.floor(warmup_ratio * length)
    if k < warmup:
        return k / warmup
    progress = min((k - warmup) / max(1, length - warmup), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_warmup_ratio(warmup_ratio: float) -> None:
    if isinstance(warmup_ratio, bool) or not isinstance(warmup_ratio, (int, float)) or not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio is a fraction of the schedule's steps in [0, 1) (e.g. 0.1), got "
                         f"{warmup_ratio!r}.")


def standard_error(accuracy: float, images: int) -> float:
    """The standard error, in accuracy points, of one accuracy reading ``accuracy`` (a fraction) on ``images``
    images: how far apart two rounds' validation accuracies must be before the budget search's tolerance means
    anything (at 80 % on 100 images, 4 points)."""
    return 100 * math.sqrt(accuracy * (1 - accuracy) / images)


@dataclass
class BudgetSearch:
    """The budget search's bookkeeping (``MiMiConfig.budget_tolerance``): the size and validation accuracy of every
    segment trained so far, and the segment to keep by `peft_mimi.pruning.budget_search`."""

    tolerance: float  # accuracy points
    sizes: list[int] = field(default_factory=list)  # live adapter parameters after each segment
    accuracies: list[float] = field(default_factory=list)  # validation accuracy (a fraction) after each segment
    chosen: int | None = None  # the segment (= round) kept so far

    def record(self, size: int, accuracy: float) -> bool:
        """Add the segment just trained; returns True when the choice moved to it (the caller then keeps a copy of
        its weights: pruning only removes, so the choice only ever stays or moves to the newest segment)."""
        self.sizes.append(int(size))
        self.accuracies.append(float(accuracy))
        self.chosen = budget_search(self.sizes, self.accuracies, self.tolerance)
        return self.chosen == len(self.sizes) - 1
