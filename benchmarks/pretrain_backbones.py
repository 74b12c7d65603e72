"""Pretrain the two small built-in backbones on Fashion-MNIST, from scratch, on CPU.

    python benchmarks/pretrain_backbones.py                      # both, as shipped
    python benchmarks/pretrain_backbones.py --models fmnist-vit --epochs 1
    python benchmarks/pretrain_backbones.py --smoke              # 300 images, 1 epoch, a temporary directory
    python benchmarks/pretrain_backbones.py --cards-only         # rewrite README.md from pretrain_log.json

Each model is written to ``peft_mimi/backbones/weights/<name>/``: ``model.safetensors`` and ``config.json``
(with Fashion-MNIST's id2label), ``preprocessor_config.json`` (a ``ViTImageProcessor``: 32x32, the mean/std
below), ``pretrain_log.json`` (per-epoch training loss, final test accuracy on all 10,000 test images and on the
first 2,000, wall time, seed, recipe, command, versions) and ``README.md`` (rendered from the log).

Data: the Debian package ``dataset-fashion-mnist`` (60k train / 10k test, 28x28 greyscale), made RGB and
resized to 32x32 by ``peft_mimi.data.ImageTransform``; training adds a light random resized crop (area 0.8-1)
and horizontal flips (labels of clothing survive a flip).

Training is ``peft_mimi.train.train``, the project's one training loop: the freshly initialised classifier (every
parameter trainable) trains one round of the recipe's epochs with AdamW at one learning rate for the whole model
(``head_lr=None``), weight decay 0.05, a cosine schedule after a 5 % linear warm-up, gradient clipping at 1.0.

The shipped weights and logs were made by the earlier version of this script (git commit 672c37e), which had its
own training loop with the same recipe. Rerunning this script gives a backbone of the same recipe, not a
bit-identical one (the initial weights are the same: the model is built right after ``torch.manual_seed(seed)``
as before). What differs:

* weight decay: ``build_optimizer`` decays every trainable tensor with 2 or more dimensions; the old loop
  exempted those named ``*position*`` (ViT's position embeddings, Swin's relative-position bias tables);
* warm-up: ``floor(0.05 * steps)`` optimizer steps instead of ``ceil(0.05 * steps)``;
* data order and augmentation: drawn from train()'s seeds per ``(seed, round, epoch)`` and per batch instead of
  one shuffling generator and torch's global RNG;
* the logged training loss of an epoch is the mean over its batches (the old loop weighted by images, so the
  smaller last batch counted less);
* test accuracy is measured once, after the last epoch; the old log (and the shipped cards) had test accuracy
  after every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from datasets import DatasetDict
from torch.utils.data import DataLoader
from transformers import (
    PreTrainedModel,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from peft_mimi.data import ImageTransform, dataset_labels, load_builtin_dataset, make_collate_fn
from peft_mimi.evaluate import evaluate
from peft_mimi.train import TrainingRecipe, train

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "peft_mimi" / "backbones" / "weights"
IMAGE_SIZE = 32
# Fashion-MNIST's pixel mean and std on [0, 1] (train split), the same for the three replicated channels.
MEAN = (0.2860, 0.2860, 0.2860)
STD = (0.3530, 0.3530, 0.3530)
SUBSET = 2000  # the first SUBSET test images: the quick check tests/test_backbones.py repeats
TRAINER = "peft_mimi.train.train"  # recorded in every new log; a log without it comes from the old loop
EARLIER_VERSION = "672c37e"  # the last commit whose script had its own training loop (made the shipped weights)
SMOKE_TRAIN, SMOKE_TEST = 300, 200  # images of a --smoke run


@dataclass(frozen=True)
class Recipe:
    """One backbone: its architecture and how long and how fast to train it."""

    build: Any  # (id2label, label2id) -> PreTrainedModel
    epochs: int
    lr: float
    batch_size: int
    description: str

    def training_recipe(self, epochs: int, batch_size: int, seed: int) -> TrainingRecipe:
        """The settings of :func:`peft_mimi.train.train` for this backbone: one round of ``epochs`` epochs, the
        whole model at ``lr`` (no separate head rate), weight decay 0.05, 5 % warm-up, clipping at 1.0, flips."""
        return TrainingRecipe(epochs_per_round=epochs, batch_size=batch_size, lr=self.lr, head_lr=None,
                              weight_decay=0.05, warmup_ratio=0.05, max_grad_norm=1.0, flip=True, seed=seed)


def build_vit(id2label: dict[int, str], label2id: dict[str, int]) -> PreTrainedModel:
    # 8x8 patches of 4x4 pixels + [CLS]: 65 tokens of width 64, 6 layers, 4 heads, MLP width 128.
    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=6,
        num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=id2label, label2id=label2id,
    )
    return ViTForImageClassification(config)


def build_swin(id2label: dict[int, str], label2id: dict[str, int]) -> PreTrainedModel:
    # Stages at 8x8, 4x4 and 2x2 tokens of widths 32, 64, 128. The window is 2 because transformers' Swin
    # cannot run a stage smaller than its window (its relative-position bias keeps the configured size), and a
    # 4x4 window would need 2x2 patches: four times the tokens, about 3.5x slower to train on CPU.
    config = SwinConfig(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3, embed_dim=32, depths=[2, 2, 2], num_heads=[1, 2, 4],
        window_size=2, mlp_ratio=2.0, drop_path_rate=0.0, id2label=id2label, label2id=label2id,
    )
    return SwinForImageClassification(config)


RECIPES = {
    # A plain ViT learns Fashion-MNIST more slowly per epoch than the windowed Swin: more, smaller steps.
    "fmnist-vit": Recipe(build_vit, epochs=5, lr=2e-3, batch_size=64,
                         description="plain ViT, patch 4, width 64, depth 6"),
    "fmnist-swin": Recipe(build_swin, epochs=6, lr=2e-3, batch_size=128,
                          description="hierarchical Swin, patch 4, window 2, widths 32/64/128, depths 2/2/2"),
}


def image_processor() -> ViTImageProcessor:
    """The processor saved with both backbones: resize to 32x32, then normalise with Fashion-MNIST's mean/std."""
    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(MEAN),
                             image_std=list(STD))


def subset_accuracy(model: PreTrainedModel, test: Any, processor: ViTImageProcessor, num_labels: int) -> float:
    """Top-1 accuracy of ``model`` on the first :data:`SUBSET` images of ``test``, with the eval transform."""
    loader = DataLoader(test.select(range(min(SUBSET, len(test)))), batch_size=500,
                        collate_fn=make_collate_fn(ImageTransform.from_processor(processor, train=False), num_labels))
    accelerator = Accelerator()
    return evaluate(model, accelerator.prepare(loader), accelerator)


def pretrain(
    name: str, recipe: Recipe, epochs: int, batch_size: int, seed: int, out: Path, smoke: bool = False
) -> dict[str, Any]:
    """Build ``recipe``'s model from scratch, train it with :func:`peft_mimi.train.train` (all parameters), save
    model, processor, log and card to ``out/name``; return the log. ``smoke``: the first SMOKE_TRAIN training
    and SMOKE_TEST test images only."""
    data = load_builtin_dataset("fashion_mnist")
    if smoke:
        data = DatasetDict({"train": data["train"].select(range(SMOKE_TRAIN)),
                            "test": data["test"].select(range(SMOKE_TEST))})
    names, id2label, label2id = dataset_labels(data)
    torch.manual_seed(seed)  # the initial weights
    model = recipe.build(id2label, label2id)
    processor = image_processor()
    settings = recipe.training_recipe(epochs, batch_size, seed)
    with tempfile.TemporaryDirectory(prefix=f"pretrain-{name}-") as run_dir:  # train()'s checkpoints and metrics
        result = train(model, data, run_dir, settings, processor=processor)
    last = result.history[-1]
    print(f"[{name}] {epochs} epoch(s): losses {[round(loss, 4) for loss in last['epoch_losses']]}, "
          f"test accuracy {last['accuracy']:.4f}", flush=True)

    log = {
        "name": name,
        "description": recipe.description,
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "dataset": f"fashion_mnist (Debian package dataset-fashion-mnist): {len(data['train'])} train / "
                   f"{len(data['test'])} test",
        "preprocessing": {"image_size": IMAGE_SIZE, "mean": MEAN, "std": STD, "train_crop_scale": [0.8, 1.0],
                          "train_flip": True, "eval": "resize 28x28 -> 32x32 (bilinear, antialiased)"},
        "trainer": TRAINER,
        "optimizer": {"name": "AdamW", "lr": settings.lr, "weight_decay": settings.weight_decay,
                      "schedule": f"cosine, {settings.warmup_ratio:.0%} warmup", "batch_size": settings.batch_size,
                      "grad_clip": settings.max_grad_norm},
        "training_recipe": settings.settings(),
        "epochs": epochs,
        "history": [{"epoch": epoch, "train_loss": round(loss, 5)}
                    for epoch, loss in enumerate(last["epoch_losses"], start=1)],
        "test_accuracy": round(last["accuracy"], 5),
        "test_accuracy_first_2000": round(subset_accuracy(result.model, data["test"], processor, len(names)), 5),
        "wall_time_s": round(last["seconds"], 1),  # training and the final test evaluation
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{m: __import__(m).__version__ for m in ("transformers", "datasets", "numpy", "accelerate")}},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    save(result.model, processor, log, out / name)
    return log


def save(model: PreTrainedModel, processor: ViTImageProcessor, log: dict[str, Any], target: Path) -> None:
    """Write the model, its processor, its log and its card to a staging directory, then swap it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "pretrain_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_card(staging, log)
    for path in staging.iterdir():
        path.chmod(0o644)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    print(f"[{log['name']}] saved to {target}", flush=True)


def write_card(folder: Path, log: dict[str, Any]) -> None:
    """README.md for the model folder, from its pretrain log (this script's, or the old loop's: see the module
    docstring)."""
    old_loop = log.get("trainer") != TRAINER
    if old_loop:  # test accuracy after every epoch
        header = "| epoch | train loss | test accuracy |\n|---|---|---|"
        rows = [f"| {h['epoch']} | {h['train_loss']:.4f} | {h['test_accuracy']:.4f} |" for h in log["history"]]
        provenance = f"""
These weights and `pretrain_log.json` come from the earlier version of `benchmarks/pretrain_backbones.py` (git
commit {EARLIER_VERSION}), which had its own training loop. The script now trains through `{TRAINER}` with the
same recipe: rerunning it gives a backbone of the same recipe, not a bit-identical one. It applies weight decay
to the parameters named `*position*` too (ViT's position embeddings, Swin's relative-position bias tables; the old
loop exempted them), warms up for floor instead of ceil of 5 % of the steps, draws data order and augmentation
from train()'s seeds, logs an epoch's loss as the mean over batches instead of images, and measures test accuracy
only after the last epoch (the table below has it after every epoch, as the old loop logged it).
"""
    else:
        header = "| epoch | train loss |\n|---|---|"
        rows = [f"| {h['epoch']} | {h['train_loss']:.4f} |" for h in log["history"]]
        provenance = ""
    trainer = "" if old_loop else f" through `{log['trainer']}`"
    prep = log["preprocessing"]
    test_images = int(log["dataset"].rsplit(" / ", 1)[1].split()[0])  # "...: 60000 train / 10000 test"
    (folder / "README.md").write_text(f"""# {log['name']}

{log['description'][0].upper() + log['description'][1:]}; {log['parameters']:,} parameters, trained from scratch
on {log['dataset']} by `benchmarks/pretrain_backbones.py` of peft-mimi{trainer}.
Load it with `peft_mimi.backbones.load_backbone("{log['name']}")`.
{provenance}
- Test accuracy on the {test_images:,} test images: **{log['test_accuracy']:.4f}**
- Input: {prep['image_size']}x{prep['image_size']} RGB (greyscale replicated), mean {prep['mean'][0]}, std \
{prep['std'][0]}; training crops (area {prep['train_crop_scale']}) and flips
- {log['epochs']} epochs of {log['optimizer']['name']} (lr {log['optimizer']['lr']}, batch \
{log['optimizer']['batch_size']}, {log['optimizer']['schedule']}), seed {log['seed']}, \
{log['wall_time_s'] / 60:.1f} min on {log['torch_threads']} CPU thread(s)
- License: Apache-2.0, like peft-mimi. Fashion-MNIST is (c) Zalando SE, MIT license.

{header}
{chr(10).join(rows)}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epoch count")
    parser.add_argument("--batch-size", type=int, default=None, help="override every recipe's batch size")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine, two threads per process trained 4-8x slower than one.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"parent directory of the model folders (default {WEIGHTS_DIR}; with --smoke, a "
                             "temporary directory, deleted at the end)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"check the pipeline: {SMOKE_TRAIN} training and {SMOKE_TEST} test images, 1 epoch")
    parser.add_argument("--cards-only", action="store_true", help="rewrite README.md from pretrain_log.json")
    args = parser.parse_args()
    if args.smoke and args.out is not None and args.out.resolve() == WEIGHTS_DIR:
        parser.error("--smoke would overwrite the shipped weights: leave out --out, or give another directory.")
    if args.cards_only:
        for name in args.models:
            folder = (args.out or WEIGHTS_DIR) / name
            write_card(folder, json.loads((folder / "pretrain_log.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pretrain-smoke-") as scratch:
        out = args.out or (Path(scratch) if args.smoke else WEIGHTS_DIR)
        for name in args.models:
            recipe = RECIPES[name]
            epochs = args.epochs or (1 if args.smoke else recipe.epochs)
            log = pretrain(name, recipe, epochs, args.batch_size or recipe.batch_size, args.seed, out, args.smoke)
            print(f"[{name}] test accuracy {log['test_accuracy']:.4f} (first {SUBSET}: "
                  f"{log['test_accuracy_first_2000']:.4f}) in {log['wall_time_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
