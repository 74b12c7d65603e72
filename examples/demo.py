"""`make demo`: MiMi fine-tunes a pretrained backbone shipped with the project on a real dataset, fully offline.

The backbone is `fmnist-swin`, a small hierarchical Swin the project pretrained on Fashion-MNIST (see
benchmarks/pretrain_backbones.py; the paper's main backbone is a Swin), with a fresh head for the task. The task is
handwritten digits (scikit-learn's 8x8 digits, upscaled). Everything trains through `peft_mimi.train.train` with
the default `TrainingRecipe`, exactly as `peft-mimi train` does. For every round it prints accuracy, live adapter
parameters and the budget; at the end a per-layer width table, a PNG plot of the widths, the saved adapter's size, a
reload check, and the same backbone with only its head trained for the same epochs, by the same loop.

    python examples/demo.py [--data digits] [--backbone fmnist-swin] [--target-compression 32] [--output-dir ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from peft import PeftModel

from peft_mimi import MiMiConfig
from peft_mimi.backbones import load_backbone
from peft_mimi.data import ImageTransform, dataset_labels, load_image_dataset, make_collate_fn
from peft_mimi.plots import plot_widths
from peft_mimi.pruning import adapter_params, initial_width
from peft_mimi.train import TrainingRecipe, train


def head_only_accuracy(backbone_name: str, data, recipe: TrainingRecipe, output_dir: Path) -> float:
    """Test accuracy of the same backbone with only a new classification head trained by the same loop, with the
    same recipe and number of epochs as MiMi (a model without MiMi adapters trains one round)."""
    names, id2label, label2id = dataset_labels(data)
    model, processor = load_backbone(backbone_name, num_labels=len(names), id2label=id2label, label2id=label2id)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("classifier."))
    return train(model, data, output_dir, recipe, processor=processor, resume=True).accuracy


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="fmnist-swin")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--target-compression", type=float, default=32.0)
    parser.add_argument("--epochs-per-round", type=int, default=TrainingRecipe.epochs_per_round)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--output-dir", default="outputs/demo")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    print(f"MiMi demo: backbone {args.backbone}, data {args.data}, target compression {args.target_compression}")
    data = load_image_dataset(args.data)
    recipe = TrainingRecipe(epochs_per_round=args.epochs_per_round, max_train_samples=args.max_train_samples)
    output = Path(args.output_dir)
    result = train(args.backbone, data, output, recipe, resume=True,
                   mimi=MiMiConfig(target_compression=args.target_compression))
    print("\nround  epochs  accuracy  live params  budget")
    for row in result.history:
        print(f"{row['round']:>5}  {row['epoch']:>6}  {row['accuracy']:8.4f}  {row['live_params']:>11,}  "
              f"{row['budget']:>6,}")

    dims = result.model.base_model.feature_sizes()
    config = result.model.peft_config["default"]
    print(f"\n{'module':<45} {'d':>4} {'width':>5} {'params':>7}")
    for name, width in result.widths.items():
        print(f"{name:<45} {dims[name]:>4} {width:>5} {adapter_params(dims[name], width, **config.param_terms):>7,}")
    removed = sum(w == 0 for w in result.widths.values())
    print(f"{len(result.widths)} adapters, {removed} removed, {result.live_params:,} parameters "
          f"(budget {result.budget:,})")

    initial = {name: initial_width(d, config.init_compression) for name, d in dims.items()}
    plot = plot_widths(result.widths, output / "widths.png", initial=initial,
                       title=f"MiMi on {args.data} ({args.backbone})")
    weights = result.adapter_dir / "adapter_model.safetensors"
    print(f"plot: {plot}\nadapter: {result.adapter_dir}/ ({weights.stat().st_size:,} bytes with the head)")

    # reload the saved adapter onto a fresh backbone: identical predictions
    base, processor = load_backbone(args.backbone, num_labels=result.model.config.num_labels,
                                    id2label=result.model.config.id2label, label2id=result.model.config.label2id)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    batch = make_collate_fn(ImageTransform.from_processor(processor, train=False))(
        [data["test"][i] for i in range(64)])
    with torch.no_grad():
        same = torch.equal(reloaded(pixel_values=batch["pixel_values"]).logits.argmax(-1),
                           result.model(pixel_values=batch["pixel_values"]).logits.argmax(-1))
    print(f"reload check: {'identical predictions' if same else 'PREDICTIONS DIFFER'}")

    epochs = result.history[-1]["epoch"]
    probe = head_only_accuracy(args.backbone, data, dataclasses.replace(recipe, epochs_per_round=epochs),
                               output / "head-only")
    print(f"\nMiMi accuracy {result.accuracy:.4f} vs head only {probe:.4f} (both {epochs} epochs, lr {recipe.lr:g}, "
          f"head lr {recipe.head_lr or recipe.lr:g}) "
          f"({'+' if result.accuracy >= probe else ''}{100 * (result.accuracy - probe):.1f} points) "
          f"in {time.perf_counter() - start:.0f} s")
    return {"accuracy": result.accuracy, "head_only": probe, "reload_identical": same, "widths": result.widths}


if __name__ == "__main__":
    main()
