"""MiMi's whole schedule with `accelerate`: train, prune, train, ..., prune, train (METHOD.md section 4).

:func:`train` loads a backbone and an image dataset, wraps the backbone with MiMi adapters (the classification
head trains in full), then for every round ``r = 0..R`` trains ``epochs_per_round`` epochs, measures test
accuracy and, except after the last round, runs one pruning round that physically shrinks the adapters (so
the next round is cheaper) and rebuilds the optimizer and the learning-rate schedule. It runs unchanged on
one CPU or under ``accelerate launch`` (every process applies rank 0's pruning decision; only the main
process writes files).

The output directory holds::

    metrics.jsonl                 one JSON line per round (round, epoch, widths, live_params, budget, ...)
    adapter/                      the final adapter: adapter_model.safetensors (live neurons only),
                                  adapter_config.json (widths, rounds_done, base model), README.md (model
                                  card), preprocessor_config.json and mimi_run.json (labels, settings, metrics)
    checkpoints/ckpt-NNNNN/       the latest checkpoint: adapter, optimizer, scheduler, RNG states, position

Checkpoints are written to a temporary directory, synced and renamed into place, so a crash at any moment
leaves the previous complete checkpoint. ``resume=True`` continues from the latest one and, with the same
settings and the same number of processes, ends where an uninterrupted run ends: data order depends only on
``(seed, round, epoch)``, already-done batches of the interrupted epoch are skipped, and RNG states are restored.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .backbones import load_backbone
from .card import model_card
from .config import MiMiConfig
from .data import BUILTIN_DATASETS, ImageTransform, dataset_labels, load_image_dataset, make_collate_fn
from .files import publish_directory
from .serving import RUN_FILE

__all__ = ["TrainResult", "build_optimizer", "evaluate", "evaluate_adapter", "latest_checkpoint", "train"]

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides what a run computes; a resumed run must use the same settings."""

    model: str
    data: str
    target_compression: float | None
    target_params: int | None
    init_compression: float
    prune_ratio: float
    selection: str
    score: str
    epochs_per_round: int
    batch_size: int
    gradient_accumulation_steps: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    image_size: int | None
    flip: bool | None
    max_train_samples: int | None
    max_eval_samples: int | None
    seed: int


@dataclass
class TrainResult:
    """What :func:`train` returns: final accuracy and widths, parameter counts, the per-round history, paths, and
    the trained model (in eval mode, the same as the saved adapter)."""

    accuracy: float
    widths: dict[str, int]
    live_params: int
    budget: int
    rounds: int
    history: list[dict[str, Any]]
    output_dir: Path
    adapter_dir: Path
    hub_url: str | None = None
    model: PeftModel | None = field(default=None, repr=False)


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
    seconds: float = 0.0  # time spent in the current round before the last checkpoint
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def add_batch(self, loss: float) -> None:
        self.batch, self.loss_sum, self.loss_count = self.batch + 1, self.loss_sum + loss, self.loss_count + 1


def train(
    model: str,
    data: str,
    output_dir: str | os.PathLike,
    *,
    target_compression: float | None = None,
    target_params: int | None = None,
    init_compression: float = 4.0,
    prune_ratio: float = 0.5,
    selection: str = "global",
    score: str = "mimi",
    epochs_per_round: int = 2,
    batch_size: int = 64,
    gradient_accumulation_steps: int = 1,
    lr: float | None = None,
    weight_decay: float = 0.05,
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 5.0,
    image_size: int | None = None,
    flip: bool | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    mixed_precision: str | None = None,
    resume: bool = False,
    checkpoint_every_steps: int | None = None,
    push_to_hub: str | None = None,
    num_workers: int = 0,
) -> TrainResult:
    """Run MiMi's schedule on backbone ``model`` (a built-in name, a local directory or a Hub id) and dataset
    ``data`` (see :func:`peft_mimi.data.load_image_dataset`); write metrics, checkpoints and the final adapter
    under ``output_dir`` (layout in the module docstring) and return a :class:`TrainResult`.

    Give one budget: ``target_compression`` (σt) or ``target_params``. ``batch_size`` is per process;
    ``lr`` defaults to ``5e-4 * effective batch / 512`` (effective batch = batch_size x processes x
    gradient_accumulation_steps). ``flip`` (horizontal flips in training) defaults to the dataset's own setting.
    ``mixed_precision`` ("no", "fp16", "bf16") defaults to accelerate's configuration. ``push_to_hub`` names a
    Hub repository to upload the adapter folder to, with the token huggingface_hub finds (never written to disk).

    Raises ``FileExistsError`` when ``output_dir`` already holds a run and ``resume`` is False, ``ValueError`` for
    bad settings or a checkpoint made with other settings, ``FloatingPointError`` when the loss becomes NaN or
    infinite (the last good checkpoint is kept).
    """
    _check_arguments(epochs_per_round=epochs_per_round, batch_size=batch_size,
                     gradient_accumulation_steps=gradient_accumulation_steps, lr=lr,
                     checkpoint_every_steps=checkpoint_every_steps, max_train_samples=max_train_samples,
                     max_eval_samples=max_eval_samples, image_size=image_size, warmup_ratio=warmup_ratio)
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision)
    effective_batch = batch_size * gradient_accumulation_steps * accelerator.num_processes
    settings = TrainSettings(
        model=_model_reference(model), data=data, target_compression=target_compression,
        target_params=target_params, init_compression=init_compression, prune_ratio=prune_ratio,
        selection=selection, score=score, epochs_per_round=epochs_per_round, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        lr=lr if lr is not None else 5e-4 * effective_batch / 512, weight_decay=weight_decay,
        warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, image_size=image_size, flip=flip,
        max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, seed=seed,
    )
    output_dir = Path(output_dir)
    checkpoint = _find_run(output_dir, resume)
    run = _load_run(settings, checkpoint, accelerator, num_workers)
    peft_model, tuner, pos = run.model, run.model.base_model, run.position
    eval_loader = accelerator.prepare(run.eval_loader)
    # optimizer steps per epoch on each process (every epoch has the same number of batches)
    steps_per_epoch = math.ceil(len(accelerator.prepare(run.epoch_loader(0, 0))) / gradient_accumulation_steps)
    progress = tqdm(total=(pos.total_rounds + 1) * epochs_per_round * steps_per_epoch, initial=pos.global_step,
                    disable=not accelerator.is_local_main_process, desc="MiMi")

    while not pos.finished:  # round r trains at the widths left by r pruning rounds
        optimizer, scheduler = build_optimizer(  # accelerate steps the schedule once per process and optimizer step
            peft_model, lr=settings.lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
            num_training_steps=steps_per_epoch * epochs_per_round * accelerator.num_processes)
        model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)
        if checkpoint is not None:  # the first round of a resumed run continues the saved optimizer and schedule
            _load_optimizer_state(checkpoint, optimizer, scheduler)
        started = time.perf_counter() - pos.seconds
        for epoch in range(pos.epoch, epochs_per_round):
            loader = accelerator.prepare(run.epoch_loader(pos.round, epoch))
            set_seed(_seed(seed, pos.round, epoch), device_specific=True)  # dropout and other global RNG use
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
                        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                pos.add_batch(mean_loss)
                if accelerator.sync_gradients:
                    pos.global_step += 1
                    progress.update()
                    progress.set_postfix(round=pos.round, loss=f"{mean_loss:.4f}")
                    if checkpoint_every_steps and pos.global_step % checkpoint_every_steps == 0:
                        pos.epoch, pos.seconds = epoch, time.perf_counter() - started
                        _save_checkpoint(accelerator, output_dir, peft_model, optimizer, scheduler, pos, settings)
            pos.epoch, pos.batch = epoch + 1, 0
        checkpoint = None
        accuracy = evaluate(model, eval_loader, accelerator, **run.forward_kwargs)
        pos.history.append(_round_metrics(tuner, pos, accuracy, time.perf_counter() - started, epochs_per_round))
        if accelerator.is_local_main_process:
            progress.write(f"round {pos.round}/{pos.total_rounds}: accuracy {accuracy:.4f}, "
                           f"{pos.history[-1]['live_params']:,} adapter parameters (budget {tuner.budget():,})")
        if pos.round == pos.total_rounds:
            pos.finished = True
        else:  # prune, then the next round trains a smaller model with a fresh optimizer and schedule
            peft_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            tuner.prune_round(compact=True)
            accelerator.free_memory()
            pos.round, pos.epoch = pos.round + 1, 0
        pos.loss_sum, pos.loss_count, pos.seconds = 0.0, 0, 0.0
        _write_metrics(accelerator, output_dir, pos.history)
        _save_checkpoint(accelerator, output_dir, peft_model, None, None, pos, settings)  # next round: new optimizer
    progress.close()

    peft_model = accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False)
    adapter_dir = _save_adapter(accelerator, output_dir, peft_model, run, settings, pos.history, push_to_hub)
    hub_url = _push_to_hub(accelerator, adapter_dir, push_to_hub, pos.history) if push_to_hub else None
    return TrainResult(
        accuracy=pos.history[-1]["accuracy"], widths=tuner.adapter_widths(), live_params=tuner.live_params(),
        budget=tuner.budget(), rounds=pos.total_rounds, history=pos.history, output_dir=output_dir,
        adapter_dir=adapter_dir, hub_url=hub_url, model=peft_model.eval(),
    )


# ------------------------------------------------------------------------------------------------ building blocks
def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, warmup_ratio: float, num_training_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9, 0.999) over the trainable parameters, weight decay on matrices only (none on biases and
    1-D weights), and a cosine schedule with linear warm-up over ``num_training_steps`` scheduler steps."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters: every adapter was removed and there is no head. "
                         "Use a larger budget (target_compression / target_params).")
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))
    warmup = math.floor(warmup_ratio * num_training_steps)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, num_training_steps)


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
    test = _subset(dataset["test"], max_eval_samples, seed=0)
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
    model: PeftModel
    processor: Any
    labels: list[str]
    position: _Position
    eval_loader: DataLoader
    forward_kwargs: dict[str, Any]
    train_set: Any
    collate: Any
    augment: ImageTransform
    batch_size: int
    seed: int
    num_workers: int

    def epoch_loader(self, round_: int, epoch: int) -> DataLoader:
        """The training batches of one epoch; order and augmentation depend only on ``(seed, round, epoch)``.

        The loader draws from its own generators, never from the global RNG, so that the global RNG (dropout)
        stays reproducible whatever the loader prefetches or skips."""
        seed = _seed(self.seed, round_, epoch)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        return DataLoader(_Indexed(self.train_set), batch_size=self.batch_size, sampler=order, generator=generator,
                          collate_fn=_SeededCollate(self.collate, self.augment, seed), num_workers=self.num_workers)


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


def _load_run(settings: TrainSettings, checkpoint: Path | None, accelerator: Accelerator, num_workers: int = 0) -> _Run:
    """Data, model and position: fresh, or as saved in ``checkpoint``."""
    state = None if checkpoint is None else _read_json(checkpoint / "state.json")
    if checkpoint is not None:
        _check_checkpoint(state, settings, accelerator, checkpoint)
    dataset = load_image_dataset(settings.data)
    names, id2label, label2id = dataset_labels(dataset)
    set_seed(settings.seed)  # the new head and W_down: the same on every process
    base, processor = load_backbone(settings.model, num_labels=len(names), id2label=id2label, label2id=label2id)
    processor = _with_image_size(processor, settings.image_size)
    if checkpoint is None:
        config = MiMiConfig(
            target_compression=settings.target_compression, target_params=settings.target_params,
            init_compression=settings.init_compression, prune_ratio=settings.prune_ratio,
            selection=settings.selection, score=settings.score, modules_to_save=_head_modules(base),
            seed=settings.seed,
        )
        peft_model = get_peft_model(base, config)
        peft_model.peft_config["default"].base_model_name_or_path = settings.model
        position = _Position(total_rounds=peft_model.base_model.num_rounds())
    else:
        peft_model = PeftModel.from_pretrained(base, checkpoint / ADAPTER_DIR, is_trainable=True)
        position = _Position(**state["position"])
    flip = settings.flip if settings.flip is not None else getattr(BUILTIN_DATASETS.get(settings.data), "flip_ok", True)
    augment = ImageTransform.from_processor(processor, train=True, flip=flip, seed=settings.seed)
    eval_transform = ImageTransform.from_processor(processor, train=False)
    eval_collate = make_collate_fn(eval_transform, len(names))
    test = _subset(dataset["test"], settings.max_eval_samples, seed=0)
    return _Run(
        model=peft_model, processor=processor, labels=names, position=position,
        forward_kwargs=_forward_kwargs(peft_model, eval_transform),
        eval_loader=DataLoader(test, batch_size=settings.batch_size, collate_fn=eval_collate, num_workers=num_workers),
        train_set=_subset(dataset["train"], settings.max_train_samples, seed=settings.seed),
        collate=make_collate_fn(augment, len(names)), augment=augment,
        batch_size=settings.batch_size, seed=settings.seed, num_workers=num_workers,
    )


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


def _round_metrics(tuner, pos: _Position, accuracy: float, seconds: float, epochs_per_round: int) -> dict[str, Any]:
    widths = tuner.adapter_widths()
    return {
        "round": pos.round,
        "epoch": (pos.round + 1) * epochs_per_round,  # epochs trained so far, this round included
        "global_step": pos.global_step,
        "widths": widths,
        "adapters_kept": sum(w > 0 for w in widths.values()),
        "live_params": tuner.live_params(),
        "budget": tuner.budget(),
        "accuracy": accuracy,
        "loss": pos.loss_sum / pos.loss_count if pos.loss_count else None,
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


def _check_checkpoint(state: dict | None, settings: TrainSettings, accelerator: Accelerator, path: Path) -> None:
    if not state or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint this version of peft_mimi can read (state.json missing or of "
                         "another format). Start a new run in a new output directory.")
    saved = state["settings"]
    different = {k: (saved.get(k), v) for k, v in dataclasses.asdict(settings).items() if saved.get(k) != v}
    if different:
        listed = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in different.items())
        raise ValueError(f"Cannot resume {path}: it was made with other settings ({listed}). Pass the same "
                         "settings, or start a new run in a new output directory.")
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"Cannot resume {path}: it was made with {state['num_processes']} process(es), this run has "
                         f"{accelerator.num_processes}. Launch with --num_processes {state['num_processes']}.")


def _save_checkpoint(
    accelerator: Accelerator, output_dir: Path, peft_model: PeftModel, optimizer, scheduler, pos: _Position,
    settings: TrainSettings,
) -> None:
    """Write checkpoint ``ckpt-<serial>`` atomically (temporary directory, fsync, rename), then delete older
    ones. Every process saves its own RNG state; the main process writes the rest. At a round boundary there is
    no ``optimizer`` or ``scheduler`` to save: the next round builds new ones for the pruned adapters."""
    pos.serial += 1
    root = output_dir / CHECKPOINT_DIR
    tmp, final = root / f".tmp-ckpt-{pos.serial:05d}", root / f"ckpt-{pos.serial:05d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(peft_model).save_pretrained(tmp / ADAPTER_DIR)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_json(tmp / "state.json", {"format": _CHECKPOINT_FORMAT, "settings": dataclasses.asdict(settings),
                                         "num_processes": accelerator.num_processes,
                                         "position": dataclasses.asdict(pos)})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_directory(tmp, final)
        for old in root.iterdir():
            if old != final and (old.name.startswith("ckpt-") or old.name.startswith(".tmp-ckpt-")):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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
    accelerator: Accelerator, output_dir: Path, peft_model: PeftModel, run: _Run, settings: TrainSettings,
    history: list[dict[str, Any]], repo_id: str | None,
) -> Path:
    """The final adapter, its model card, image processor and run summary in ``output_dir/adapter``, replaced
    atomically."""
    adapter_dir = output_dir / ADAPTER_DIR
    if accelerator.is_main_process:
        tmp = output_dir / f".tmp-{ADAPTER_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(tmp)
        run.processor.save_pretrained(tmp)
        _write_json(tmp / RUN_FILE, {"base_model": settings.model, "data": settings.data, "labels": run.labels,
                                     "settings": dataclasses.asdict(settings), "history": history})
        card = model_card(peft_model, dataset=settings.data, history=history, base_model=settings.model,
                          repo_id=repo_id, num_labels=len(run.labels), settings=dataclasses.asdict(settings))
        (tmp / "README.md").write_text(card)  # after save_pretrained, which writes PEFT's generic card
        publish_directory(tmp, adapter_dir)
    accelerator.wait_for_everyone()
    return adapter_dir


def _push_to_hub(accelerator: Accelerator, adapter_dir: Path, repo_id: str, history: list[dict]) -> str | None:
    """Upload the adapter folder to the Hub model repository ``repo_id`` (created if missing); main process only."""
    url = None
    if accelerator.is_main_process:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(adapter_dir), repo_type="model",
            commit_message=f"MiMi adapter: accuracy {history[-1]['accuracy']:.4f}, "
                           f"{history[-1]['live_params']:,} adapter parameters",
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
def _check_arguments(**values: Any) -> None:
    for name in ("epochs_per_round", "batch_size", "gradient_accumulation_steps"):
        if not isinstance(values[name], int) or isinstance(values[name], bool) or values[name] < 1:
            raise ValueError(f"{name} must be an int >= 1, got {values[name]!r}.")
    for name in ("checkpoint_every_steps", "max_train_samples", "max_eval_samples", "image_size"):
        value = values[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 (or None), got {value!r}.")
    if values["lr"] is not None and not values["lr"] > 0:
        raise ValueError(f"lr must be > 0, got {values['lr']!r}.")
    if not 0 <= values["warmup_ratio"] < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {values['warmup_ratio']!r}.")


def _model_reference(model: str) -> str:
    """What the adapter config records as its base model: local directories as absolute paths (so that the
    adapter loads from anywhere), built-in names and Hub ids as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _seed(*keys: int) -> int:
    """A 32-bit seed derived from ``keys`` (e.g. seed, round, epoch): independent streams for distinct keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _subset(split, max_samples: int | None, seed: int):
    """A seeded random subset of ``max_samples`` examples (all of them when None or larger than the split)."""
    if max_samples is None or max_samples >= len(split):
        return split
    keep = np.random.default_rng(seed).permutation(len(split))[:max_samples]
    return split.select(np.sort(keep))


def _head_modules(model: nn.Module) -> list[str]:
    """The classification head(s) trained in full alongside the adapters."""
    heads = [name for name in ("classifier", "head", "fc") if isinstance(getattr(model, name, None), nn.Module)]
    if not heads:
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


def _with_image_size(processor: Any, image_size: int | None) -> Any:
    """The processor, set to produce ``image_size`` x ``image_size`` images when given (its own size if None)."""
    if image_size is None:
        return processor
    processor.size = {"height": image_size, "width": image_size}
    if getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": image_size, "width": image_size}
    return processor
