"""The ``peft-mimi`` command: train a MiMi adapter, evaluate a saved one, show its widths.

    peft-mimi train --model fmnist-vit --data digits --target-compression 64 --output-dir runs/digits
    accelerate launch --num_processes 2 -m peft_mimi.cli train ...           (the same run on two GPUs)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m peft_mimi.cli train ...  (two CPU
        processes over gloo; `accelerate launch --cpu --num_processes 2` starts only one without mpirun)
    peft-mimi eval runs/digits/adapter --data digits
    peft-mimi info runs/digits/adapter

Exit codes: 0 success, 1 training failed (e.g. the loss became NaN), 2 bad arguments or inputs, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .pruning import SCORES, SELECTIONS, adapter_params

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _ratio(text: str) -> float:
    value = _positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``peft-mimi`` (subcommands ``train``, ``eval``, ``info``)."""
    parser = argparse.ArgumentParser(
        prog="peft-mimi", description="MiMi (Mini but Mighty) adapters for Vision Transformers, with PEFT.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,info}")

    train = commands.add_parser("train", help="run MiMi's schedule: train, prune, ..., train; save the adapter",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--model", required=True, help="backbone: a built-in name (fmnist-vit, fmnist-swin, "
                       "dinov2-s14), a local directory or a Hub id")
    train.add_argument("--data", required=True, help="dataset: a built-in name (digits, mnist, faces, textures, "
                       "fashion_mnist), an image folder or a Hub dataset id")
    train.add_argument("--output-dir", required=True, type=Path,
                       help="where metrics.jsonl, checkpoints/ and the final adapter/ go")
    budget = train.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-compression", type=_positive_float, help="σt: prune to the size of uniform "
                        "adapters of width d/σt")
    budget.add_argument("--target-params", type=_positive_int, help="prune to at most this many adapter parameters")
    train.add_argument("--init-compression", type=_positive_float, default=4.0, help="σ0: start width d/σ0")
    train.add_argument("--prune-ratio", type=_ratio, default=0.5, help="ρ: fraction of neurons removed per round")
    train.add_argument("--selection", choices=SELECTIONS, default="global", help="rank neurons across all "
                       "adapters (global, MiMi) or within each (local)")
    train.add_argument("--score", choices=SCORES, default="mimi", help="neuron importance score")
    train.add_argument("--epochs-per-round", type=_positive_int, default=2, help="E: epochs trained per round")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="batch size per process")
    train.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1)
    train.add_argument("--lr", type=_positive_float, default=None,
                       help="peak learning rate (default: 5e-4 x effective batch / 512)")
    train.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases)")
    train.add_argument("--warmup-ratio", type=float, default=0.1, help="warm-up fraction of each round's steps")
    train.add_argument("--max-grad-norm", type=_positive_float, default=5.0, help="gradient clipping")
    train.add_argument("--image-size", type=_positive_int, default=None,
                       help="train and evaluate at this size (default: the backbone's)")
    train.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                       help="no horizontal flips (default: flip unless the dataset forbids it)")
    train.add_argument("--max-train-samples", type=_positive_int, default=None, help="use a random subset")
    train.add_argument("--max-eval-samples", type=_positive_int, default=None, help="use a random subset")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    train.add_argument("--checkpoint-every-steps", type=_positive_int, default=None,
                       help="also checkpoint every N optimizer steps (always at the end of each round)")
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                       help="default: accelerate's configuration")
    train.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    train.add_argument("--push-to-hub", metavar="REPO", default=None,
                       help="upload the adapter to this Hub model repository (uses your saved Hub login)")

    evaluate = commands.add_parser("eval", help="accuracy of a saved adapter on a dataset's test split")
    evaluate.add_argument("adapter_dir", type=Path, help="a saved MiMi adapter (OUTPUT_DIR/adapter)")
    evaluate.add_argument("--data", required=True, help="dataset, as for train")
    evaluate.add_argument("--model", default=None, help="backbone (default: the one recorded in the adapter)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64)
    evaluate.add_argument("--max-eval-samples", type=_positive_int, default=None)

    info = commands.add_parser("info", help="per-layer widths, parameter counts, budget and rounds of an adapter")
    info.add_argument("adapter_dir", type=Path, help="a saved MiMi adapter (OUTPUT_DIR/adapter)")
    info.add_argument("--model", default=None, help="backbone (default: the one recorded in the adapter)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-mimi`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "adapter_dir", None) is not None and not args.adapter_dir.is_dir():
        parser.error(f"{args.adapter_dir} is not a directory; pass the adapter directory that `peft-mimi train` "
                     "writes (OUTPUT_DIR/adapter)")
    try:
        return {"train": _train, "eval": _eval, "info": _info}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as err:
        print(f"peft-mimi {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as err:
        print(f"peft-mimi {args.command}: training failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"peft-mimi {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(args: argparse.Namespace) -> int:
    from .train import train

    result = train(
        args.model, args.data, args.output_dir, target_compression=args.target_compression,
        target_params=args.target_params, init_compression=args.init_compression, prune_ratio=args.prune_ratio,
        selection=args.selection, score=args.score, epochs_per_round=args.epochs_per_round,
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        image_size=args.image_size, flip=args.flip, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, seed=args.seed, mixed_precision=args.mixed_precision,
        resume=args.resume, checkpoint_every_steps=args.checkpoint_every_steps, push_to_hub=args.push_to_hub,
        num_workers=args.num_workers,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        kept = sum(width > 0 for width in result.widths.values())
        print(f"accuracy {result.accuracy:.4f} after {result.rounds} pruning round(s); {result.live_params:,} "
              f"adapter parameters (budget {result.budget:,}), {kept} of {len(result.widths)} adapters kept")
        print(f"adapter saved to {result.adapter_dir}" + (f", pushed to {result.hub_url}" if result.hub_url else ""))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .train import evaluate_adapter

    accuracy = evaluate_adapter(args.adapter_dir, args.data, model=args.model, batch_size=args.batch_size,
                                max_eval_samples=args.max_eval_samples)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"accuracy {accuracy:.4f} on the test split of {args.data}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .train import RUN_FILE, load_adapter

    model, _ = load_adapter(args.adapter_dir, model=args.model)
    tuner = model.base_model
    config = tuner.peft_config[tuner.active_adapters[0]]
    widths, dims = tuner.adapter_widths(), tuner.feature_sizes()
    name_width = max([len("module"), *map(len, widths)])
    rows = [f"{'module':<{name_width}}  {'d':>6}  {'width':>6}  {'params':>10}"]
    for name, width in widths.items():
        rows.append(f"{name:<{name_width}}  {dims[name]:>6}  {width:>6}  "
                    f"{adapter_params(dims[name], width, config.adapter_bias):>10,}")
    rows.append(f"{'total':<{name_width}}  {'':>6}  {sum(widths.values()):>6}  {tuner.live_params():>10,}")
    target = (f"target_compression {config.target_compression:g}" if config.target_compression is not None
              else f"target_params {config.target_params:,}")
    print(f"MiMi adapter {args.adapter_dir} on {args.model or config.base_model_name_or_path}")
    print("\n".join(rows))
    print(f"adapters kept: {sum(w > 0 for w in widths.values())} of {len(widths)}")
    print(f"budget: {tuner.budget():,} adapter parameters ({target}); rounds done: {config.rounds_done} "
          f"(prune ratio {config.prune_ratio:g}, {config.selection} selection, score {config.score})")
    run_file = args.adapter_dir / RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    if run.get("history"):
        print(f"test accuracy: {run['history'][-1]['accuracy']:.4f} on {run.get('data')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
