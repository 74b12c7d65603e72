"""A training run's inputs and outputs: the model and data it trains on (fresh, or restored from a checkpoint), its
settings, and the files it leaves (``metrics.jsonl``, the final ``adapter/``, an upload to the Hub).

Data order and augmentation depend only on ``(seed, round, epoch)``, so that a resumed run ends where an
uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .backbones import load_backbone
from .card import model_card
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
from .evaluate import forward_kwargs
from .files import publish_directory
from .model import MiMiModel
from .recipe import DEFAULT_VALIDATION_FRACTION, TrainingRecipe, mimi_setting_fields
from .schedule import BudgetSearch
from .serving import RUN_FILE


@dataclass
class Run:
    """Everything a run trains with. ``settings`` decides what it computes: a resumed run must match it."""

    model: nn.Module
    tuner: MiMiModel | None  # None: a model without pruning rounds
    processor: Any
    labels: list[str]
    position: ckpt.Position
    eval_loader: DataLoader
    forward_kwargs: dict[str, Any]
    train_set: Any
    collate: Any
    augment: ImageTransform
    recipe: TrainingRecipe
    settings: dict[str, Any]
    validation_loader: DataLoader | None = None  # the validation split carved from train (None: no split)
    search: BudgetSearch | None = None  # budget search (MiMiConfig.budget_tolerance), replayed from the history
    chosen_state: dict[str, torch.Tensor] | None = None  # budget search: trainable tensors of the chosen round

    def epoch_loader(self, round_: int, epoch: int) -> DataLoader:
        """The training batches of one epoch; order and augmentation depend only on ``(seed, round, epoch)``.

        The loader draws from its own generators, never from the global RNG, so that the global RNG (dropout)
        stays reproducible whatever the loader prefetches or skips."""
        seed = seed_of(self.recipe.seed, round_, epoch)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        return DataLoader(_Indexed(self.train_set), batch_size=self.recipe.batch_size, sampler=order,
                          generator=generator, collate_fn=_SeededCollate(self.collate, self.augment, seed),
                          num_workers=self.recipe.num_workers)


def load_run(model: str | nn.Module, data: str | datasets.DatasetDict, recipe: TrainingRecipe,
             mimi: MiMiConfig | None, processor: Any, checkpoint: Path | None, accelerator: Accelerator) -> Run:
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
        config = dataclasses.replace(mimi, modules_to_save=mimi.modules_to_save or head_modules(base))
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
    config = tuner.peft_config[tuner.active_adapters[0]] if tuner else None
    settings = {"model": model_name, "data": data_name, "recipe": recipe.settings(),
                "mimi": {f.name: getattr(config, f.name) for f in mimi_setting_fields()} if tuner else None}
    search = BudgetSearch(config.budget_tolerance) if config is not None and config.budget_tolerance is not None \
        else None
    if checkpoint is None:
        position = ckpt.Position(total_rounds=tuner.num_rounds() if tuner else 0, finish=search is not None)
    else:
        position = ckpt.read_position(checkpoint, settings, accelerator)
        ckpt.restore_trainable(model, tuner, position, checkpoint)
    for row in position.history if search is not None else []:
        if not row["finish"]:
            search.record(row["live_params"], row["validation_accuracy"])
    flip = recipe.flip if recipe.flip is not None else getattr(BUILTIN_DATASETS.get(data_name), "flip_ok", True)
    augment = ImageTransform.from_processor(processor, train=True, flip=flip, crop=recipe.random_crop,
                                            seed=recipe.seed)
    eval_transform = ImageTransform.from_processor(processor, train=False)

    def eval_loader(split: Any) -> DataLoader:
        return DataLoader(split, batch_size=recipe.batch_size, collate_fn=make_collate_fn(eval_transform, len(names)),
                          num_workers=recipe.num_workers)

    train_set = balanced_subset(dataset["train"], recipe.max_train_samples, seed=recipe.seed)
    fraction = recipe.validation_fraction or (DEFAULT_VALIDATION_FRACTION if search is not None else None)
    validation = None
    if fraction is not None:
        train_set, validation = split_validation(train_set, fraction, seed=recipe.seed)
    return Run(
        model=model, tuner=tuner, processor=processor, labels=names, position=position,
        forward_kwargs=forward_kwargs(model, eval_transform),
        eval_loader=eval_loader(balanced_subset(dataset["test"], recipe.max_eval_samples, seed=0)),
        train_set=train_set, collate=make_collate_fn(augment, len(names)), augment=augment, recipe=recipe,
        settings=settings, validation_loader=eval_loader(validation) if validation is not None else None,
        search=search, chosen_state=ckpt.load_chosen_state(checkpoint),
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


def head_modules(model: nn.Module, required: bool = True) -> list[str]:
    """The classification head(s) trained in full alongside the adapters."""
    heads = [name for name in ("classifier", "head", "fc") if isinstance(getattr(model, name, None), nn.Module)]
    if not heads and required:
        raise ValueError(f"Cannot find the classification head of {type(model).__name__} (looked for 'classifier', "
                         "'head', 'fc'). Load the backbone as an image classifier (AutoModelForImageClassification).")
    return heads[:1]


def seed_of(*keys: int) -> int:
    """A 32-bit seed derived from ``keys`` (e.g. seed, round, epoch): independent streams for distinct keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def round_metrics(model: nn.Module, tuner: MiMiModel | None, pos: ckpt.Position, accuracy: float,
                  validation: float | None, seconds: float, epochs_so_far: int,
                  validation_images: int | None = None) -> dict[str, Any]:
    """The ``metrics.jsonl`` row of the round just trained and evaluated (``validation_images``: the size of the
    validation split, None without one)."""
    widths = tuner.adapter_widths() if tuner else None
    return {
        "round": pos.rounds_done,
        "epoch": epochs_so_far,  # epochs trained so far, this round included
        "global_step": pos.global_step,
        "widths": widths,
        "adapters_kept": sum(w > 0 for w in widths.values()) if tuner else None,
        "live_params": tuner.live_params() if tuner else sum(p.numel() for p in model.parameters()
                                                                 if p.requires_grad),
        "budget": tuner.budget() if tuner else None,
        "accuracy": accuracy,  # on the test split
        "validation_accuracy": validation,  # on the validation split carved from train (None: no split)
        "validation_images": validation_images,
        "chosen_round": None,  # budget search: the round it keeps so far
        **({"finish": pos.finishing} if pos.finish else {}),  # budget search: the row of the kept round's finish
        "loss": pos.loss_sum / pos.loss_count if pos.loss_count else None,
        "epoch_losses": list(pos.epoch_losses),
        "seconds": round(seconds, 3),
    }


def write_metrics(accelerator: Accelerator, output_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the history (so a resumed run never duplicates a line)."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / f".{ckpt.METRICS_FILE}.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        os.replace(tmp, output_dir / ckpt.METRICS_FILE)


def save_adapter(accelerator: Accelerator, output_dir: Path, peft_model: nn.Module, run: Run,
                 history: list[dict[str, Any]], repo_id: str | None) -> Path:
    """The final adapter (a model that is not a PEFT model: the whole model), its model card (MiMi), image
    processor and run summary in ``output_dir/adapter``, replaced atomically."""
    adapter_dir = output_dir / ckpt.ADAPTER_DIR
    if accelerator.is_main_process:
        tmp = output_dir / f".tmp-{ckpt.ADAPTER_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(peft_model, PeftModel):  # no embedding layers: skip PEFT's look-up of the base model's config
            peft_model.save_pretrained(tmp, save_embedding_layers=False)  # on the Hub (a warning offline)
        else:
            peft_model.save_pretrained(tmp)
        run.processor.save_pretrained(tmp)
        settings = run.settings
        ckpt.write_json(tmp / RUN_FILE, {"base_model": settings["model"], "data": settings["data"],
                                         "labels": run.labels, "settings": settings, "history": history})
        if run.tuner is not None:  # after save_pretrained, which writes PEFT's generic card
            card = model_card(peft_model, dataset=settings["data"], history=history, base_model=settings["model"],
                              repo_id=repo_id, num_labels=len(run.labels),
                              settings={**settings["recipe"], **settings["mimi"]})
            (tmp / "README.md").write_text(card)
        publish_directory(tmp, adapter_dir)
    accelerator.wait_for_everyone()
    return adapter_dir


def push_to_hub(accelerator: Accelerator, adapter_dir: Path, repo_id: str, saved: dict[str, Any]) -> str | None:
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
        self.augment.generator.manual_seed(seed_of(self.epoch_seed, indices[0]))
        return self.collate(examples)


def _resolve_data(data: str | datasets.DatasetDict) -> tuple[datasets.DatasetDict, str]:
    """``(dataset with "train" and "test" splits, its name)``; a DatasetDict is named by its fingerprints."""
    if isinstance(data, str | os.PathLike):
        return load_image_dataset(str(data)), str(data)
    if not isinstance(data, datasets.DatasetDict) or not {"train", "test"} <= set(data):
        raise ValueError(f"data must be a dataset name or a datasets.DatasetDict with 'train' and 'test' splits, got "
                         f"{type(data).__name__}{' with splits ' + str(list(data)) if hasattr(data, 'keys') else ''}."
                         " Use peft_mimi.data.load_image_dataset(...) to build one.")
    return data, "dataset:" + ",".join(getattr(data[split], "_fingerprint", "?") for split in ("train", "test"))


def _model_reference(model: str) -> str:
    """What the adapter config records as its base model: local directories as absolute paths (so that the
    adapter loads from anywhere), built-in names and Hub ids as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _check_head_size(model: nn.Module, num_labels: int) -> None:
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if classes is not None and classes != num_labels:
        raise ValueError(f"The model's head classifies {classes} classes but the dataset has {num_labels}. Load the "
                         f"backbone with num_labels={num_labels} (load_backbone(name, num_labels=...)).")
