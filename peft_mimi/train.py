"""The training loop of peft_mimi: MiMi's schedule (train, prune, train, ..., prune, train; docs/method.md,
section 4) with `accelerate`, and the same loop, without pruning rounds, for any other classifier.

:func:`train` takes a model and a dataset, as objects or by name, and a :class:`TrainingRecipe`:

* ``model``: a ``PeftModel`` with a MiMi adapter (pruned round by round), any other PEFT model or plain
  classifier with its trainable parameters set (one round, no pruning: the baselines of the benchmarks), or a
  backbone name (built-in, local directory, Hub id), which is loaded with a fresh head for the dataset's labels
  and wrapped with ``mimi`` (a :class:`~peft_mimi.MiMiConfig`);
* ``data``: a ``datasets.DatasetDict`` with ``"train"`` and ``"test"`` splits (columns ``image`` and ``label``,
  see :func:`peft_mimi.data.load_image_dataset`) or a name that function resolves.

For every round ``r = 0..R`` it trains the epochs `peft_mimi.schedule` plans, measures test accuracy and, except
after the last round, runs one pruning round that physically shrinks the adapters (so the next round is cheaper)
and continues with an optimizer for the shrunk adapters that keeps AdamW's moments of the surviving neurons; the
learning rate follows the schedule's warm-up + cosine over the whole run (or restarted at every cut). With the
budget search (``MiMiConfig.budget_tolerance``) the rounds train alike and are measured on a validation split;
after the last one the kept round's adapter comes back and trains the rest of the run (the finish). It runs
unchanged on one CPU or under ``accelerate launch`` (every process applies rank 0's pruning decision; only the main
process writes files). The CLI (``peft-mimi train``), ``make demo``, ``examples/``
and every benchmark train through it. The other modules of a run: `peft_mimi.recipe` (the settings),
`peft_mimi.schedule` (when), `peft_mimi.run` (model, data and output files), `peft_mimi.checkpoint` (resume and the
output directory's lock), `peft_mimi.evaluate` (accuracy, a saved adapter loaded back).

The output directory holds::

    metrics.jsonl                 one JSON line per round (round, epoch, widths, live_params, budget, ...)
    adapter/                      the final adapter: adapter_model.safetensors (live neurons only),
                                  adapter_config.json (widths, rounds_done, base model), README.md (model
                                  card), preprocessor_config.json and mimi_run.json (labels, settings, metrics);
                                  a model that is not a PEFT model is saved whole, with save_pretrained
    checkpoints/ckpt-NNNNN/       the latest checkpoint: trainable tensors, widths, optimizer, scheduler, RNG
                                  states, position

``resume=True`` continues from the latest checkpoint and, with the same settings and the same number of processes,
ends where an uninterrupted run ends.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel
from torch import nn

from . import checkpoint as ckpt
from . import run as run_files
from . import schedule
from .card import saved_round
from .config import MiMiConfig
from .evaluate import evaluate
from .progress import Progress, quiet_library_bars
from .recipe import TrainingRecipe

__all__ = ["TrainResult", "TrainingRecipe", "build_optimizer", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the saved model's test accuracy, widths (MiMi only) and parameter counts, the
    per-round history, paths, and the trained model (in eval mode, the same as the saved one). With budget search
    the saved model is the chosen round's adapter after its finish (the last row of the history)."""

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

    Raises ``FileExistsError`` when ``output_dir`` already holds a run and ``resume`` is False
    (``OutputDirectoryBusy`` while another live run writes it), ``ValueError`` for bad settings or a checkpoint made
    with other settings, ``FloatingPointError`` when the loss becomes NaN or infinite (the last good checkpoint is
    kept).
    """
    recipe = recipe if recipe is not None else TrainingRecipe()
    if not isinstance(recipe, TrainingRecipe):
        raise TypeError(f"recipe must be a TrainingRecipe, got {type(recipe).__name__}.")
    accelerator = Accelerator(gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                              mixed_precision=recipe.mixed_precision)
    output_dir = Path(output_dir)
    # one lock per run: the global main process takes it (every node's local main would refuse the second node)
    with ckpt.RunLock(output_dir, accelerator.is_main_process), quiet_library_bars():
        return _train(model, data, output_dir, recipe, mimi, processor, resume, push_to_hub, accelerator)


def _train(model, data, output_dir: Path, recipe: TrainingRecipe, mimi, processor, resume: bool,
           push_to_hub: str | None, accelerator: Accelerator) -> TrainResult:
    checkpoint = ckpt.find_run(output_dir, resume)
    run = run_files.load_run(model, data, recipe, mimi, processor, checkpoint, accelerator)
    peft_model, tuner, pos = run.model, run.tuner, run.position
    eval_loader = accelerator.prepare(run.eval_loader)
    validation_loader = accelerator.prepare(run.validation_loader) if run.validation_loader is not None else None
    validation_images = len(run.validation_loader.dataset) if run.validation_loader is not None else None
    # optimizer steps per epoch on each process (every epoch has the same number of batches)
    steps_per_epoch = math.ceil(len(accelerator.prepare(run.epoch_loader(0, 0))) / recipe.gradient_accumulation_steps)
    epochs = recipe.segment_epochs(pos.total_rounds, finish=pos.finish)
    # scheduler steps (accelerate steps the schedule once per process and optimizer step) where each segment starts;
    # the learning rate restarts at every cut with restart_lr, and at the budget search's finish always (a fresh
    # optimizer for the kept adapter)
    starts = [steps_per_epoch * accelerator.num_processes * sum(epochs[:r]) for r in range(len(epochs) + 1)]
    restarts = starts[1:-1] if recipe.restart_lr else starts[-2:-1] if pos.finish else []
    lr_factor = functools.partial(schedule.lr_factor, warmup_ratio=recipe.warmup_ratio,
                                  boundaries=schedule.lr_boundaries(restarts, starts[-1], restart_lr=True))
    progress = Progress(total=sum(epochs) * steps_per_epoch, initial=pos.global_step,
                        enabled=accelerator.is_local_main_process, desc="MiMi" if tuner else "train")
    adaptive_lora = getattr(getattr(peft_model, "base_model", None), "update_and_allocate", None)  # AdaLoRA

    def round_optimizer(carried: dict[str, dict] | None = None):
        """The optimizer and schedule of round ``pos.round``, with the state ``carried`` across the last cut."""
        optimizer = build_optimizer(peft_model, lr=recipe.lr, head_lr=recipe.head_lr, weight_decay=recipe.weight_decay)
        if carried:
            _install_state(optimizer, peft_model, carried)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor, last_epoch=starts[pos.round] - 1)
        return accelerator.prepare(peft_model, optimizer, scheduler)

    model, optimizer, scheduler = round_optimizer()
    if checkpoint is not None:  # a resumed run continues the saved optimizer and schedule
        ckpt.load_optimizer_state(checkpoint, optimizer, scheduler)
    while not pos.finished:  # round r trains at the widths left by r pruning rounds (then the search's finish)
        started = time.perf_counter() - pos.seconds
        for epoch in range(pos.epoch, epochs[pos.round]):
            loader = accelerator.prepare(run.epoch_loader(pos.round, epoch))
            set_seed(run_files.seed_of(recipe.seed, pos.round, epoch), device_specific=True)  # dropout, global RNG
            if checkpoint is not None and pos.batch > 0:  # resume inside this epoch where the checkpoint stopped
                ckpt.load_rng_state(checkpoint, accelerator)
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
                    progress.step(_stage(pos), mean_loss, scheduler.get_last_lr()[0])
                    if recipe.checkpoint_every_steps and pos.global_step % recipe.checkpoint_every_steps == 0:
                        pos.epoch, pos.seconds = epoch, time.perf_counter() - started
                        ckpt.save_checkpoint(accelerator, output_dir, peft_model, tuner, optimizer, scheduler, pos,
                                             run.settings, run.chosen_state)
            pos.end_epoch()
            pos.epoch, pos.batch = epoch + 1, 0
        checkpoint = None
        accuracy = evaluate(model, eval_loader, accelerator, **run.forward_kwargs)
        validation = (evaluate(model, validation_loader, accelerator, **run.forward_kwargs)
                      if validation_loader is not None else None)
        row = run_files.round_metrics(peft_model, tuner, pos, accuracy, validation, time.perf_counter() - started,
                                      sum(epochs[: pos.round + 1]), validation_images)
        pos.history.append(row)
        if pos.finishing:
            row["chosen_round"] = run.search.chosen
        elif run.search is not None:  # budget search: choose among the rounds on validation accuracy only
            if run.search.record(row["live_params"], validation):
                run.chosen_state = ckpt.trainable_tensors(accelerator.unwrap_model(model))
            row["chosen_round"] = run.search.chosen
        if accelerator.is_local_main_process:
            progress.write(_round_line(row, pos.total_rounds, tuner))
        carried = None
        if pos.round < pos.total_rounds:  # prune: the next round trains a smaller model
            peft_model = _unprepared(accelerator, model)
            carried = _cut(peft_model, tuner, optimizer)
            accelerator.free_memory()
        elif pos.finish and not pos.finishing:  # the search is over: back to the kept round's adapter to finish it
            peft_model = _unprepared(accelerator, model)
            kept = pos.history[run.search.chosen]
            ckpt.set_trainable(peft_model, tuner, kept["widths"], kept["round"], run.chosen_state, "the budget search")
            accelerator.free_memory()
        pos.end_round()
        if not pos.finished:  # the next round's optimizer: AdamW's moments of the surviving neurons carried over
            model, optimizer, scheduler = round_optimizer(carried)
        run_files.write_metrics(accelerator, output_dir, pos.history)
        ckpt.save_checkpoint(accelerator, output_dir, peft_model, tuner, None if pos.finished else optimizer,
                             None if pos.finished else scheduler, pos, run.settings, run.chosen_state)
    progress.close()

    peft_model = _unprepared(accelerator, peft_model)
    saved = saved_round(pos.history)
    adapter_dir = run_files.save_adapter(accelerator, output_dir, peft_model, run, pos.history, push_to_hub)
    hub_url = run_files.push_to_hub(accelerator, adapter_dir, push_to_hub, saved) if push_to_hub else None
    return TrainResult(
        accuracy=saved["accuracy"], widths=tuner.adapter_widths() if tuner else None,
        live_params=saved["live_params"], budget=tuner.budget() if tuner else None,
        rounds=saved["round"], history=pos.history, output_dir=output_dir, adapter_dir=adapter_dir,
        hub_url=hub_url, model=peft_model.eval(), validation_accuracy=saved["validation_accuracy"],
        chosen_round=saved.get("chosen_round"),
    )


def _unprepared(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """``model`` without what ``accelerator.prepare`` added (the mixed-precision forward, a DDP wrapper), so that
    preparing it again adds them again: accelerate returns a model it has already prepared unchanged, which after a
    cut would train the remaining rounds without mixed precision (and a model returned by `train` and trained
    again the same way)."""
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.__dict__.pop("_is_accelerate_prepared", None)
    return model


def _cut(peft_model: nn.Module, tuner, optimizer) -> dict[str, dict]:
    """One pruning round that physically shrinks the adapters; returns the optimizer's per-parameter state by
    parameter name, cut like the parameters (rows of ``mimi_down``, columns of ``mimi_up``), so the next round's
    optimizer continues with the moments the surviving neurons had (a fresh AdamW would take a step of the full
    learning rate on every weight, head included, and undo part of what was learned; the Trainer's callback masks
    neurons and keeps its optimizer, so it continues the same way)."""
    names = {p: name for name, p in peft_model.named_parameters()}
    state = getattr(optimizer, "optimizer", optimizer).state  # accelerate's wrapper holds torch's optimizer
    before = {names[p]: s for p, s in state.items() if p in names}
    tuner.prune_round(compact=False)  # masks only: which neurons survive is still visible
    adapter = tuner.active_adapters[0]
    kept: dict[str, tuple[int, torch.Tensor]] = {}
    for _, layer in tuner._layers(adapter):
        if layer.physical_width(adapter) == 0:
            continue
        keep = layer.mimi_mask[adapter].nonzero().flatten()
        down, up = layer.mimi_down[adapter], layer.mimi_up[adapter]
        kept[names[down.weight]], kept[names[up.weight]] = (0, keep), (1, keep)
        if down.bias is not None:
            kept[names[down.bias]] = (0, keep)
    tuner.compact()
    return {name: {key: value.index_select(kept[name][0], kept[name][1].to(value.device))
                   if name in kept and torch.is_tensor(value) and value.ndim > 0 else value
                   for key, value in s.items()}
            for name, s in before.items()}


def _install_state(optimizer: torch.optim.Optimizer, model: nn.Module, carried: dict[str, dict]) -> None:
    """Give ``optimizer``'s parameters the state ``carried`` names for them (parameters of removed adapters are
    gone; parameters without a carried state start afresh)."""
    for name, p in model.named_parameters():
        if p.requires_grad and name in carried:
            moments = carried[name]
            if any(torch.is_tensor(v) and v.ndim > 0 and v.shape != p.shape for v in moments.values()):
                raise RuntimeError(f"the optimizer state carried for {name} does not fit its shape {tuple(p.shape)}")
            optimizer.state[p] = moments


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, head_lr: float | None = None
                    ) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999) over the trainable parameters, weight decay on matrices only (none on biases and
    1-D weights), peak ``lr`` (``head_lr`` for the classification head when given). Every group records its peak
    as ``initial_lr``, which a learning-rate scheduler that starts past step 0 scales from."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters: every adapter was removed and there is no head. "
                         "Use a larger budget (target_compression / target_params).")
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    heads = set(run_files.head_modules(base, required=False))
    groups = []
    for is_head in (False, True):
        chosen = [p for name, p in trainable if bool(heads & set(name.split("."))) == is_head]
        rate = head_lr if is_head and head_lr is not None else lr
        groups += [{"params": [p for p in chosen if p.ndim >= 2], "weight_decay": weight_decay, "lr": rate},
                   {"params": [p for p in chosen if p.ndim < 2], "weight_decay": 0.0, "lr": rate}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def _stage(pos: ckpt.Position) -> str:
    return f"finishing round {pos.rounds_done}" if pos.finishing else f"round {pos.round}/{pos.total_rounds}"


def _round_line(row: dict[str, Any], rounds: int, tuner) -> str:
    size = (f"{row['live_params']:,} adapter parameters (budget {row['budget']:,})" if tuner
            else f"{row['live_params']:,} trainable parameters")
    checked = "" if row["validation_accuracy"] is None else f", validation {row['validation_accuracy']:.4f}"
    if row.get("finish"):
        return f"round {row['round']} finished: accuracy {row['accuracy']:.4f}{checked}, {size}"
    search = "" if row["chosen_round"] is None else f"; keeping round {row['chosen_round']}"
    return f"round {row['round']}/{rounds}: accuracy {row['accuracy']:.4f}{checked}, {size}{search}"


def _mean_finite_loss(accelerator: Accelerator, loss: torch.Tensor, pos: ckpt.Position, epoch: int,
                      output_dir: Path) -> float:
    """The mean of ``loss`` over processes if it is finite; otherwise stop every process with the same error."""
    mean = accelerator.reduce(loss.detach().float(), reduction="mean")
    if not torch.isfinite(mean):
        last = ckpt.latest_checkpoint(output_dir)
        raise FloatingPointError(
            f"The training loss became {float(mean)} in round {pos.round}, epoch {epoch}, batch {pos.batch} "
            f"(optimizer step {pos.global_step}); training stopped. "
            + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
            + "Lower the learning rate (lr / --lr), use mixed_precision='no', or check the data, and start a new "
            "run in a new output directory."
        )
    return float(mean)
