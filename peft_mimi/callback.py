"""`MiMiPruningCallback`: MiMi's schedule (train, prune, train, ..., train after the last pruning) inside a
Hugging Face `transformers.Trainer`.

The callback only decides *when*: it cuts the Trainer's planned steps into ``R + 1`` segments and calls
``prune_round(compact=False)`` at the end of each but the last; by default the first ``R`` segments are one epoch
each (less in a run shorter than ``2·(R+1)`` epochs: ``1 / (2·(R+1))`` of it) and the final widths train the rest,
as `peft_mimi.train` does by default. Pruning masks neurons instead of shrinking
tensors, so the Trainer's optimizer, scheduler, checkpoints and ``resume_from_checkpoint`` keep working; at the
end of training the adapters are shrunk to their live neurons.

With ``MiMiConfig.budget_tolerance`` set, the callback runs the budget search: every round trains one segment (the
last round too), at the end of each it asks the Trainer to evaluate (its ``eval_dataset``, held out from the training
images, and its ``compute_metrics``, which must return ``"accuracy"``) and keeps a copy of the smallest adapter whose
accuracy is within the tolerance of the best segment so far; after the last round it restores that copy, which
trains for the rest of the run (the finish).

The learning rate can follow the rounds too (``MiMiPruningCallback.attach(trainer, restart_lr=True)``): every
segment gets its own linear warm-up and cosine decay to 0, as each round does in the paper's code and in
`peft_mimi.train`. Where the cuts fall, the learning rate and the budget search's choice come from
`peft_mimi.schedule`, as in `peft_mimi.train`.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import schedule
from .model import MiMiModel

SEARCH_FILE = "mimi_budget_search.safetensors"  # the budget search's state, in each Trainer checkpoint


def _mimi_tuner(model) -> MiMiModel:
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

    With no arguments the rounds the config needs (``R``) come early: a pruning round every epoch (every
    ``max_steps / (2·(R+1))`` steps in a run shorter than ``2·(R+1)`` epochs), and the final widths train for the
    rest of the run (with ``num_train_epochs = 2·(R+1)``: ``R + 2`` epochs, `peft_mimi.train`'s default schedule,
    the best one measured). ``epochs_per_round`` or ``steps_per_round`` fix the segment length
    instead; the paper's even split is ``epochs_per_round = num_train_epochs / (R + 1)`` (2 with
    ``num_train_epochs = 2·(R+1)``). At each round the widths, the live parameter count and the budget are logged
    through the Trainer's logging (``mimi/...`` keys).

    Use :meth:`attach` (``MiMiPruningCallback.attach(trainer)``) so that reporting integrations such as
    TensorBoard, which run in callback order, also receive the round metrics; passing it in
    ``Trainer(callbacks=[...])`` prunes the same way but the metrics reach only ``trainer.state.log_history``.

    The paper's recipe, in ``TrainingArguments`` terms: the learning rate restarts at every round
    (``MiMiPruningCallback.attach(trainer, restart_lr=True)``: warm-up for ``warmup_steps`` (a ratio) of each
    segment, then cosine to 0), and gradients are clipped at norm 5.0 as in the paper's code and in
    `peft_mimi.train`: set ``max_grad_norm=5.0`` (the Trainer's default is 1.0). Without ``restart_lr`` the
    Trainer's own ``lr_scheduler_type`` (e.g. ``"cosine"``) runs once over all the segments.

    Budget search (``MiMiConfig.budget_tolerance`` in accuracy points): the validation signal is the Trainer's
    evaluation at the end of every segment, ``metrics[validation_metric]`` (default ``"eval_accuracy"``, a fraction:
    give the Trainer an ``eval_dataset`` carved from the training images, never the test set, and a
    ``compute_metrics`` returning ``{"accuracy": ...}``). The rule is `peft_mimi.pruning.budget_search`: the rounds
    go on down to the budget (the floor), and when training ends the smallest adapter within the tolerance of the
    best segment (weights, masks, head and ``rounds_done``) is restored. The rounds are trained alike, the last one
    as long as the others (its segment ends at :attr:`finish_step`), and the restored adapter trains the rest of the
    run, then is compacted. Each segment's accuracy and the chosen round are logged as ``mimi/validation_accuracy``
    and ``mimi/chosen_round``. The search's state goes into every Trainer checkpoint
    (``mimi_budget_search.safetensors``), so ``resume_from_checkpoint`` continues it.
    """

    def __init__(
        self, *, epochs_per_round: float | None = None, steps_per_round: int | None = None,
        adapter_name: str | None = None, validation_metric: str = "eval_accuracy",
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
        self.validation_metric = validation_metric
        self.prune_steps: list[int] = []
        self._pending_logs: dict[str, float] = {}
        # budget search: the segments' sizes and accuracies and the choice, a copy of the chosen segment's adapter
        # state (trainable tensors and neuron masks), the step whose evaluation ends a segment
        self.search: schedule.BudgetSearch | None = None
        self.finish_step: int | None = None  # budget search: the step where the last round ends and the finish starts
        self._chosen_state: dict[str, torch.Tensor] | None = None
        self._segment_end: int | None = None

    @property
    def chosen_round(self) -> int | None:
        """Budget search: the round whose adapter is kept so far (None: no search, or no segment evaluated yet)."""
        return self.search.chosen if self.search is not None else None

    @classmethod
    def attach(
        cls, trainer: Trainer, *, restart_lr: bool = False, warmup_ratio: float | None = None, **kwargs
    ) -> MiMiPruningCallback:
        """Create the callback (``kwargs``: those of the constructor) and put it first in ``trainer``'s callbacks,
        so that its round metrics reach every reporting integration. Returns the callback.

        ``restart_lr=True`` also replaces the Trainer's ``lr_scheduler_type`` by the round-aligned schedule of
        `peft_mimi.schedule.lr_factor`: a warm-up of ``warmup_ratio`` of each segment's steps (default:
        ``args.warmup_steps``, which must then be a ratio in [0, 1)) and a cosine decay to 0, restarted exactly at
        every prune step of :meth:`plan`.

        Why here: the schedule needs ``max_steps``, which the Trainer computes only inside ``train()`` (so
        ``Trainer(optimizers=(optimizer, scheduler))`` cannot know it), and the Trainer builds its scheduler
        lazily through ``create_scheduler(num_training_steps)``, the hook it documents for custom schedules.
        ``attach`` overrides that method on this ``trainer`` instance rather than asking for a Trainer subclass,
        so it works with any Trainer (``Seq2SeqTrainer``, your own subclass) and with ``resume_from_checkpoint``,
        which restores the scheduler's position after ``create_scheduler`` has built it.
        """
        tuner = _mimi_tuner(trainer.model)
        if _tolerance(tuner, kwargs.get("adapter_name")) is not None and trainer.eval_dataset is None:
            raise ValueError(
                "MiMiConfig.budget_tolerance chooses among the rounds on validation accuracy, but this Trainer has no "
                "eval_dataset. Hold out part of the training images (e.g. dataset.train_test_split(0.1, "
                "stratify_by_column='label')), never the test set, and pass it as eval_dataset with a compute_metrics "
                "that returns {'accuracy': ...}."
            )
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
                        "(e.g. 0.1; transformers 4.x: warmup_ratio=0.1), or pass warmup_ratio= to attach()."
                    )
            schedule.check_warmup_ratio(warmup_ratio)
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
            tuner = _mimi_tuner(trainer.model)
            cuts = self.plan(num_training_steps, _num_train_epochs(trainer, num_training_steps),
                             tuner.planned_rounds(self.adapter_name),
                             finish=_tolerance(tuner, self.adapter_name) is not None)
            boundaries = schedule.lr_boundaries(cuts, num_training_steps, restart_lr=True)
            trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or trainer.optimizer,
                functools.partial(schedule.lr_factor, boundaries=boundaries, warmup_ratio=warmup_ratio))
            # as Trainer.create_scheduler does, so that a later train() builds a schedule for its own max_steps
            trainer._created_lr_scheduler = True
        return trainer.lr_scheduler

    def plan(self, max_steps: int, num_train_epochs: float, planned_rounds: int, finish: bool = False) -> list[int]:
        """Global steps after which a pruning round runs (`peft_mimi.schedule.cut_steps` with this callback's
        segment length); with ``finish`` (the budget search) then the step where the last round ends."""
        return schedule.cut_steps(max_steps, num_train_epochs, planned_rounds, epochs_per_round=self.epochs_per_round,
                                  steps_per_round=self.steps_per_round, finish=finish)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        tuner = _mimi_tuner(model)
        planned = tuner.planned_rounds(self.adapter_name)
        tolerance = _tolerance(tuner, self.adapter_name)
        self.search = schedule.BudgetSearch(tolerance) if tolerance is not None else None
        steps = self.plan(state.max_steps, state.num_train_epochs, planned, finish=self.search is not None)
        self.prune_steps, self.finish_step = steps[:planned], (steps[planned] if self.search is not None else None)
        self._chosen_state, self._segment_end = None, None
        # resume_from_checkpoint: the Trainer has loaded the masked adapter; realign the round counter with it
        config = tuner.peft_config[tuner._adapter(self.adapter_name)]
        config.rounds_done = sum(step <= state.global_step for step in self.prune_steps)
        if self.search is not None and state.global_step >= steps[0]:
            self._load_search(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
            if state.global_step >= self.finish_step:  # in the finish: the kept round's adapter
                config.rounds_done = self.search.chosen

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                    **kwargs):
        tuner = _mimi_tuner(model)
        if self.search is not None:
            if state.global_step in self.prune_steps or state.global_step == self.finish_step:
                self._segment_end = state.global_step  # on_evaluate records the segment, then prunes
                control.should_evaluate = True
            return control
        if state.global_step in self.prune_steps:
            self._prune(tuner, control)
        return control

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None,
                    model=None, **kwargs):
        if self._segment_end != state.global_step:  # an evaluation of the Trainer's own schedule
            return control
        self._segment_end = None
        tuner = _mimi_tuner(model)
        accuracy = (metrics or {}).get(self.validation_metric)
        if accuracy is None:
            raise ValueError(
                f"The budget search reads the validation accuracy from the Trainer's evaluation, "
                f"metrics[{self.validation_metric!r}], but the metrics are {sorted(metrics or {})}. Pass the Trainer a "
                "compute_metrics that returns {'accuracy': ...} (a fraction), or name the metric with "
                "MiMiPruningCallback(validation_metric=...)."
            )
        if self.search.record(tuner.live_params(self.adapter_name), accuracy):
            self._chosen_state = {name: tensor.detach().clone() for name, tensor in _adapter_state(model).items()}
        if state.global_step in self.prune_steps:
            self._prune(tuner, control)
        else:  # the last round's segment: the search is over, the kept round's adapter trains the rest of the run
            self._restore_chosen(model, tuner)
            self._pending_logs = {"mimi/round": self.search.chosen, "mimi/live_params": tuner.live_params(
                self.adapter_name)}
            control.should_log = True
        self._pending_logs.update({"mimi/validation_accuracy": float(accuracy),
                                   "mimi/chosen_round": self.search.chosen})
        return control

    def _restore_chosen(self, model, tuner: MiMiModel) -> None:
        """Budget search: back to the chosen segment's adapter (weights, masks, head and ``rounds_done``)."""
        own = _adapter_state(model)
        with torch.no_grad():
            for name, tensor in self._chosen_state.items():
                own[name].copy_(tensor)
        adapter = tuner._adapter(self.adapter_name)
        for _, layer in tuner._layers(adapter):
            layer.refresh_mask_state(adapter)
        tuner.peft_config[adapter].rounds_done = self.search.chosen

    def _prune(self, tuner: MiMiModel, control: TrainerControl) -> None:
        """One pruning round (masking); its metrics go out with the next log."""
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

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending_logs)
            self._pending_logs = {}
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Budget search: its state goes into the checkpoint the Trainer has just written."""
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.search is not None and self.search.sizes and state.is_world_process_zero and os.path.isdir(directory):
            save_file({name: tensor.contiguous() for name, tensor in self._chosen_state.items()},
                      os.path.join(directory, SEARCH_FILE),
                      metadata={"sizes": ",".join(map(str, self.search.sizes)),
                                "accuracies": ",".join(map(repr, self.search.accuracies)),
                                "chosen_round": str(self.search.chosen)})
        return control

    def _load_search(self, directory: str) -> None:
        from safetensors import safe_open

        path = os.path.join(directory, SEARCH_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"Cannot continue the budget search: {path} is missing. Resume from a checkpoint that a Trainer "
                "with MiMiPruningCallback wrote in its output_dir (the search's state is saved in each one)."
            )
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata()
        self.search.sizes = [int(v) for v in metadata["sizes"].split(",")]
        self.search.accuracies = [float(v) for v in metadata["accuracies"].split(",")]
        self.search.chosen = int(metadata["chosen_round"])
        self._chosen_state = load_file(path)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                     **kwargs):
        tuner = _mimi_tuner(model)
        if self._chosen_state is not None and state.global_step < self.finish_step:  # stopped before the search
            self._restore_chosen(model, tuner)  # was over: the adapter it chose so far
        tuner.compact(self.adapter_name)
        return control


def _tolerance(tuner: MiMiModel, adapter_name: str | None) -> float | None:
    """``MiMiConfig.budget_tolerance`` of the adapter: None when there is no budget search."""
    return tuner.peft_config[tuner._adapter(adapter_name)].budget_tolerance


def _adapter_state(model) -> dict[str, torch.Tensor]:
    """The tensors that make a masked MiMi model's trained state: its trainable parameters (adapters, head) and the
    neurons' masks (shapes do not change while the callback prunes, so this state can be copied back in place)."""
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b for name, b in model.named_buffers() if ".mimi_mask." in name})
    return state


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


__all__ = ["MiMiPruningCallback"]
