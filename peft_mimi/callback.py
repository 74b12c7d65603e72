"""`MiMiPruningCallback`: MiMi's schedule (train, prune, train, ..., train after the last pruning) inside a
Hugging Face `transformers.Trainer`.

The callback only decides *when*: it splits the Trainer's planned steps into ``R + 1`` segments and calls
``prune_round(compact=False)`` at the end of each but the last. Pruning masks neurons instead of shrinking
tensors, so the Trainer's optimizer, scheduler, checkpoints and ``resume_from_checkpoint`` keep working; at the
end of training the adapters are shrunk to their live neurons.

The learning rate can follow the rounds too (``MiMiPruningCallback.attach(trainer, restart_lr=True)``): every
segment gets its own linear warm-up and cosine decay to 0, as each round does in the paper's code and in
`peft_mimi.train`. `round_aligned_lr_factor` is that schedule as a pure function.
"""

from __future__ import annotations

import functools
import math
import warnings
from bisect import bisect_right
from collections.abc import Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .model import MiMiModel


def mimi_tuner(model) -> MiMiModel:
    """The `MiMiModel` inside a PEFT model (or the tuner itself); raises TypeError for anything else."""
    tuner = getattr(model, "base_model", None)
    if isinstance(model, MiMiModel):
        return model
    if isinstance(tuner, MiMiModel):
        return tuner
    raise TypeError(
        f"MiMiPruningCallback needs a MiMi model, got {type(model).__name__}"
        f"{' wrapping ' + type(tuner).__name__ if tuner is not None else ''}. Wrap your model first: "
        "model = peft.get_peft_model(model, peft_mimi.MiMiConfig(...))."
    )


class MiMiPruningCallback(TrainerCallback):
    """Runs MiMi's pruning rounds during `Trainer.train()`.

    With no arguments the rounds the config needs (``R``) are spread evenly over the Trainer's planned steps:
    ``R + 1`` equal training segments with a pruning round at the end of each but the last, so the adapters
    always train after the last pruning. ``epochs_per_round`` or ``steps_per_round`` fix the segment length
    instead. At each round the widths, the live parameter count and the budget are logged through the
    Trainer's logging (``mimi/...`` keys).

    Use :meth:`attach` (``MiMiPruningCallback.attach(trainer)``) so that reporting integrations such as
    TensorBoard, which run in callback order, also receive the round metrics; passing it in
    ``Trainer(callbacks=[...])`` prunes the same way but the metrics reach only ``trainer.state.log_history``.

    The paper's recipe, in ``TrainingArguments`` terms: the learning rate restarts at every round
    (``MiMiPruningCallback.attach(trainer, restart_lr=True)``: warm-up for ``warmup_steps`` (a ratio) of each
    segment, then cosine to 0), and gradients are clipped at norm 5.0 as in the paper's code and in
    `peft_mimi.train`: set ``max_grad_norm=5.0`` (the Trainer's default is 1.0). Without ``restart_lr`` the
    Trainer's own ``lr_scheduler_type`` (e.g. ``"cosine"``) runs once over all the segments.
    """

    def __init__(
        self, *, epochs_per_round: float | None = None, steps_per_round: int | None = None,
        adapter_name: str | None = None,
    ) -> None:
        if epochs_per_round is not None and steps_per_round is not None:
            raise ValueError("Give epochs_per_round or steps_per_round, not both.")
        if epochs_per_round is not None and not epochs_per_round > 0:
            raise ValueError(f"epochs_per_round must be > 0, got {epochs_per_round}.")
        if steps_per_round is not None and (not isinstance(steps_per_round, int) or steps_per_round < 1):
            raise ValueError(f"steps_per_round must be an int >= 1, got {steps_per_round}.")
        self.epochs_per_round = epochs_per_round
        self.steps_per_round = steps_per_round
        self.adapter_name = adapter_name
        self.prune_steps: list[int] = []
        self._pending_logs: dict[str, float] = {}

    @classmethod
    def attach(
        cls, trainer: Trainer, *, restart_lr: bool = False, warmup_ratio: float | None = None, **kwargs
    ) -> MiMiPruningCallback:
        """Create the callback (``kwargs``: those of the constructor) and put it first in ``trainer``'s callbacks,
        so that its round metrics reach every reporting integration. Returns the callback.

        ``restart_lr=True`` also replaces the Trainer's ``lr_scheduler_type`` by `round_aligned_scheduler`: a
        warm-up of ``warmup_ratio`` of each segment's steps (default: ``args.warmup_steps``, which must then be a
        ratio in [0, 1)) and a cosine decay to 0, restarted exactly at every prune step of :meth:`plan`.

        Why here: the schedule needs ``max_steps``, which the Trainer computes only inside ``train()`` (so
        ``Trainer(optimizers=(optimizer, scheduler))`` cannot know it), and the Trainer builds its scheduler
        lazily through ``create_scheduler(num_training_steps)``, the hook it documents for custom schedules.
        ``attach`` overrides that method on this ``trainer`` instance rather than asking for a Trainer subclass,
        so it works with any Trainer (``Seq2SeqTrainer``, your own subclass) and with ``resume_from_checkpoint``,
        which restores the scheduler's position after ``create_scheduler`` has built it.
        """
        mimi_tuner(trainer.model)
        if not restart_lr and warmup_ratio is not None:
            raise ValueError("warmup_ratio is the warm-up of each round's learning-rate restart: pass restart_lr=True.")
        if restart_lr:
            if trainer.lr_scheduler is not None:
                raise ValueError(
                    "restart_lr=True builds the Trainer's learning-rate scheduler, but this Trainer already has one "
                    "(Trainer(optimizers=(optimizer, scheduler))). Pass optimizers=(optimizer, None), or drop "
                    "restart_lr and restart your scheduler at callback.prune_steps yourself."
                )
            if warmup_ratio is None:  # transformers 4.x: warmup_ratio; 5.x: a ratio in warmup_steps
                warmup_ratio = getattr(trainer.args, "warmup_ratio", 0.0) or trainer.args.warmup_steps
                if warmup_ratio >= 1:
                    raise ValueError(
                        f"restart_lr=True warms up for a fraction of each round's steps, but TrainingArguments has "
                        f"warmup_steps={warmup_ratio} (a number of steps). Give warmup_steps as a ratio in [0, 1) "
                        "(e.g. 0.1), or pass warmup_ratio= to attach()."
                    )
            _check_warmup_ratio(warmup_ratio)
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        if restart_lr:
            trainer.create_scheduler = functools.partial(callback._create_round_aligned_scheduler, trainer,
                                                         warmup_ratio=warmup_ratio)
        return callback

    def _create_round_aligned_scheduler(
        self, trainer: Trainer, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None, *,
        warmup_ratio: float,
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """``Trainer.create_scheduler`` for ``restart_lr=True``: same contract, the round-aligned schedule."""
        if trainer.lr_scheduler is None:
            planned = mimi_tuner(trainer.model).planned_rounds(self.adapter_name)
            prune_steps = self.plan(num_training_steps, _num_train_epochs(trainer, num_training_steps), planned)
            trainer.lr_scheduler = round_aligned_scheduler(optimizer or trainer.optimizer, prune_steps,
                                                           num_training_steps, warmup_ratio)
            # as Trainer.create_scheduler does, so that a later train() builds a schedule for its own max_steps
            trainer._created_lr_scheduler = True
        return trainer.lr_scheduler

    def plan(self, max_steps: int, num_train_epochs: float, planned_rounds: int) -> list[int]:
        """Global steps after which a pruning round runs (pure: used by ``on_train_begin`` and tests)."""
        if planned_rounds == 0:
            return []
        if self.steps_per_round is not None:
            segment = self.steps_per_round
        elif self.epochs_per_round is not None:
            steps_per_epoch = max_steps / max(num_train_epochs, 1e-9)
            segment = max(1, round(self.epochs_per_round * steps_per_epoch))
        else:
            segment = max_steps // (planned_rounds + 1)
        steps = [segment * (r + 1) for r in range(planned_rounds)]
        if segment < 1 or steps[-1] >= max_steps:
            raise ValueError(
                f"MiMi needs {planned_rounds} pruning rounds and training after the last one, but the Trainer plans "
                f"only {max_steps} steps for segments of {segment} steps. Train longer (num_train_epochs / "
                f"max_steps >= {segment * (planned_rounds + 1) if segment else planned_rounds + 1}), shorten the "
                "segments, or choose a budget that needs fewer rounds."
            )
        return steps

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        tuner = mimi_tuner(model)
        planned = tuner.planned_rounds(self.adapter_name)
        self.prune_steps = self.plan(state.max_steps, state.num_train_epochs, planned)
        # resume_from_checkpoint: the Trainer has loaded the masked adapter; realign the round counter with it
        config = tuner.peft_config[tuner._adapter(self.adapter_name)]
        config.rounds_done = sum(step <= state.global_step for step in self.prune_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                    **kwargs):
        if state.global_step not in self.prune_steps:
            return control
        tuner = mimi_tuner(model)
        widths = tuner.prune_round(self.adapter_name, compact=False)
        config = tuner.peft_config[tuner._adapter(self.adapter_name)]
        self._pending_logs = {
            "mimi/round": config.rounds_done,
            "mimi/live_params": tuner.live_params(self.adapter_name),
            "mimi/budget": tuner.budget(self.adapter_name),
            "mimi/adapters_removed": sum(w == 0 for w in widths.values()),
            **{f"mimi/width/{name}": width for name, width in widths.items()},
        }
        control.should_log = True
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending_logs)
            self._pending_logs = {}
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                     **kwargs):
        mimi_tuner(model).compact(self.adapter_name)
        return control


def _num_train_epochs(trainer: Trainer, max_steps: int) -> float:
    """The Trainer's number of epochs for ``max_steps`` optimizer steps. transformers 4.x builds the scheduler
    before it sets ``state.num_train_epochs``, so it is computed here as the Trainer computes it."""
    if trainer.state.num_train_epochs:
        return trainer.state.num_train_epochs
    args = trainer.args
    if args.max_steps <= 0:
        return math.ceil(args.num_train_epochs)
    steps_per_epoch = max(len(trainer.get_train_dataloader()) // args.gradient_accumulation_steps, 1)
    return math.ceil(max_steps / steps_per_epoch)


def round_aligned_lr_factor(step: int, boundaries: Sequence[int], warmup_ratio: float) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a fraction of the peak learning rate.

    ``boundaries = (0, p1, ..., pR, max_steps)`` split training into the segments ``[0, p1), ..., [pR, max_steps)``
    (``p1..pR``: the prune steps). In a segment of ``L`` steps the factor rises linearly from 0 over its first
    ``floor(warmup_ratio * L)`` steps, reaches 1, then follows a cosine down to 0 at the segment's end: exactly
    ``transformers.get_cosine_schedule_with_warmup`` over that segment, as `peft_mimi.train` uses each round.
    Steps at or past ``max_steps`` give 0. Pure; `round_aligned_scheduler` checks the arguments.
    """
    segment = min(max(bisect_right(boundaries, step) - 1, 0), len(boundaries) - 2)
    start, end = boundaries[segment], boundaries[segment + 1]
    length, k = end - start, step - start
    warmup = math.floor(warmup_ratio * length)
    if k < warmup:
        return k / warmup
    progress = min((k - warmup) / max(1, length - warmup), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def round_aligned_scheduler(
    optimizer: torch.optim.Optimizer, prune_steps: Sequence[int], max_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` over ``max_steps`` optimizer steps that restarts (warm-up, then cosine) at every step of
    ``prune_steps`` (`MiMiPruningCallback.plan`), following `round_aligned_lr_factor`. Its state_dict holds only
    its position, so checkpoints and ``resume_from_checkpoint`` work as with the Trainer's own schedules."""
    boundaries = (0, *prune_steps, max_steps)
    if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(
            f"prune_steps must be increasing steps strictly between 0 and max_steps={max_steps}, got "
            f"{list(prune_steps)}. Use MiMiPruningCallback.plan(...) to compute them."
        )
    _check_warmup_ratio(warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(round_aligned_lr_factor, boundaries=boundaries, warmup_ratio=warmup_ratio)
    )


def _check_warmup_ratio(warmup_ratio: float) -> None:
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio is a fraction of each round's steps in [0, 1), got {warmup_ratio!r}.")


def rounds_for_cosine_restarts(model) -> int:
    """``num_cycles`` for ``lr_scheduler_type="cosine_with_restarts"``: the number of training segments, ``R + 1``.

    Deprecated: transformers spreads those cycles over the steps after a single warm-up, so with any warm-up,
    with ``epochs_per_round`` / ``steps_per_round``, or when ``max_steps`` is not a multiple of ``R + 1``, its
    restarts miss the prune steps. Use ``MiMiPruningCallback.attach(trainer, restart_lr=True)`` instead.
    """
    warnings.warn(
        "rounds_for_cosine_restarts is deprecated: cosine_with_restarts does not restart exactly at the pruning "
        "rounds. Use MiMiPruningCallback.attach(trainer, restart_lr=True), which restarts at every round with its "
        "own warm-up.",
        FutureWarning,
        stacklevel=2,
    )
    return mimi_tuner(model).planned_rounds() + 1


__all__ = [
    "MiMiPruningCallback",
    "mimi_tuner",
    "round_aligned_lr_factor",
    "round_aligned_scheduler",
    "rounds_for_cosine_restarts",
]
