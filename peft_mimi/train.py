"""The one training loop of peft_mimi: MiMi's schedule (train, prune, train, ..., prune, train; METHOD.md section
4) with `accelerate`, and the same loop, without pruning rounds, for any other classifier.

:func:`train` takes a model and a dataset, as objects or by name, and a :class:`TrainingRecipe`:

* ``model``: a ``PeftModel`` with a MiMi adapter (pruned round by round), any other PEFT model or plain
  classifier with its trainable parameters set (one round, no pruning: the baselines of the benchmarks), or a
  backbone name (built-in, local directory, Hub id), which is loaded with a fresh head for the dataset's labels
  and wrapped with ``mimi`` (a :class:`~peft_mimi.MiMiConfig`);
* ``data``: a ``datasets.DatasetDict`` with ``"train"`` and ``"test"`` splits (columns ``image`` and ``label``,
  see :func:`peft_mimi.data.load_image_dataset`) or a name that function resolves.

For every round ``r = 0..R`` it trains (by default one epoch in each of the ``R`` pruning rounds, and the rest of
``2·(R+1)`` epochs, the paper's length, after the last cut), measures test accuracy and, except after the last
round, runs one pruning round that physically shrinks the adapters (so the next round is cheaper) and rebuilds the
optimizer, which continues one warm-up + cosine schedule over the whole run (``TrainingRecipe(restart_lr=True)``:
the paper's restart of the schedule at every round; ``epochs_per_round=2`` with it is the paper's recipe). It runs
unchanged on one CPU or under ``accelerate launch`` (every process applies rank 0's pruning decision; only the
main process writes files). The CLI (``peft-mimi train``), ``make demo``, ``examples/`` and every benchmark train
through it.

The output directory holds::

    metrics.jsonl                 one JSON line per round (round, epoch, widths, live_params, budget, ...)
    adapter/                      the final adapter: adapter_model.safetensors (live neurons only),
                                  adapter_config.json (widths, rounds_done, base model), README.md (model
                                  card), preprocessor_config.json and mimi_run.json (labels, settings, metrics);
                                  a model that is not a PEFT model is saved whole, with save_pretrained
    checkpoints/ckpt-NNNNN/       the latest checkpoint: trainable tensors, widths, optimizer, scheduler, RNG
                                  states, position

Checkpoints are written to a temporary directory, synced and renamed into place, so a crash at any moment
leaves the previous complete checkpoint. They hold only the trainable tensors (about 1 MB for DINOv2-S with
MiMi; ``accelerate``'s ``save_state`` would write the whole model, 88 MB, at every checkpoint), so they are
written by hand with ``accelerate``'s process helpers. ``resume=True`` continues from the latest one and, with
the same settings and the same number of processes, ends where an uninterrupted run ends: data order depends
only on ``(seed, round, epoch)``, already-done batches of the interrupted epoch are skipped, and RNG states are
restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .backbones import load_backbone
from .card import model_card, saved_round
from .config import MiMiConfig
from .data import (
    BUILTIN_DATASETS,
    ImageTransform,
    balanced_subset,
    dataset_labels,
    load_image_dataset,
    make_collate_fn,
    processor_at_size,
)
from .files import publish_directory
from .model import MiMiModel
from .pruning import EPOCHS_PER_SEGMENT, budget_search
from .serving import RUN_FILE

__all__ = ["OutputDirectoryBusy", "TrainResult", "TrainingRecipe", "build_optimizer", "evaluate", "evaluate_adapter",
           "latest_checkpoint", "split_validation", "train"]

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT_FORMAT = 2
# settings added since checkpoints of this format were first written, with the behaviour those checkpoints had
_SETTINGS_ADDED = {"recipe.restart_lr": True}
# Chosen by benchmarks/lr_sweep.py (results/lr_sweep.md and results/lr_sweep_dinov2/lr_sweep.md): the peak AdamW
# learning rate for short schedules (2 epochs per round). On the Fashion-MNIST backbones 1e-2 is best, but it
# diverges on DINOv2-S (10 % on digits); 3e-3 is among the best on DINOv2-S. A 10x faster head gains 3 points on
# the tiny backbones but throws DINOv2-S's first steps to a loss of 8-10 (its features have a norm near 50), so
# the head trains at the same rate by default.
DEFAULT_LR = 3e-3
DEFAULT_HEAD_LR = None  # None: the head trains at `lr`
DEFAULT_VALIDATION_FRACTION = 0.1  # the budget search's validation split when the recipe names none


@dataclass
class TrainingRecipe:
    """How to train: epochs, batches, optimizer, schedule, preprocessing. Every field has a default that the
    project's own measurements chose for short schedules on small datasets (the paper's recipe is 100 epochs per
    round at ``lr = 5e-4 x batch / 512``, with mixup, cutmix and RandAugment)."""

    epochs_per_round: int = field(default=1, metadata={
        "help": "E: epochs trained before each pruning round (the paper's recipe: 2, with restart_lr)."})
    first_epochs: Optional[int] = field(default=None, metadata={
        "help": "Epochs trained before the first pruning round (default: epochs_per_round)."})
    final_epochs: Optional[int] = field(default=None, metadata={
        "help": f"Epochs trained after the last pruning round, at the final widths (default: what the rounds leave "
                f"of {EPOCHS_PER_SEGMENT}·(R+1) epochs, and at least epochs_per_round: R + 2 with E = 1, E with "
                f"E >= {EPOCHS_PER_SEGMENT}; a model without pruning rounds trains E)."})
    batch_size: int = field(default=64, metadata={"help": "Images per batch on each process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    lr: float = field(default=DEFAULT_LR, metadata={"help": "Peak learning rate of AdamW (adapters, and the head "
                                                            "unless head_lr is given)."})
    head_lr: Optional[float] = field(default=DEFAULT_HEAD_LR, metadata={
        "help": "Peak learning rate of the classification head (None: the same as lr)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on biases and 1-D "
                                                                "weights)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Linear warm-up, as a fraction of the whole run's "
                                                               "steps (of each round's with restart_lr); then "
                                                               "cosine decay to 0."})
    restart_lr: bool = field(default=False, metadata={
        "help": "Restart the warm-up + cosine schedule at every round (the paper's recipe). Default: one warm-up + "
                "cosine over the whole run, continued across the cuts (the optimizer is still rebuilt for the "
                "shrunk adapters), the schedule vanilla adapters get."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping (the paper's 5.0)."})
    image_size: Optional[int] = field(default=None, metadata={
        "help": "Train and evaluate at this size (default: the backbone's); resize and crop keep the image "
                "processor's ratio."})
    flip: Optional[bool] = field(default=None, metadata={
        "help": "Random horizontal flips in training (default: unless the built-in dataset forbids them)."})
    max_train_samples: Optional[int] = field(default=None, metadata={
        "help": "Train on a class-balanced random subset of this many images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={
        "help": "Evaluate on a class-balanced subset of this many images."})
    validation_fraction: Optional[float] = field(default=None, metadata={
        "help": "Hold out this fraction of the training images (stratified by class, seeded) as a validation split, "
                "measured after every round and never trained on; the test split is never used for choices. "
                f"Default: {DEFAULT_VALIDATION_FRACTION:g} when MiMiConfig.budget_tolerance is set, else no split."})
    seed: int = field(default=0, metadata={"help": "Seed of the head, the adapters, data order and augmentation."})
    mixed_precision: Optional[str] = field(default=None, metadata={
        "help": "'no', 'fp16' or 'bf16' (default: accelerate's configuration)."})
    checkpoint_every_steps: Optional[int] = field(default=None, metadata={
        "help": "Also checkpoint every N optimizer steps (always at the end of each round)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})

    def __post_init__(self) -> None:
        for name in ("epochs_per_round", "batch_size", "gradient_accumulation_steps"):
            _check_int(name, getattr(self, name), optional=False)
        for name in ("first_epochs", "final_epochs", "image_size", "max_train_samples", "max_eval_samples",
                     "checkpoint_every_steps"):
            _check_int(name, getattr(self, name), optional=True)
        for name in ("lr", "head_lr", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise ValueError(f"TrainingRecipe.{name} must be a number > 0, got {value!r}.")
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

    def epochs_in_round(self, round_: int, total_rounds: int) -> int:
        """Epochs trained in round ``round_`` of ``0..total_rounds``: ``first_epochs`` (round 0) or
        ``epochs_per_round`` before each cut; after the last cut ``final_epochs``, else what the earlier rounds leave
        of ``2·(R+1)`` epochs and at least ``epochs_per_round`` (a run without pruning rounds trains ``final_epochs``
        or ``epochs_per_round``)."""
        if round_ < total_rounds:
            return self.first_epochs if round_ == 0 and self.first_epochs else self.epochs_per_round
        if self.final_epochs or total_rounds == 0:
            return self.final_epochs or self.epochs_per_round
        earlier = sum(self.epochs_in_round(r, total_rounds) for r in range(total_rounds))
        return max(self.epochs_per_round, EPOCHS_PER_SEGMENT * (total_rounds + 1) - earlier)

    def segment_epochs(self, total_rounds: int) -> list[int]:
        """Epochs of every segment of a run with ``total_rounds`` pruning rounds (round 0, ..., the last)."""
        return [self.epochs_in_round(r, total_rounds) for r in range(total_rounds + 1)]

    def settings(self) -> dict[str, Any]:
        """The fields that decide what a run computes (a resumed run must use the same)."""
        skip = ("mixed_precision", "checkpoint_every_steps", "num_workers")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class TrainResult:
    """What :func:`train` returns: the saved model's test accuracy, widths (MiMi only) and parameter counts, the
    per-round history, paths, and the trained model (in eval mode, the same as the saved one). With budget search
    the saved model is the chosen round's, not necessarily the last one trained."""

    accuracy: float
    widths: dict[str, int] | None
    live_params: int  # MiMi: parameters of the live adapter neurons; other models: trainable parameters
    budget: int | None
    rounds: int  # pruning rounds behind the saved adapter
    history: list[dict[str, Any]]
    output_dir: Path
    adapter_dir: Path
    hub_url: str | None = None
    model: nn.Module | None = field(default=None, repr=False)
    validation_accuracy: float | None = None  # of the saved model, on the validation split (None: no split)
    chosen_round: int | None = None  # budget search: the round whose adapter was saved (None: no search)

    @property
    def seconds(self) -> float:
        """Training and evaluation time of every round (resumed runs included)."""
        return sum(row["seconds"] for row in self.history)


@dataclass
class _Position:
    """Where the schedule stands: the next batch to run is batch ``batch`` of epoch ``epoch`` of round ``round``
    (``batch`` counts this process's batches). Saved in every checkpoint."""

    total_rounds: int  # R: pruning rounds of the plan; rounds 0..R train
    round: int = 0
    epoch: int = 0
    batch: int = 0
    global_step: int = 0  # optimizer steps since the start of the run
    serial: int = 0  # number of the last checkpoint written
    loss_sum: float = 0.0  # training loss of the current round so far (mean over processes, summed over batches)
    loss_count: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of each finished epoch this round
    seconds: float = 0.0  # time spent in the current round before the last checkpoint
    finished: bool = False
    widths: dict[str, int] | None = None  # MiMi: physical widths of the checkpointed adapters
    history: list[dict[str, Any]] = field(default_factory=list)

    def add_batch(self, loss: float) -> None:
        self.batch, self.loss_sum, self.loss_count = self.batch + 1, self.loss_sum + loss, self.loss_count + 1
        self.epoch_loss_sum, self.epoch_loss_count = self.epoch_loss_sum + loss, self.epoch_loss_count + 1

    def end_epoch(self) -> None:
        self.epoch_losses.append(self.epoch_loss_sum / max(1, self.epoch_loss_count))
        self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0


def train(
    model: str | nn.Module,
    data: str | datasets.DatasetDict,
    output_dir: str | os.PathLike,
    recipe: TrainingRecipe | None = None,
    *,
    mimi: MiMiConfig | None = None,
    processor: Any = None,
    resume: bool = False,
    push_to_hub: str | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``recipe`` (defaults: :class:`TrainingRecipe`); write metrics,
    checkpoints and the final adapter under ``output_dir`` (layout in the module docstring); return a
    :class:`TrainResult`.

    ``model`` given by name is loaded with a fresh head for the dataset's labels and wrapped with ``mimi``
    (default: ``MiMiConfig()``, σt = 32). A model object is trained as it is; ``processor`` (its image
    processor) is then required. ``push_to_hub`` names a Hub repository to upload the adapter folder to, with
    the token huggingface_hub finds (never written to disk).

    Raises ``FileExistsError`` when ``output_dir`` already holds a run and ``resume`` is False, ``ValueError`` for
    bad settings or a checkpoint made with other settings, ``FloatingPointError`` when the loss becomes NaN or
    infinite (the last good checkpoint is kept).
    """
    recipe = recipe if recipe is not None else TrainingRecipe()
    if not isinstance(recipe, TrainingRecipe):
        raise TypeError(f"recipe must be a TrainingRecipe, got {type(recipe).__name__}.")
    accelerator = Accelerator(gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                              mixed_precision=recipe.mixed_precision)
    output_dir = Path(output_dir)
    with _RunLock(output_dir, accelerator.is_local_main_process), _quiet_library_bars():
        return _train(model, data, output_dir, recipe, mimi, processor, resume, push_to_hub, accelerator)


@contextlib.contextmanager
def _quiet_library_bars() -> Iterator[None]:
    """transformers' own progress bars (loading and writing weights) off while standard error is not a terminal,
    so that a log file holds only readable lines; restored afterwards."""
    import sys

    from transformers.utils import logging as hf_logging

    quiet = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _train(model, data, output_dir: Path, recipe: TrainingRecipe, mimi, processor, resume: bool,
           push_to_hub: str | None, accelerator: Accelerator) -> TrainResult:
    checkpoint = _find_run(output_dir, resume)
    run = _load_run(model, data, recipe, mimi, processor, checkpoint, accelerator)
    peft_model, tuner, pos = run.model, run.tuner, run.position
    eval_loader = accelerator.prepare(run.eval_loader)
    validation_loader = accelerator.prepare(run.validation_loader) if run.validation_loader is not None else None
    # optimizer steps per epoch on each process (every epoch has the same number of batches)
    steps_per_epoch = math.ceil(len(accelerator.prepare(run.epoch_loader(0, 0))) / recipe.gradient_accumulation_steps)
    epochs = recipe.segment_epochs(pos.total_rounds)
    # scheduler steps of each round (accelerate steps the schedule once per process and optimizer step)
    round_steps = [steps_per_epoch * e * accelerator.num_processes for e in epochs]
    progress = _Progress(total=sum(epochs) * steps_per_epoch, initial=pos.global_step,
                         enabled=accelerator.is_local_main_process, desc="MiMi" if tuner else "train")
    adaptive_lora = getattr(getattr(peft_model, "base_model", None), "update_and_allocate", None)  # AdaLoRA

    while not pos.finished:  # round r trains at the widths left by r pruning rounds
        span, start = ((round_steps[pos.round], 0) if recipe.restart_lr
                       else (sum(round_steps), sum(round_steps[: pos.round])))  # one schedule, continued
        optimizer, scheduler = build_optimizer(
            peft_model, lr=recipe.lr, head_lr=recipe.head_lr, weight_decay=recipe.weight_decay,
            warmup_ratio=recipe.warmup_ratio, num_training_steps=span, start_step=start)
        model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)
        if checkpoint is not None:  # the first round of a resumed run continues the saved optimizer and schedule
            _load_optimizer_state(checkpoint, optimizer, scheduler)
        started = time.perf_counter() - pos.seconds
        for epoch in range(pos.epoch, epochs[pos.round]):
            loader = accelerator.prepare(run.epoch_loader(pos.round, epoch))
            set_seed(_seed(recipe.seed, pos.round, epoch), device_specific=True)  # dropout and other global RNG
            if checkpoint is not None and pos.batch > 0:  # resume inside this epoch where the checkpoint stopped
                _load_rng_state(checkpoint, accelerator)
                loader = accelerator.skip_first_batches(loader, pos.batch)
            checkpoint = None
            model.train()
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch, **run.forward_kwargs).loss
                    mean_loss = _mean_finite_loss(accelerator, loss, pos, epoch, output_dir)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    if adaptive_lora is not None and accelerator.sync_gradients:
                        adaptive_lora(pos.global_step)  # AdaLoRA's budget schedule: after step, before zero_grad
                    optimizer.zero_grad()
                pos.add_batch(mean_loss)
                if accelerator.sync_gradients:
                    pos.global_step += 1
                    progress.step(pos.round, pos.total_rounds, mean_loss, scheduler.get_last_lr()[0])
                    if recipe.checkpoint_every_steps and pos.global_step % recipe.checkpoint_every_steps == 0:
                        pos.epoch, pos.seconds = epoch, time.perf_counter() - started
                        _save_checkpoint(accelerator, output_dir, peft_model, optimizer, scheduler, pos, run)
            pos.end_epoch()
            pos.epoch, pos.batch = epoch + 1, 0
        checkpoint = None
        accuracy = evaluate(model, eval_loader, accelerator, **run.forward_kwargs)
        validation = (evaluate(model, validation_loader, accelerator, **run.forward_kwargs)
                      if validation_loader is not None else None)
        row = _round_metrics(peft_model, tuner, pos, accuracy, validation, time.perf_counter() - started,
                             sum(epochs[: pos.round + 1]))
        pos.history.append(row)
        if run.tolerance is not None:  # budget search: choose among the rounds on validation accuracy only
            chosen = budget_search([r["live_params"] for r in pos.history],
                                   [r["validation_accuracy"] for r in pos.history], run.tolerance)
            row["chosen_round"] = pos.history[chosen]["round"]
            if chosen == pos.round:  # the choice only ever stays or moves to the newest round: one copy suffices
                run.chosen_state = _trainable_tensors(accelerator.unwrap_model(model))
        if accelerator.is_local_main_process:
            size = (f"{row['live_params']:,} adapter parameters (budget {tuner.budget():,})" if tuner
                    else f"{row['live_params']:,} trainable parameters")
            checked = "" if validation is None else f", validation {validation:.4f}"
            search = "" if run.tolerance is None else f"; keeping round {row['chosen_round']}"
            progress.write(f"round {pos.round}/{pos.total_rounds}: accuracy {accuracy:.4f}{checked}, {size}{search}")
        if pos.round == pos.total_rounds:
            pos.finished = True
        else:  # prune, then the next round trains a smaller model with a fresh optimizer and schedule
            peft_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            tuner.prune_round(compact=True)
            accelerator.free_memory()
            pos.round, pos.epoch = pos.round + 1, 0
        pos.loss_sum, pos.loss_count, pos.seconds, pos.epoch_losses = 0.0, 0, 0.0, []
        _write_metrics(accelerator, output_dir, pos.history)
        _save_checkpoint(accelerator, output_dir, peft_model, None, None, pos, run)  # next round: new optimizer
    progress.close()

    peft_model = accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False)
    saved = saved_round(pos.history)
    if run.tolerance is not None:  # the smallest adapter within tolerance: its widths, rounds and weights
        _set_trainable(peft_model, tuner, saved["widths"], saved["round"], run.chosen_state, "the budget search")
    adapter_dir = _save_adapter(accelerator, output_dir, peft_model, run, pos.history, push_to_hub)
    hub_url = _push_to_hub(accelerator, adapter_dir, push_to_hub, saved) if push_to_hub else None
    return TrainResult(
        accuracy=saved["accuracy"], widths=tuner.adapter_widths() if tuner else None,
        live_params=saved["live_params"], budget=tuner.budget() if tuner else None,
        rounds=saved["round"], history=pos.history, output_dir=output_dir, adapter_dir=adapter_dir,
        hub_url=hub_url, model=peft_model.eval(), validation_accuracy=saved["validation_accuracy"],
        chosen_round=saved.get("chosen_round"),
    )


# ------------------------------------------------------------------------------------------------ building blocks
class _Progress:
    """Progress of the run: a tqdm bar on a terminal; when standard error is not a terminal (a log file, a job
    scheduler), a plain line every ``every_s`` seconds and at the end of every round, with round, optimizer step,
    loss and learning rate, instead of hundreds of carriage-return frames."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, every_s: float | None = None) -> None:
        import sys

        self.enabled, self.total, self.done, self.desc = enabled, total, initial, desc
        self.bar = tqdm(total=total, initial=initial, desc=desc) if enabled and sys.stderr.isatty() else None
        self.every_s = every_s if every_s is not None else float(os.environ.get("PEFT_MIMI_LOG_EVERY_S", 30))
        self.started = self.last = time.perf_counter()
        self.first = initial

    def step(self, round_: int, rounds: int, loss: float, lr: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(round=round_, loss=f"{loss:.4f}")
        elif self.enabled and (time.perf_counter() - self.last >= self.every_s or self.done == self.total):
            self.last = time.perf_counter()
            elapsed = self.last - self.started
            rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
            left = f", {(self.total - self.done) / rate:.0f} s left" if rate > 0 else ""
            self._print(f"{self.desc}: round {round_}/{rounds}, step {self.done}/{self.total}, loss {loss:.4f}, "
                        f"lr {lr:.3g}, {elapsed:.0f} s{left}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            self._print(text)

    @staticmethod
    def _print(text: str) -> None:
        import sys

        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class OutputDirectoryBusy(FileExistsError):
    """Another live run is writing to the output directory."""


class _RunLock:
    """An exclusive lock on ``output_dir/.lock`` for the whole run (main process only). The operating system
    releases it when the process ends, however it ends, so a crashed run never leaves it stuck and ``resume``
    works at once."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.path, self.enabled, self.file = output_dir / ".lock", enabled, None

    def __enter__(self) -> _RunLock:
        if not self.enabled:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # noqa: SIM115 (held open for the whole run)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise OutputDirectoryBusy(
                f"{self.path.parent} is being written by a live run ({owner}). Wait for it to finish, or choose "
                "another output directory.") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()  # releases the lock; the file stays (removing it would race a waiting run)



def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, warmup_ratio: float, num_training_steps: int,
    head_lr: float | None = None, start_step: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9, 0.999) over the trainable parameters, weight decay on matrices only (none on biases and
    1-D weights), peak ``lr`` (``head_lr`` for the classification head when given), and a cosine schedule with
    linear warm-up over ``num_training_steps`` scheduler steps, starting at step ``start_step`` of it (a schedule
    continued by a new optimizer)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters: every adapter was removed and there is no head. "
                         "Use a larger budget (target_compression / target_params).")
    heads = set(_head_modules(model.get_base_model() if isinstance(model, PeftModel) else model, required=False))
    groups = []
    for is_head in (False, True):
        chosen = [p for name, p in trainable if bool(heads & set(name.split("."))) == is_head]
        rate = head_lr if is_head and head_lr is not None else lr
        groups += [{"params": [p for p in chosen if p.ndim >= 2], "weight_decay": weight_decay, "lr": rate},
                   {"params": [p for p in chosen if p.ndim < 2], "weight_decay": 0.0, "lr": rate}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))
    warmup = math.floor(warmup_ratio * num_training_steps)
    for group in optimizer.param_groups:  # what a scheduler that starts past step 0 scales from
        group["initial_lr"] = group["lr"]
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, num_training_steps, last_epoch=start_step - 1)


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
    loader = DataLoader(test, batch_size=batch_size, collate_fn=make_collate_fn(transform, _num_labels(peft_model)))
    prepared, loader = accelerator.prepare(peft_model, loader)
    return evaluate(prepared, loader, accelerator, **_forward_kwargs(peft_model, transform))


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
    run = _read_json(adapter_dir / RUN_FILE) or {}
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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (None if there is none). Only complete
    checkpoints carry the ``ckpt-NNNNN`` name; leftovers of an interrupted write start with '.tmp-'."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = sorted(p for p in root.glob("ckpt-*") if p.is_dir()) if root.is_dir() else []
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------- the run itself
@dataclass
class _Run:
    model: nn.Module
    tuner: MiMiModel | None  # None: a model without pruning rounds
    processor: Any
    labels: list[str]
    position: _Position
    eval_loader: DataLoader
    forward_kwargs: dict[str, Any]
    train_set: Any
    collate: Any
    augment: ImageTransform
    recipe: TrainingRecipe
    settings: dict[str, Any]  # what decides the computation: a resumed run must match it
    data_name: str
    validation_loader: DataLoader | None = None  # the validation split carved from train (None: no split)
    tolerance: float | None = None  # budget search: MiMiConfig.budget_tolerance (None: prune to the budget)
    chosen_state: dict[str, torch.Tensor] | None = None  # budget search: trainable tensors of the chosen round

    def epoch_loader(self, round_: int, epoch: int) -> DataLoader:
        """The training batches of one epoch; order and augmentation depend only on ``(seed, round, epoch)``.

        The loader draws from its own generators, never from the global RNG, so that the global RNG (dropout)
        stays reproducible whatever the loader prefetches or skips."""
        seed = _seed(self.recipe.seed, round_, epoch)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        return DataLoader(_Indexed(self.train_set), batch_size=self.recipe.batch_size, sampler=order,
                          generator=generator, collate_fn=_SeededCollate(self.collate, self.augment, seed),
                          num_workers=self.recipe.num_workers)


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose items are ``(index, example)``, so that a batch knows which examples it holds."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.split[index]


@dataclass(frozen=True)
class _SeededCollate:
    """Collates ``(index, example)`` pairs after seeding the augmentation from the epoch seed and the batch's
    first example, so a batch comes out the same whether earlier batches ran, were prefetched, were skipped on
    resume or went to another DataLoader worker."""

    collate: Any
    augment: ImageTransform
    epoch_seed: int

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        indices, examples = zip(*items)
        self.augment.generator.manual_seed(_seed(self.epoch_seed, indices[0]))
        return self.collate(examples)


def _load_run(model: str | nn.Module, data: str | datasets.DatasetDict, recipe: TrainingRecipe,
              mimi: MiMiConfig | None, processor: Any, checkpoint: Path | None, accelerator: Accelerator) -> _Run:
    """Data, model and position: fresh, or as saved in ``checkpoint``."""
    dataset, data_name = _resolve_data(data)
    names, id2label, label2id = dataset_labels(dataset)
    set_seed(recipe.seed)  # the new head and W_down: the same on every process
    if isinstance(model, str | os.PathLike):
        mimi = mimi if mimi is not None else MiMiConfig()
        model_name = _model_reference(str(model))
        base, loaded_processor = load_backbone(model_name, num_labels=len(names), id2label=id2label,
                                               label2id=label2id)
        processor = processor if processor is not None else loaded_processor
        config = dataclasses.replace(mimi, modules_to_save=mimi.modules_to_save or _head_modules(base))
        model = get_peft_model(base, config)
        model.peft_config["default"].base_model_name_or_path = model_name
    else:
        if mimi is not None:
            raise ValueError("mimi=... configures a backbone given by name; a model object is trained as it is "
                             "(wrap it with get_peft_model(model, MiMiConfig(...)) first).")
        if processor is None:
            raise ValueError(f"Training a {type(model).__name__} object needs its image processor: pass "
                             "processor=... (e.g. AutoImageProcessor.from_pretrained(<backbone>)).")
        model_name = str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
        _check_head_size(model, len(names))
    tuner = model.base_model if isinstance(getattr(model, "base_model", None), MiMiModel) else None
    processor = processor_at_size(processor, recipe.image_size) if recipe.image_size else processor
    settings = {"model": model_name, "data": data_name, "recipe": recipe.settings(),
                "mimi": _mimi_settings(tuner) if tuner else None}
    if checkpoint is None:
        position = _Position(total_rounds=tuner.num_rounds() if tuner else 0)
    else:
        state = _read_json(checkpoint / "state.json")
        _check_checkpoint(state, settings, accelerator, checkpoint)
        position = _Position(**state["position"])
        _restore_trainable(model, tuner, position, checkpoint)
    tolerance = tuner.peft_config[tuner.active_adapters[0]].budget_tolerance if tuner else None
    flip = recipe.flip if recipe.flip is not None else getattr(BUILTIN_DATASETS.get(data_name), "flip_ok", True)
    augment = ImageTransform.from_processor(processor, train=True, flip=flip, seed=recipe.seed)
    eval_transform = ImageTransform.from_processor(processor, train=False)

    def eval_loader(split: Any) -> DataLoader:
        return DataLoader(split, batch_size=recipe.batch_size, collate_fn=make_collate_fn(eval_transform, len(names)),
                          num_workers=recipe.num_workers)

    train_set = balanced_subset(dataset["train"], recipe.max_train_samples, seed=recipe.seed)
    fraction = recipe.validation_fraction or (DEFAULT_VALIDATION_FRACTION if tolerance is not None else None)
    validation = None
    if fraction is not None:
        train_set, validation = split_validation(train_set, fraction, seed=recipe.seed)
    chosen = checkpoint / _CHOSEN_FILE if checkpoint is not None else None
    return _Run(
        model=model, tuner=tuner, processor=processor, labels=names, position=position,
        forward_kwargs=_forward_kwargs(model, eval_transform),
        eval_loader=eval_loader(balanced_subset(dataset["test"], recipe.max_eval_samples, seed=0)),
        train_set=train_set, collate=make_collate_fn(augment, len(names)), augment=augment, recipe=recipe,
        settings=settings, data_name=data_name,
        validation_loader=eval_loader(validation) if validation is not None else None, tolerance=tolerance,
        chosen_state=load_file(str(chosen)) if chosen is not None and chosen.is_file() else None,
    )


def split_validation(train: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, validation)``: ``fraction`` of the training images held out, stratified by class and seeded, so
    that choices (the budget search) never look at the test split. Every class with at least two images keeps
    some for training; raises ValueError when a class has a single image or the split cannot hold one per class."""
    try:
        parts = train.train_test_split(test_size=fraction, stratify_by_column="label", seed=seed, keep_in_memory=True)
    except ValueError as err:
        classes = len(set(train["label"]))
        raise ValueError(f"Cannot hold out {fraction:g} of {len(train)} training images as a validation split "
                         f"stratified over their {classes} classes ({err}). Each class needs two images or more, and "
                         "the split one per class: use more training images (max_train_samples) or another "
                         "validation_fraction.") from None
    return parts["train"], parts["test"]


def _resolve_data(data: str | datasets.DatasetDict) -> tuple[datasets.DatasetDict, str]:
    """``(dataset with "train" and "test" splits, its name)``; a DatasetDict is named by its fingerprints."""
    if isinstance(data, str | os.PathLike):
        return load_image_dataset(str(data)), str(data)
    if not isinstance(data, datasets.DatasetDict) or not {"train", "test"} <= set(data):
        raise ValueError(f"data must be a dataset name or a datasets.DatasetDict with 'train' and 'test' splits, got "
                         f"{type(data).__name__}{' with splits ' + str(list(data)) if hasattr(data, 'keys') else ''}."
                         " Use peft_mimi.data.load_image_dataset(...) to build one.")
    return data, "dataset:" + ",".join(getattr(data[split], "_fingerprint", "?") for split in ("train", "test"))


def _mimi_settings(tuner: MiMiModel) -> dict[str, Any]:
    config = tuner.peft_config[tuner.active_adapters[0]]
    return {name: getattr(config, name) for name in ("init_compression", "target_compression", "target_params",
                                                     "prune_ratio", "selection", "score", "reconstruct",
                                                     "activation", "adapter_bias", "init_weights",
                                                     "budget_tolerance")}


def _check_head_size(model: nn.Module, num_labels: int) -> None:
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if classes is not None and classes != num_labels:
        raise ValueError(f"The model's head classifies {classes} classes but the dataset has {num_labels}. Load the "
                         f"backbone with num_labels={num_labels} (load_backbone(name, num_labels=...)).")


def _mean_finite_loss(accelerator: Accelerator, loss: torch.Tensor, pos: _Position, epoch: int, output_dir: Path
                      ) -> float:
    """The mean of ``loss`` over processes if it is finite; otherwise stop every process with the same error."""
    mean = accelerator.reduce(loss.detach().float(), reduction="mean")
    if not torch.isfinite(mean):
        last = latest_checkpoint(output_dir)
        raise FloatingPointError(
            f"The training loss became {float(mean)} in round {pos.round}, epoch {epoch}, batch {pos.batch} "
            f"(optimizer step {pos.global_step}); training stopped. "
            + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
            + "Lower the learning rate (lr / --lr), use mixed_precision='no', or check the data, and start a new "
            "run in a new output directory."
        )
    return float(mean)


def _round_metrics(model: nn.Module, tuner: MiMiModel | None, pos: _Position, accuracy: float,
                   validation: float | None, seconds: float, epochs_so_far: int) -> dict[str, Any]:
    widths = tuner.adapter_widths() if tuner else None
    return {
        "round": pos.round,
        "epoch": epochs_so_far,  # epochs trained so far, this round included
        "global_step": pos.global_step,
        "widths": widths,
        "adapters_kept": sum(w > 0 for w in widths.values()) if tuner else None,
        "live_params": tuner.live_params() if tuner else sum(p.numel() for p in model.parameters()
                                                                 if p.requires_grad),
        "budget": tuner.budget() if tuner else None,
        "accuracy": accuracy,  # on the test split
        "validation_accuracy": validation,  # on the validation split carved from train (None: no split)
        "chosen_round": None,  # budget search: the round it keeps so far
        "loss": pos.loss_sum / pos.loss_count if pos.loss_count else None,
        "epoch_losses": list(pos.epoch_losses),
        "seconds": round(seconds, 3),
    }


# -------------------------------------------------------------------------------------------- files and resuming
def _find_run(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from (None: start fresh); refuses to overwrite a run unless resuming."""
    checkpoint = latest_checkpoint(output_dir)
    if resume:
        return checkpoint  # nothing to resume from: start fresh, which is what an interrupted-early run needs
    if checkpoint is not None or (output_dir / ADAPTER_DIR).exists():
        raise FileExistsError(
            f"{output_dir} already holds a MiMi run ({checkpoint or output_dir / ADAPTER_DIR}). Pass resume=True "
            "(--resume) to continue it, or choose another output directory."
        )
    return None


def _check_checkpoint(state: dict | None, settings: dict[str, Any], accelerator: Accelerator, path: Path) -> None:
    if not state or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint this version of peft_mimi can read (state.json missing or of "
                         "another format). Start a new run in a new output directory.")
    saved = {**_SETTINGS_ADDED, **_flatten(state["settings"])}
    now = _flatten(json.loads(json.dumps(settings)))
    different = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if different:
        listed = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in different.items())
        raise ValueError(f"Cannot resume {path}: it was made with other settings ({listed}). Pass the same "
                         "settings, or start a new run in a new output directory.")
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"Cannot resume {path}: it was made with {state['num_processes']} process(es), this run has "
                         f"{accelerator.num_processes}. Launch with --num_processes {state['num_processes']}.")


def _save_checkpoint(
    accelerator: Accelerator, output_dir: Path, model: nn.Module, optimizer, scheduler, pos: _Position, run: _Run,
) -> None:
    """Write checkpoint ``ckpt-<serial>`` atomically (temporary directory, fsync, rename), then delete older
    ones. Every process saves its own RNG state; the main process writes the rest: the trainable tensors, the
    adapters' widths (in ``state.json``), optimizer and scheduler, and the budget search's chosen adapter (its
    widths and round are in the history). At a round boundary there is no ``optimizer``
    or ``scheduler`` to save: the next round builds new ones for the pruned adapters."""
    pos.serial += 1
    root = output_dir / CHECKPOINT_DIR
    tmp, final = root / f".tmp-ckpt-{pos.serial:05d}", root / f"ckpt-{pos.serial:05d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        pos.widths = _physical_widths(run.tuner)
        save_file(_trainable_tensors(unwrapped), str(tmp / _TRAINABLE_FILE))
        if run.chosen_state is not None:  # budget search: the adapter it keeps so far
            save_file(run.chosen_state, str(tmp / _CHOSEN_FILE))
        statistics = _round_statistics(run.tuner) if run.tuner is not None and optimizer is not None else {}
        if statistics:  # mid-round, with a data-aware score or reconstruct: what the next cut will use
            save_file(statistics, str(tmp / _STATISTICS_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_json(tmp / "state.json", {"format": _CHECKPOINT_FORMAT, "settings": run.settings,
                                         "num_processes": accelerator.num_processes,
                                         "position": dataclasses.asdict(pos)})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_directory(tmp, final)
        for old in root.iterdir():
            if old != final and (old.name.startswith("ckpt-") or old.name.startswith(".tmp-ckpt-")):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


_TRAINABLE_FILE = "trainable.safetensors"
_CHOSEN_FILE = "chosen.safetensors"
_STATISTICS_FILE = "round_statistics.safetensors"


def _round_statistics(tuner: MiMiModel) -> dict[str, torch.Tensor]:
    """``{"<module>::<statistic>": tensor}``: every layer's data-aware statistics of the current round."""
    adapter = tuner.active_adapters[0]
    return {f"{name}::{key}": value.detach().cpu().contiguous() for name, layer in tuner._layers(adapter)
            for key, value in layer.round_statistics(adapter).items()}


def _physical_widths(tuner: MiMiModel | None) -> dict[str, int] | None:
    if tuner is None:
        return None
    adapter = tuner.active_adapters[0]
    return {name: layer.physical_width(adapter) for name, layer in tuner._layers(adapter)}


def _trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}``: a CPU copy of every trainable parameter (adapters and head) of an unwrapped model."""
    return {name: p.detach().cpu().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _set_trainable(model: nn.Module, tuner: MiMiModel | None, widths: dict[str, int] | None, rounds_done: int,
                   tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Bring ``model`` to a saved state (mutates it): every adapter shrunk or rebuilt to its physical width in
    ``widths`` (its neurons are then overwritten), ``rounds_done`` recorded, and every trainable tensor copied from
    ``tensors`` (see :func:`_trainable_tensors`). ``source`` names where the state comes from, for errors."""
    if tuner is not None:
        adapter = tuner.active_adapters[0]
        config = tuner.peft_config[adapter]
        for name, layer in tuner._layers(adapter):
            width = widths[name]
            if width <= layer.live_width(adapter):
                layer.keep_neurons(adapter, torch.arange(layer.live_width(adapter)) < width)
            else:  # an earlier, wider state (budget search); the new neurons' random start must not move the RNG
                with torch.random.fork_rng(devices=[]):
                    layer.update_layer(adapter, width, init_weights=config.init_weights, activation=config.activation,
                                       bias=config.adapter_bias, score=config.score, reconstruct=config.reconstruct)
        config.rounds_done = rounds_done
        tuner._record_widths(adapter)
    params = dict(model.named_parameters())
    wanted = {name for name, p in params.items() if p.requires_grad}
    if set(tensors) != wanted:
        only_saved, only_model = sorted(set(tensors) - wanted)[:5], sorted(wanted - set(tensors))[:5]
        raise ValueError(f"Cannot restore {source}: its trainable tensors differ from the model's (only saved: "
                         f"{only_saved}, only in the model: {only_model}). Resume with the same model and settings.")
    for name, tensor in tensors.items():
        params[name].copy_(tensor)


@torch.no_grad()
def _restore_trainable(model: nn.Module, tuner: MiMiModel | None, pos: _Position, checkpoint: Path) -> None:
    """Bring a freshly built ``model`` to the checkpoint: the adapters at the saved widths, the rounds done, every
    trainable tensor and the round statistics of data-aware scores."""
    _set_trainable(model, tuner, pos.widths, pos.round, load_file(str(checkpoint / _TRAINABLE_FILE)), checkpoint)
    if tuner is not None and (checkpoint / _STATISTICS_FILE).is_file():
        adapter, layers = tuner.active_adapters[0], dict(tuner._layers(tuner.active_adapters[0]))
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(checkpoint / _STATISTICS_FILE)).items():
            module, statistic = key.split("::")
            grouped.setdefault(module, {})[statistic] = tensor.to(layers[module].get_base_layer().weight.device)
        for module, statistics in grouped.items():
            layers[module].load_round_statistics(adapter, statistics)


def _load_optimizer_state(checkpoint: Path, optimizer, scheduler) -> None:
    if not (checkpoint / "optimizer.pt").is_file():  # a round-boundary checkpoint: the round starts afresh
        return
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))


def _rng_state() -> dict[str, Any]:
    """This process's RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng_state(checkpoint: Path, accelerator: Accelerator) -> None:
    state = torch.load(checkpoint / f"rng-{accelerator.process_index}.pt", weights_only=True)
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_adapter(
    accelerator: Accelerator, output_dir: Path, peft_model: nn.Module, run: _Run, history: list[dict[str, Any]],
    repo_id: str | None,
) -> Path:
    """The final adapter (a model that is not a PEFT model: the whole model), its model card (MiMi), image
    processor and run summary in ``output_dir/adapter``, replaced atomically."""
    adapter_dir = output_dir / ADAPTER_DIR
    if accelerator.is_main_process:
        tmp = output_dir / f".tmp-{ADAPTER_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(peft_model, PeftModel):  # no embedding layers: skip PEFT's look-up of the base model's config
            peft_model.save_pretrained(tmp, save_embedding_layers=False)  # on the Hub (a warning offline)
        else:
            peft_model.save_pretrained(tmp)
        run.processor.save_pretrained(tmp)
        settings = run.settings
        _write_json(tmp / RUN_FILE, {"base_model": settings["model"], "data": settings["data"],
                                     "labels": run.labels, "settings": settings, "history": history})
        if run.tuner is not None:  # after save_pretrained, which writes PEFT's generic card
            card = model_card(peft_model, dataset=settings["data"], history=history, base_model=settings["model"],
                              repo_id=repo_id, num_labels=len(run.labels),
                              settings={**settings["recipe"], **settings["mimi"]})
            (tmp / "README.md").write_text(card)
        publish_directory(tmp, adapter_dir)
    accelerator.wait_for_everyone()
    return adapter_dir


def _push_to_hub(accelerator: Accelerator, adapter_dir: Path, repo_id: str, saved: dict[str, Any]) -> str | None:
    """Upload the adapter folder to the Hub model repository ``repo_id`` (created if missing); main process only."""
    url = None
    if accelerator.is_main_process:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(adapter_dir), repo_type="model",
            commit_message=f"MiMi adapter: accuracy {saved['accuracy']:.4f}, "
                           f"{saved['live_params']:,} adapter parameters",
        )
        url = str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
    accelerator.wait_for_everyone()
    return url


def _write_metrics(accelerator: Accelerator, output_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the history (so a resumed run never duplicates a line)."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / f".{METRICS_FILE}.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        os.replace(tmp, output_dir / METRICS_FILE)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------------------------- helpers
def _check_int(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TrainingRecipe.{name} must be an int >= 1{' (or None)' if optional else ''}, got "
                         f"{value!r}.")


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"recipe.lr": 0.002, ...}`` from nested settings, to name what differs."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _model_reference(model: str) -> str:
    """What the adapter config records as its base model: local directories as absolute paths (so that the
    adapter loads from anywhere), built-in names and Hub ids as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _seed(*keys: int) -> int:
    """A 32-bit seed derived from ``keys`` (e.g. seed, round, epoch): independent streams for distinct keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _head_modules(model: nn.Module, required: bool = True) -> list[str]:
    """The classification head(s) trained in full alongside the adapters."""
    heads = [name for name in ("classifier", "head", "fc") if isinstance(getattr(model, name, None), nn.Module)]
    if not heads and required:
        raise ValueError(f"Cannot find the classification head of {type(model).__name__} (looked for 'classifier', "
                         "'head', 'fc'). Load the backbone as an image classifier (AutoModelForImageClassification).")
    return heads[:1]


def _num_labels(peft_model: PeftModel) -> int | None:
    return getattr(getattr(peft_model, "config", None), "num_labels", None)


def _forward_kwargs(model: nn.Module, transform: ImageTransform) -> dict[str, Any]:
    """``{"interpolate_pos_encoding": True}`` when the images differ in size from what the model was pretrained
    on and its forward can interpolate position embeddings (ViT, DeiT, Swin); DINOv2 always interpolates."""
    pretrained = getattr(getattr(model, "config", None), "image_size", None)
    pretrained = (pretrained, pretrained) if isinstance(pretrained, int) else tuple(pretrained or ())
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    accepts = "interpolate_pos_encoding" in inspect.signature(base.forward).parameters
    return {"interpolate_pos_encoding": True} if accepts and pretrained and pretrained != transform.image_size else {}
