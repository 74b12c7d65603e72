"""`MiMiPruningCallback`: MiMi's schedule (train, prune, train, ..., train after the last pruning) inside a
Hugging Face `transformers.Trainer`.

The callback only decides *when*: it splits the Trainer's planned steps into ``R + 1`` segments and calls
``prune_round(compact=False)`` at the end of each but the last. Pruning masks neurons instead of shrinking
tensors, so the Trainer's optimizer, scheduler, checkpoints and ``resume_from_checkpoint`` keep working; at the
end of training the adapters are shrunk to their live neurons.
"""

from __future__ import annotations

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
    Trainer's logging (``mimi/...`` keys). To restart the learning rate at each round as in the paper, use
    ``lr_scheduler_type="cosine_with_restarts"`` with ``lr_scheduler_kwargs={"num_cycles": R + 1}``.

    Use :meth:`attach` (``MiMiPruningCallback.attach(trainer)``) so that reporting integrations such as
    TensorBoard, which run in callback order, also receive the round metrics; passing it in
    ``Trainer(callbacks=[...])`` prunes the same way but the metrics reach only ``trainer.state.log_history``.
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
    def attach(cls, trainer: Trainer, **kwargs) -> MiMiPruningCallback:
        """Create the callback and put it first in ``trainer``'s callbacks, so that its round metrics reach every
        reporting integration. Returns the callback."""
        mimi_tuner(trainer.model)
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

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


def rounds_for_cosine_restarts(model) -> int:
    """``num_cycles`` for ``lr_scheduler_type="cosine_with_restarts"`` so that the learning rate restarts at
    every pruning round: the number of training segments, ``R + 1``."""
    return mimi_tuner(model).planned_rounds() + 1


__all__ = ["MiMiPruningCallback", "mimi_tuner", "rounds_for_cosine_restarts"]
