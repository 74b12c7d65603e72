"""Many tasks, one backbone: train a small MiMi adapter for each of four tasks, then serve them all from one
model that answers batches mixing the tasks' images, each batch in a single forward pass.

    python examples/serve_many_tasks.py              # about a minute on 2 CPU cores; a second run only serves

Part 1 runs MiMi (`peft_mimi.train.train`: train, prune, ..., train) on each built-in dataset (digits: 10
classes, faces: 2, textures: 3, mnist: 10), each pruned to its own budget, briefly (a few hundred images per
task). Each adapter is saved with its own head and class names. Part 2 loads the backbone once, puts the four
adapters on it with `peft_mimi.serving.load_task_adapters`, and classifies the four test sets shuffled together
with `classify_mixed`: every image goes through its own task's adapters and head.

The backbone is the built-in ``fmnist-vit`` (or else ``fmnist-swin``), pretrained on Fashion-MNIST, when its
weights are installed; otherwise a randomly initialised ViT of fmnist-vit's shape, which makes the point about
serving (mixed batches give every task exactly its own accuracy) but stays near chance on the digit tasks.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
from transformers.utils import logging as hf_logging

from peft_mimi import MiMiConfig
from peft_mimi.backbones import BUILTIN_BACKBONES, load_backbone
from peft_mimi.data import ImageTransform, load_builtin_dataset
from peft_mimi.serving import classify_mixed, load_task_adapters, parameter_bytes, read_task_labels
from peft_mimi.train import TrainingRecipe, train

# task -> target compression σt: each task is pruned to its own budget, so the adapters differ in size
TASKS = {"digits": 16.0, "faces": 64.0, "textures": 32.0, "mnist": 8.0}


def choose_backbone(out: Path) -> str:
    """The first shipped backbone whose weights are installed, else a random ViT saved under ``out``."""
    for name in ("fmnist-vit", "fmnist-swin"):
        try:
            BUILTIN_BACKBONES[name].locate()
            return name
        except FileNotFoundError:
            continue
    path = out / "random-vit"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                           intermediate_size=128, num_labels=10)
        ViTForImageClassification(config).save_pretrained(path)
        processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor.save_pretrained(path)
    return str(path)


def train_tasks(backbone: str, out: Path, samples: int) -> dict[str, Path]:
    """One MiMi adapter per task under ``out/<task>/adapter``; tasks already trained there are reused."""
    adapter_dirs = {}
    for task, target_compression in TASKS.items():
        run_dir = out / task
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            started = time.perf_counter()
            result = train(backbone, task, run_dir, TrainingRecipe(batch_size=32, max_train_samples=samples,
                                                                    max_eval_samples=200),
                           mimi=MiMiConfig(target_compression=target_compression))
            removed = sum(width == 0 for width in result.widths.values())
            print(f"  {task:9s} {result.rounds} pruning rounds -> {result.live_params:,} adapter parameters "
                  f"({removed} of {len(result.widths)} adapters removed), accuracy {result.accuracy:.3f}, "
                  f"{time.perf_counter() - started:.0f} s")
        adapter_dirs[task] = run_dir / "adapter"
    return adapter_dirs


def mixed_test_batches(tasks: list[str], transform: ImageTransform, batch_size: int, seed: int = 0):
    """Every test image of every task, shuffled together: ``(pixel_values, task names, true labels)`` batches."""
    items = [(task, i) for task in tasks for i in range(len(load_builtin_dataset(task)["test"]))]
    random.Random(seed).shuffle(items)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        examples = [load_builtin_dataset(task)["test"][i] for task, i in chunk]
        yield (transform([e["image"] for e in examples]), [task for task, _ in chunk],
               [int(e["label"]) for e in examples])


def serve(backbone: str, adapter_dirs: dict[str, Path], batch_size: int) -> None:
    """Load every task onto one backbone and classify all test sets in mixed batches."""
    base, processor = load_backbone(backbone)
    backbone_bytes = parameter_bytes(base)
    started = time.perf_counter()
    model = load_task_adapters(base, adapter_dirs)
    labels = read_task_labels(adapter_dirs)
    task_bytes = parameter_bytes(model) - backbone_bytes
    print(f"\nloaded {len(adapter_dirs)} tasks in {time.perf_counter() - started:.2f} s: backbone "
          f"{backbone_bytes / 1024:.0f} KiB, all tasks' adapters and heads {task_bytes / 1024:.0f} KiB")

    transform = ImageTransform.from_processor(processor, train=False)
    correct = {task: 0 for task in adapter_dirs}
    seen = dict(correct)
    started, images = time.perf_counter(), 0
    for index, (pixel_values, tasks, truth) in enumerate(mixed_test_batches(list(adapter_dirs), transform,
                                                                             batch_size)):
        predictions = classify_mixed(model, pixel_values, tasks, labels=labels)
        if index == 0:
            print(f"\nthe first mixed batch ({len(tasks)} images, one forward pass), its first 12 images:")
            for p, label in list(zip(predictions, truth))[:12]:
                print(f"  {p.task:9s} predicted {p.label!r:12s} ({p.score:4.0%})   true {labels[p.task][label]!r}")
        for p, label in zip(predictions, truth):
            correct[p.task] += p.class_id == label
            seen[p.task] += 1
        images += len(tasks)
    print(f"\n{images} test images in mixed batches of {batch_size}: {time.perf_counter() - started:.1f} s "
          "(preprocessing included). Accuracy per task, mixed batches vs. the task alone (set_adapter):")
    for task in adapter_dirs:
        print(f"  {task:9s} {correct[task] / seen[task]:.3f} vs. {accuracy_alone(model, task, transform):.3f} "
              f"on {seen[task]} images")


@torch.no_grad()
def accuracy_alone(model, task: str, transform: ImageTransform) -> float:
    """Test accuracy of ``task`` with its adapter as the only active one: what the mixed batches must match."""
    model.set_adapter(task)
    correct = total = 0
    for pixel_values, _, truth in mixed_test_batches([task], transform, batch_size=256):
        correct += int((model(pixel_values=pixel_values).logits.argmax(-1) == torch.tensor(truth)).sum())
        total += len(truth)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/serve_many_tasks"))
    parser.add_argument("--train-samples", type=int, default=640, help="training images per task")
    parser.add_argument("--batch-size", type=int, default=64, help="images per mixed batch when serving")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a model this small gains little from more, and loses much on busy cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the new heads' "newly initialized weights" notices

    backbone = choose_backbone(args.out)
    print(f"backbone: {backbone}\nMiMi adapters, one per task (reused when already in {args.out}):")
    adapter_dirs = train_tasks(backbone, args.out, args.train_samples)
    serve(backbone, adapter_dirs, args.batch_size)


if __name__ == "__main__":
    main()
