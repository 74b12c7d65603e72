"""The ``peft-mimi`` command: train a MiMi adapter, evaluate a saved one, show its widths.

    peft-mimi train --model fmnist-vit --data digits --target-compression 64 --output-dir runs/digits
    accelerate launch --num_processes 2 -m peft_mimi.cli train ...           (the same run on two GPUs)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m peft_mimi.cli train ...  (two CPU
        processes over gloo; `accelerate launch --cpu --num_processes 2` starts only one without mpirun)
    peft-mimi eval runs/digits/adapter --data digits
    peft-mimi info runs/digits/adapter
    peft-mimi export runs/digits/adapter model.onnx          (or model.pt2: torch.export; --compiled: AOTInductor)

Exit codes: 0 success, 1 training failed (e.g. the loss became NaN), 2 bad arguments or inputs, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, get_type_hints

from .card import saved_round, searched_rounds
from .config import ACTIVATIONS, DESIGNS, INITS, MiMiConfig
from .pruning import SCORES, SELECTIONS, adapter_params
from .recipe import TrainingRecipe, mimi_setting_fields
from .schedule import standard_error

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# the allowed values of MiMiConfig's fields that take one of a few names
_CHOICES = {"design": tuple(DESIGNS), "selection": SELECTIONS, "score": SCORES, "activation": ACTIVATIONS}
# and those that take True, False or a name: an option that reads yes/no or one of the names (and has --no-NAME)
_BOOL_OR_NAME = {"init_weights": INITS}


def _bool_or_name(names: Sequence[str]) -> Callable[[str], bool | str]:
    def parse(text: str) -> bool | str:
        if text in names:
            return text
        lowered = text.lower()
        if lowered in ("yes", "true", "t", "y", "1"):
            return True
        if lowered in ("no", "false", "f", "n", "0"):
            return False
        raise argparse.ArgumentTypeError(f"expected yes/no, true/false or one of {', '.join(names)}; got {text!r}")
    return parse


@dataclass
class RunArguments:
    """What to train on what, and where the run goes."""

    model: str = field(metadata={"help": "backbone: a built-in name (fmnist-vit, fmnist-swin, dinov2-s14), a local "
                                         "directory or a Hub id"})
    data: str = field(metadata={"help": "dataset: a built-in name (digits, mnist, faces, textures, fashion_mnist), "
                                        "an image folder or a Hub dataset id"})
    output_dir: str = field(metadata={"help": "where metrics.jsonl, checkpoints/ and the final adapter/ go"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --output-dir"})
    push_to_hub: Optional[str] = field(default=None, metadata={
        "help": "upload the adapter to this Hub model repository (uses your saved Hub login)", "metavar": "REPO"})


def _options(name: str, owner: type, fields: Sequence[dataclasses.Field]) -> type:
    """A dataclass of ``owner``'s ``fields`` (same names, types, defaults and help texts) for the parser, with only
    the metadata argparse takes, and the choices of `_CHOICES`."""
    hints = get_type_hints(owner)
    made = []
    for f in fields:
        metadata = {key: f.metadata[key] for key in ("help", "metavar") if key in f.metadata}
        if f.name in _CHOICES:
            metadata["choices"] = list(_CHOICES[f.name])
        hint = hints[f.name]
        if f.name in _BOOL_OR_NAME or hint == Optional[bool]:  # a yes/no option (`train_parser` widens the former's
            hint = bool  # type to take names too); None, unset, leaves MiMiConfig's design to choose
        made.append((f.name, hint, field(default=f.default, metadata=metadata)))
    options = dataclasses.make_dataclass(name, made)
    options.__module__ = __name__
    return options


def train_parser():
    """The parser of ``peft-mimi train``: :class:`RunArguments`, MiMiConfig's method fields
    (`peft_mimi.recipe.mimi_setting_fields`) and every field of :class:`~peft_mimi.recipe.TrainingRecipe`, each
    option declared once, in its dataclass."""
    from transformers import HfArgumentParser

    mimi = _options("MiMiOptions", MiMiConfig, mimi_setting_fields())
    recipe = _options("RecipeOptions", TrainingRecipe, dataclasses.fields(TrainingRecipe))
    parser = HfArgumentParser((RunArguments, mimi, recipe), prog="peft-mimi train",
                              description="Run MiMi's schedule: train, prune, ..., train; save the adapter. Give at "
                                          "most one budget: --target-compression (default 32) or --target-params.")
    hints = get_type_hints(MiMiConfig)
    yes_no = [f.name for f in mimi_setting_fields() if f.name in _BOOL_OR_NAME or hints[f.name] == Optional[bool]]
    for action in parser._actions:  # argparse keeps no public handle on an option's type
        if action.dest in _BOOL_OR_NAME and action.const is not False:  # not the --no-NAME complement
            action.type = _bool_or_name(_BOOL_OR_NAME[action.dest])
    for name in yes_no:  # HfArgumentParser adds --no-NAME only to options that default to True; these default to
        # None (the design chooses), and --no-NAME still says no
        parser.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", action="store_false", dest=name,
                            help=f"same as --{name.replace('_', '-')} no")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``peft-mimi`` (subcommands ``train``, ``eval``, ``info``, ``export``); ``train``'s own
    options come from :func:`train_parser`."""
    parser = argparse.ArgumentParser(
        prog="peft-mimi", description="MiMi (Mini but Mighty) adapters for Vision Transformers, with PEFT.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,info,export}")
    commands.add_parser("train", help="run MiMi's schedule: train, prune, ..., train; save the adapter "
                                      "(peft-mimi train --help lists its options)", add_help=False)

    evaluate = commands.add_parser("eval", help="accuracy of a saved adapter on a dataset's test split")
    evaluate.add_argument("adapter_dir", type=Path, help="a saved MiMi adapter (OUTPUT_DIR/adapter)")
    evaluate.add_argument("--data", required=True, help="dataset, as for train")
    evaluate.add_argument("--model", default=None, help="backbone (default: the one recorded in the adapter)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--max-eval-samples", type=int, default=None)

    info = commands.add_parser("info", help="per-layer widths, parameter counts, budget and rounds of an adapter")
    info.add_argument("adapter_dir", type=Path, help="a saved MiMi adapter (OUTPUT_DIR/adapter)")
    info.add_argument("--model", default=None, help="backbone (default: the one recorded in the adapter)")

    export = commands.add_parser("export", help="a saved adapter on its backbone as one ONNX file or torch.export "
                                                "program, pixel_values -> logits (peft_mimi.export)")
    export.add_argument("adapter_dir", type=Path, help="a saved MiMi adapter (OUTPUT_DIR/adapter)")
    export.add_argument("output", type=Path, help="the file to write: NAME.onnx or NAME.pt2")
    export.add_argument("--model", default=None, help="backbone (default: the one recorded in the adapter)")
    export.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the processor's)")
    export.add_argument("--compiled", action="store_true",
                        help="NAME.pt2 compiled ahead of time by AOTInductor for this machine (the fastest PyTorch "
                             "form; needs a C++ compiler here, torch alone to run)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-mimi`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its options come from the dataclasses (train_parser)
        return _exit_code("train", lambda: _train(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "adapter_dir", None) is not None and not args.adapter_dir.is_dir():
        parser.error(f"{args.adapter_dir} is not a directory; pass the adapter directory that `peft-mimi train` "
                     "writes (OUTPUT_DIR/adapter)")
    return _exit_code(args.command, lambda: {"eval": _eval, "info": _info, "export": _export}[args.command](args))


def _exit_code(command: str, run: Callable[[], int]) -> int:
    """``run()``'s exit code; a known failure is printed as one line naming ``command`` and mapped to its code."""
    try:
        return run()
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as err:
        print(f"peft-mimi {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as err:
        print(f"peft-mimi {command}: training failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"peft-mimi {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(argv: list[str]) -> int:
    from .train import train

    run, mimi_options, recipe_options = train_parser().parse_args_into_dataclasses(args=argv)
    mimi = MiMiConfig(**dataclasses.asdict(mimi_options))
    recipe = TrainingRecipe(**dataclasses.asdict(recipe_options))
    result = train(run.model, run.data, run.output_dir, recipe, mimi=mimi, resume=run.resume,
                   push_to_hub=run.push_to_hub)
    from accelerate import PartialState

    if PartialState().is_main_process:
        kept = sum(width > 0 for width in result.widths.values())
        print(f"accuracy {result.accuracy:.4f} after {result.rounds} pruning round(s); {result.live_params:,} "
              f"adapter parameters (budget {result.budget:,}), {kept} of {len(result.widths)} adapters kept")
        if result.chosen_round is not None:
            searched = searched_rounds(result.history)
            kept, images = searched[result.chosen_round], searched[result.chosen_round]["validation_images"]
            noise = standard_error(kept["validation_accuracy"], images)
            print(f"budget search kept round {result.chosen_round} of {len(searched)} trained alike (validation "
                  f"accuracy {kept['validation_accuracy']:.4f} on {images} images, standard error {noise:.1f} points; "
                  f"best {max(row['validation_accuracy'] for row in searched):.4f}; tolerance "
                  f"{mimi.budget_tolerance:g} points), then finished it")
        print(f"adapter saved to {result.adapter_dir}" + (f", pushed to {result.hub_url}" if result.hub_url else ""))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_adapter

    accuracy = evaluate_adapter(args.adapter_dir, args.data, model=args.model, batch_size=args.batch_size,
                                max_eval_samples=args.max_eval_samples)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"accuracy {accuracy:.4f} on the test split of {args.data}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .evaluate import load_adapter
    from .serving import RUN_FILE

    model, _ = load_adapter(args.adapter_dir, model=args.model)
    tuner = model.base_model
    config = tuner.peft_config[tuner.active_adapters[0]]
    widths, dims = tuner.adapter_widths(), tuner.feature_sizes()
    name_width = max([len("module"), *map(len, widths)])
    rows = [f"{'module':<{name_width}}  {'d':>6}  {'width':>6}  {'params':>10}"]
    for name, width in widths.items():
        rows.append(f"{name:<{name_width}}  {dims[name]:>6}  {width:>6}  "
                    f"{adapter_params(dims[name], width, **config.param_terms):>10,}")
    rows.append(f"{'total':<{name_width}}  {'':>6}  {sum(widths.values()):>6}  {tuner.live_params():>10,}")
    target = (f"target_compression {config.effective_target_compression:g}" if config.target_params is None
              else f"target_params {config.target_params:,}")
    print(f"MiMi adapter {args.adapter_dir} on {args.model or config.base_model_name_or_path}")
    print("\n".join(rows))
    print(f"adapters kept: {sum(w > 0 for w in widths.values())} of {len(widths)}")
    print(f"budget: {tuner.budget():,} adapter parameters ({target}); rounds done: {config.rounds_done} "
          f"(prune ratio {config.prune_ratio:g}, {config.selection} selection, score {config.score})")
    run_file = args.adapter_dir / RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    if run.get("history"):
        saved = saved_round(run["history"])
        if config.budget_tolerance is not None and saved.get("chosen_round") is not None:
            print(f"budget search (tolerance {config.budget_tolerance:g} points): kept round {saved['chosen_round']} "
                  f"of {len(searched_rounds(run['history']))} on validation accuracy; the budget above is the floor "
                  "it could go to")
        print(f"test accuracy: {saved['accuracy']:.4f} on {run.get('data')}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .data import ImageTransform
    from .evaluate import load_adapter
    from .export import export_compiled, export_onnx, export_program

    writers = {".onnx": export_onnx, ".pt2": export_compiled if args.compiled else export_program}
    if args.output.suffix not in writers:
        raise ValueError(f"{args.output}: name the output NAME.onnx (ONNX) or NAME.pt2 (torch.export; with "
                         "--compiled, an AOTInductor package).")
    if args.compiled and args.output.suffix != ".pt2":
        raise ValueError(f"{args.output}: --compiled writes an AOTInductor package; name it NAME.pt2.")
    model, processor = load_adapter(args.adapter_dir, model=args.model)
    size = args.image_size or ImageTransform.from_processor(processor, train=False).image_size[0]
    writers[args.output.suffix](model, torch.zeros(1, 3, size, size), args.output)
    print(f"wrote {args.output}: pixel_values (batch, 3, {size}, {size}) -> logits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
