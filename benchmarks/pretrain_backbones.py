"""Pretrain the two small built-in backbones on Fashion-MNIST, from scratch, on CPU.

    python benchmarks/pretrain_backbones.py                      # both, as shipped
    python benchmarks/pretrain_backbones.py --models fmnist-vit --epochs 1

Each model is written to ``peft_mimi/backbones/weights/<name>/``: ``model.safetensors`` and ``config.json``
(with Fashion-MNIST's id2label), ``preprocessor_config.json`` (a ``ViTImageProcessor``: 32x32, the mean/std
below) and ``pretrain_log.json`` (per-epoch loss and test accuracy, wall time, seed, command, versions).

Data: the Debian package ``dataset-fashion-mnist`` (60k train / 10k test, 28x28 greyscale), made RGB and
resized to 32x32 by ``peft_mimi.data.ImageTransform``; training adds a light random resized crop and
horizontal flips (labels of clothing survive a flip).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from torch.utils.data import DataLoader
from transformers import (
    PreTrainedModel,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    get_cosine_schedule_with_warmup,
)

from peft_mimi.data import ImageTransform, dataset_labels, load_builtin_dataset, make_collate_fn

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "peft_mimi" / "backbones" / "weights"
IMAGE_SIZE = 32
# Fashion-MNIST's pixel mean and std on [0, 1] (train split), the same for the three replicated channels.
MEAN = (0.2860, 0.2860, 0.2860)
STD = (0.3530, 0.3530, 0.3530)
SUBSET = 2000  # the first SUBSET test images: the quick check tests/test_backbones.py repeats


@dataclass(frozen=True)
class Recipe:
    """One backbone: its architecture and how long and how fast to train it."""

    build: Any  # (id2label, label2id) -> PreTrainedModel
    epochs: int
    lr: float
    batch_size: int
    description: str


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


@torch.no_grad()
def predict(model: PreTrainedModel, loader: DataLoader) -> torch.Tensor:
    """Predicted class of every example, in loader order."""
    model.eval()
    return torch.cat([model(pixel_values=batch["pixel_values"]).logits.argmax(-1) for batch in loader])


def pretrain(
    name: str, recipe: Recipe, epochs: int, batch_size: int, seed: int, out: Path, limit: int | None = None
) -> dict[str, Any]:
    """Train ``recipe`` from scratch, evaluate after every epoch, save to ``out/name``; return the log."""
    torch.manual_seed(seed)
    data = load_builtin_dataset("fashion_mnist")
    if limit:  # smoke runs only
        data = DatasetDict({"train": data["train"].select(range(limit)), "test": data["test"]})
    names, id2label, label2id = dataset_labels(data)
    model = recipe.build(id2label, label2id)
    train_loader = DataLoader(
        data["train"], batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
        collate_fn=make_collate_fn(ImageTransform(IMAGE_SIZE, MEAN, STD, train=True, flip=True), len(names)),
    )
    test_loader = DataLoader(
        data["test"], batch_size=500,
        collate_fn=make_collate_fn(ImageTransform(IMAGE_SIZE, MEAN, STD, train=False), len(names)),
    )
    test_labels = torch.tensor(data["test"]["label"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "position" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.lr)
    steps = epochs * len(train_loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=math.ceil(0.05 * steps),
                                                num_training_steps=steps)

    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for batch in train_loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            total, count = total + loss.item() * len(batch["labels"]), count + len(batch["labels"])
        correct = predict(model, test_loader) == test_labels
        history.append({
            "epoch": epoch,
            "train_loss": round(total / count, 5),
            "test_accuracy": round(correct.float().mean().item(), 5),
            "test_accuracy_first_2000": round(correct[:SUBSET].float().mean().item(), 5),
            "elapsed_s": round(time.perf_counter() - start, 1),
        })
        print(f"[{name}] epoch {epoch}/{epochs}: {history[-1]}", flush=True)

    log = {
        "name": name,
        "description": recipe.description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset": f"fashion_mnist (Debian package dataset-fashion-mnist): {len(data['train'])} train / "
                   f"{len(data['test'])} test",
        "preprocessing": {"image_size": IMAGE_SIZE, "mean": MEAN, "std": STD, "train_crop_scale": [0.8, 1.0],
                          "train_flip": True, "eval": "resize 28x28 -> 32x32 (bilinear, antialiased)"},
        "optimizer": {"name": "AdamW", "lr": recipe.lr, "weight_decay": 0.05, "schedule": "cosine, 5% warmup",
                      "batch_size": batch_size, "grad_clip": 1.0},
        "epochs": epochs,
        "history": history,
        "test_accuracy": history[-1]["test_accuracy"],
        "test_accuracy_first_2000": history[-1]["test_accuracy_first_2000"],
        "wall_time_s": round(time.perf_counter() - start, 1),
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{m: __import__(m).__version__ for m in ("transformers", "datasets", "numpy")}},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    save(model, log, out / name)
    return log


def save(model: PreTrainedModel, log: dict[str, Any], target: Path) -> None:
    """Write the model, its processor and its log to a staging directory, then swap it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    model.save_pretrained(staging)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(MEAN),
                      image_std=list(STD)).save_pretrained(staging)
    (staging / "pretrain_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_card(staging, log)
    for path in staging.iterdir():
        path.chmod(0o644)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    print(f"[{log['name']}] saved to {target}", flush=True)


def write_card(folder: Path, log: dict[str, Any]) -> None:
    """README.md for the model folder, from its pretrain log."""
    rows = "\n".join(f"| {h['epoch']} | {h['train_loss']:.4f} | {h['test_accuracy']:.4f} |" for h in log["history"])
    prep = log["preprocessing"]
    (folder / "README.md").write_text(f"""# {log['name']}

{log['description'][0].upper() + log['description'][1:]}; {log['parameters']:,} parameters, trained from scratch
on {log['dataset']} by `benchmarks/pretrain_backbones.py` of peft-mimi.
Load it with `peft_mimi.backbones.load_backbone("{log['name']}")`.

- Test accuracy on the 10,000 test images: **{log['test_accuracy']:.4f}**
- Input: {prep['image_size']}x{prep['image_size']} RGB (greyscale replicated), mean {prep['mean'][0]}, std \
{prep['std'][0]}; training crops (area {prep['train_crop_scale']}) and flips
- {log['epochs']} epochs of {log['optimizer']['name']} (lr {log['optimizer']['lr']}, batch \
{log['optimizer']['batch_size']}, {log['optimizer']['schedule']}), seed {log['seed']}, \
{log['wall_time_s'] / 60:.1f} min on {log['torch_threads']} CPU thread(s)
- License: Apache-2.0, like peft-mimi. Fashion-MNIST is (c) Zalando SE, MIT license.

| epoch | train loss | test accuracy |
|---|---|---|
{rows}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epoch count")
    parser.add_argument("--batch-size", type=int, default=None, help="override every recipe's batch size")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine, two threads per process trained 4-8x slower than one.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="parent directory of the model folders")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke runs)")
    parser.add_argument("--cards-only", action="store_true", help="rewrite README.md from pretrain_log.json")
    args = parser.parse_args()
    if args.cards_only:
        for name in args.models:
            write_card(args.out / name, json.loads((args.out / name / "pretrain_log.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    for name in args.models:
        recipe = RECIPES[name]
        log = pretrain(name, recipe, args.epochs or recipe.epochs, args.batch_size or recipe.batch_size, args.seed,
                       args.out, args.limit)
        print(f"[{name}] test accuracy {log['test_accuracy']:.4f} in {log['wall_time_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
