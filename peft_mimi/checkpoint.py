"""The run's checkpoints and its lock on the output directory: what `peft_mimi.train` needs to resume exactly.

A checkpoint (``OUTPUT_DIR/checkpoints/ckpt-NNNNN``) holds only the trainable tensors (about 1 MB for DINOv2-S with
MiMi; ``accelerate``'s ``save_state`` would write the whole model, 88 MB, each time), the adapters' widths, the
optimizer and scheduler, every process's RNG state, the position in the schedule (:class:`Position`) and the
settings that decide what the run computes. It is written to a temporary directory, synced and renamed into place,
so a crash at any moment leaves the previous complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from .files import publish_directory
from .model import MiMiModel

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CHOSEN_FILE = "chosen.safetensors"  # budget search: the trainable tensors of the round it keeps so far
# 4: a checkpoint at a round boundary holds the next round's optimizer (the moments carried across the cut);
# 3: the scheduler counts the steps of the whole run (2: of each round with restart_lr)
_CHECKPOINT_FORMAT = 5
_TRAINABLE_FILE = "trainable.safetensors"
_STATISTICS_FILE = "round_statistics.safetensors"


class OutputDirectoryBusy(FileExistsError):
    """Another live run is writing to the output directory."""


class RunLock:
    """An exclusive lock on ``output_dir/.lock`` for the whole run, taken when ``enabled`` (the global main process
    of a run: one lock per run, however many nodes share the filesystem). The operating system releases it when
    the process ends, however it ends, so a crashed run never leaves it stuck and ``resume`` works at once."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.path, self.enabled, self.file = output_dir / ".lock", enabled, None

    def __enter__(self) -> RunLock:
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


@dataclass
class Position:
    """Where the schedule stands: the next batch to run is batch ``batch`` of epoch ``epoch`` of round ``round``
    (``batch`` counts this process's batches). Saved in every checkpoint."""

    total_rounds: int  # R: pruning rounds of the plan; rounds 0..R train
    finish: bool = False  # budget search: after round R, segment R + 1 finishes the round the search kept
    round: int = 0  # the segment: round 0..R, then R + 1 for the finish
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

    @property
    def finishing(self) -> bool:
        """In the budget search's finish of the round it kept."""
        return self.round > self.total_rounds

    @property
    def rounds_done(self) -> int:
        """Pruning rounds behind the adapter being trained: the round, or in the finish the round the search kept."""
        return self.history[-1]["chosen_round"] if self.finishing else self.round

    def end_round(self) -> None:
        """Past the round's evaluation: the next round starts (or the run is finished)."""
        if self.round == self.total_rounds + self.finish:
            self.finished = True
        else:
            self.round, self.epoch = self.round + 1, 0
        self.loss_sum, self.loss_count, self.seconds, self.epoch_losses = 0.0, 0, 0.0, []


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (None if there is none). Only complete
    checkpoints carry the ``ckpt-NNNNN`` name; leftovers of an interrupted write start with '.tmp-'."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = sorted(p for p in root.glob("ckpt-*") if p.is_dir()) if root.is_dir() else []
    return found[-1] if found else None


def find_run(output_dir: Path, resume: bool) -> Path | None:
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


def read_position(checkpoint: Path, settings: dict[str, Any], accelerator: Accelerator) -> Position:
    """The position saved in ``checkpoint``, after checking that it was made with ``settings`` and as many
    processes; raises ValueError naming what differs."""
    state = read_json(checkpoint / "state.json")
    if not state or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint} is not a checkpoint this version of peft_mimi can read (state.json missing "
                         "or of another format). Start a new run in a new output directory.")
    saved = _flatten(state["settings"])
    now = _flatten(json.loads(json.dumps(settings)))
    different = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if different:
        listed = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in different.items())
        raise ValueError(f"Cannot resume {checkpoint}: it was made with other settings ({listed}). Pass the same "
                         "settings, or start a new run in a new output directory.")
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"Cannot resume {checkpoint}: it was made with {state['num_processes']} process(es), this "
                         f"run has {accelerator.num_processes}. Launch with --num_processes {state['num_processes']}.")
    return Position(**state["position"])


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, model: nn.Module, tuner: MiMiModel | None, optimizer, scheduler,
    pos: Position, settings: dict[str, Any], chosen_state: dict[str, torch.Tensor] | None,
) -> None:
    """Write checkpoint ``ckpt-<serial>`` atomically (temporary directory, fsync, rename), then delete older
    ones. Every process saves its own RNG state; the main process writes the rest: the trainable tensors, the
    adapters' widths (in ``state.json``), optimizer and scheduler, and the budget search's chosen adapter
    (``chosen_state``; its widths and round are in the history). At a round boundary ``optimizer`` and
    ``scheduler`` are the next round's, for the pruned adapters; after the last round there are none."""
    pos.serial += 1
    root = output_dir / CHECKPOINT_DIR
    tmp, final = root / f".tmp-ckpt-{pos.serial:05d}", root / f"ckpt-{pos.serial:05d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        pos.widths = _physical_widths(tuner)
        save_file(trainable_tensors(accelerator.unwrap_model(model)), str(tmp / _TRAINABLE_FILE))
        if chosen_state is not None:
            save_file(chosen_state, str(tmp / CHOSEN_FILE))
        statistics = _round_statistics(tuner) if tuner is not None and optimizer is not None else {}
        if statistics:  # mid-round, with a data-aware score: what the next cut will use
            save_file(statistics, str(tmp / _STATISTICS_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / "state.json", {"format": _CHECKPOINT_FORMAT, "settings": settings,
                                        "num_processes": accelerator.num_processes,
                                        "position": dataclasses.asdict(pos)})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_directory(tmp, final)
        for old in root.iterdir():
            if old != final and (old.name.startswith("ckpt-") or old.name.startswith(".tmp-ckpt-")):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}``: a CPU copy of every trainable parameter (adapters and head) of an unwrapped model."""
    return {name: p.detach().cpu().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def set_trainable(model: nn.Module, tuner: MiMiModel | None, widths: dict[str, int] | None, rounds_done: int,
                  tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Bring ``model`` to a saved state (mutates it): every adapter shrunk or rebuilt to its physical width in
    ``widths`` (its neurons are then overwritten), ``rounds_done`` recorded, and every trainable tensor copied from
    ``tensors`` (see :func:`trainable_tensors`). ``source`` names where the state comes from, for errors."""
    if tuner is not None:
        adapter = tuner.active_adapters[0]
        config = tuner.peft_config[adapter]
        for name, layer in tuner._layers(adapter):
            width = widths[name]
            if width <= layer.live_width(adapter):
                layer.keep_neurons(adapter, torch.arange(layer.live_width(adapter)) < width)
            else:  # an earlier, wider state (budget search); the new neurons' random start must not move the RNG
                with torch.random.fork_rng(devices=[]):
                    layer.update_layer(adapter, width, **config.layer_options())
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
def restore_trainable(model: nn.Module, tuner: MiMiModel | None, pos: Position, checkpoint: Path) -> None:
    """Bring a freshly built ``model`` to the checkpoint: the adapters at the saved widths, the rounds done, every
    trainable tensor and the round statistics of data-aware scores."""
    set_trainable(model, tuner, pos.widths, pos.rounds_done, load_file(str(checkpoint / _TRAINABLE_FILE)), checkpoint)
    if tuner is not None and (checkpoint / _STATISTICS_FILE).is_file():
        adapter, layers = tuner.active_adapters[0], dict(tuner._layers(tuner.active_adapters[0]))
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(checkpoint / _STATISTICS_FILE)).items():
            module, statistic = key.split("::")
            grouped.setdefault(module, {})[statistic] = tensor.to(layers[module].get_base_layer().weight.device)
        for module, statistics in grouped.items():
            layers[module].load_round_statistics(adapter, statistics)


def load_chosen_state(checkpoint: Path | None) -> dict[str, torch.Tensor] | None:
    """The budget search's chosen adapter saved in ``checkpoint`` (None: none saved, or no checkpoint)."""
    chosen = checkpoint / CHOSEN_FILE if checkpoint is not None else None
    return load_file(str(chosen)) if chosen is not None and chosen.is_file() else None


def load_optimizer_state(checkpoint: Path, optimizer, scheduler) -> None:
    if not (checkpoint / "optimizer.pt").is_file():  # the run's last checkpoint: nothing left to train
        return
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))


def load_rng_state(checkpoint: Path, accelerator: Accelerator) -> None:
    state = torch.load(checkpoint / f"rng-{accelerator.process_index}.pt", weights_only=True)
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _rng_state() -> dict[str, Any]:
    """This process's RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"recipe.lr": 0.002, ...}`` from nested settings, to name what differs."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
