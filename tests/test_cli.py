"""The ``peft-mimi`` command line: train, eval and info end to end on a tiny ViT, and its error messages."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peft_mimi.run as run_module
import peft_mimi.train as train_module
from peft_mimi import MiMiConfig
from peft_mimi.cli import main, train_parser
from peft_mimi.recipe import TrainingRecipe, mimi_setting_fields

TINY = ["--data", "digits", "--target-compression", "16", "--epochs-per-round", "1", "--batch-size", "16",
        "--max-train-samples", "64", "--max-eval-samples", "32", "--lr", "3e-3", "--checkpoint-every-steps", "2"]


def exit_code(argv: list[str]) -> int:
    """`main(argv)`'s exit code, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_train_then_eval_then_info(backbone, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", backbone, "--output-dir", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = metrics[-1]["accuracy"]
    assert f"accuracy {accuracy:.4f} after 2 pruning round(s)" in printed
    assert f"adapter saved to {out / 'adapter'}" in printed

    assert main(["eval", str(out / "adapter"), "--data", "digits", "--max-eval-samples", "32"]) == 0
    assert f"accuracy {accuracy:.4f} on the test split of digits" in capsys.readouterr().out

    assert main(["info", str(out / "adapter")]) == 0
    printed = capsys.readouterr().out
    widths = metrics[-1]["widths"]
    for name, width in widths.items():
        assert any(line.split() == [name, "32", str(width), f"{65 * width + 64 if width else 0:,}"]  # biases, scaling
                   for line in printed.splitlines())
    assert f"total {sum(widths.values())} {metrics[-1]['live_params']:,}" in " ".join(printed.split())
    assert "budget: 388 adapter parameters (target_compression 16); rounds done: 2" in printed

    # a finished run resumes to the same result without training again
    assert main(["train", "--model", backbone, "--output-dir", str(out), "--resume", *TINY]) == 0
    assert f"accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_train_refuses_to_overwrite_a_run(backbone, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    assert exit_code(["train", "--model", backbone, "--output-dir", str(tmp_path), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err


def test_nan_loss_exits_with_1_and_says_where(backbone, tmp_path, capsys, monkeypatch):
    real = run_module.make_collate_fn

    def nan_images(transform, num_labels=None):
        collate = real(transform, num_labels)
        return (lambda examples: {**collate(examples), "pixel_values": torch.full((len(examples), 3, 32, 32),
                                                                                    float("nan"))}
                ) if transform.train else collate

    monkeypatch.setattr(run_module, "make_collate_fn", nan_images)
    assert exit_code(["train", "--model", backbone, "--output-dir", str(tmp_path), *TINY]) == 1
    assert "training loss became nan in round 0, epoch 0, batch 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "m", "--data", "digits", "--output-dir", "o", "--target-compression", "8",
          "--target-params", "100"], "takes one budget"),
        (["train", "--model", "m", "--data", "digits", "--output-dir", "o", "--target-compression", "8",
          "--prune-ratio", "1.5"], "prune_ratio must be in (0, 1)"),
        (["train", "--model", "m", "--data", "digits", "--output-dir", "o", "--target-compression", "0"],
         "target_compression must be a number > 0"),
        (["train", "--model", "m", "--data", "digits", "--output-dir", "o", "--target-compression", "8",
          "--epochs-per-round", "0"], "epochs_per_round must be an int >= 1"),
        (["train", "--data", "digits", "--output-dir", "o", "--target-compression", "8"],
         "the following arguments are required: --model"),
        (["train", "--model", "m", "--data", "digits", "--output-dir", "o", "--target-compression", "8",
          "--selection", "best"], "invalid choice: 'best'"),
        (["eval", "no/such/dir", "--data", "digits"], "no/such/dir is not a directory"),
        (["info", "no/such/dir"], "no/such/dir is not a directory"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_2_and_a_message(argv, message, capsys):
    assert exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_inputs_exit_with_2(tmp_path, capsys):
    assert exit_code(["info", str(tmp_path)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert exit_code(["train", "--model", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o"), *TINY]) == 2
    assert "is not a built-in backbone" in capsys.readouterr().err


def test_method_options_come_from_mimi_config(backbone, tmp_path, monkeypatch):
    """activation, adapter_bias and init_weights reach the adapter from the command line."""
    seen = {}
    real = train_module.train

    def spy(model, data, output_dir, recipe, *, mimi, **kwargs):
        seen.update(mimi=mimi, recipe=recipe)
        return real(model, data, output_dir, recipe, mimi=mimi, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    argv = ["train", "--model", backbone, "--output-dir", str(tmp_path / "o"), *TINY, "--activation", "relu",
            "--adapter-bias", "--no-init-weights", "--head-lr", "0.01"]
    assert main(argv) == 0
    mimi = seen["mimi"]
    assert (mimi.activation, mimi.adapter_bias, mimi.init_weights) == ("relu", True, False)
    assert seen["recipe"].head_lr == 0.01 and seen["recipe"].lr == 3e-3
    config = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert (config["activation"], config["adapter_bias"], config["init_weights"]) == ("relu", True, False)


def test_the_adapter_design_options_parse_from_the_command_line(capsys):
    """init_weights takes yes/no or a start's name (and --no-init-weights); the design options parse to MiMiConfig's
    values, unset ones stay None for the design to fill, and a wrong name is a usage error naming the allowed ones."""
    def mimi_options(*extra):
        return train_parser().parse_args_into_dataclasses(["--model", "m", "--data", "d", "--output-dir", "o",
                                                           *extra])[1]

    options = mimi_options("--design", "paper", "--init-weights", "houlsby", "--channel-scaling", "--drop-path", "0.1")
    config = MiMiConfig(**dataclasses.asdict(options))
    assert (config.design, config.init_weights, config.channel_scaling, config.adapter_bias, config.drop_path) == (
        "paper", "houlsby", True, False, 0.1)  # adapter_bias: the paper's
    default = MiMiConfig(**dataclasses.asdict(mimi_options("--no-adapter-bias")))
    assert (default.design, default.adapter_bias, default.channel_scaling) == ("adapter_plus", False, True)
    assert mimi_options("--no-init-weights").init_weights is False
    assert mimi_options().init_weights is None and mimi_options("--init-weights", "no").init_weights is False
    with pytest.raises(SystemExit):
        mimi_options("--init-weights", "kaiming")
    assert "expected yes/no, true/false or one of houlsby; got 'kaiming'" in capsys.readouterr().err


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "peft-mimi"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "{train,eval,info,export}" in done.stdout


def test_the_train_options_are_the_fields_of_the_recipe_and_of_the_methods_config():
    """Every option of ``peft-mimi train`` comes from a dataclass field, with its default and help text: adding a
    field to TrainingRecipe or MiMiConfig adds the option, nothing else to edit."""
    options = {}
    for action in train_parser()._actions:  # the first action of each name (a --no_<flag> follows its flag)
        options.setdefault(action.dest, action)
    del options["help"]
    recipe = {f.name: f for f in dataclasses.fields(TrainingRecipe)}
    method = {f.name: f for f in mimi_setting_fields()}
    assert set(options) == {"model", "data", "output_dir", "resume", "push_to_hub"} | set(recipe) | set(method)
    for name, f in {**recipe, **method}.items():
        assert options[name].default == f.default and options[name].help.startswith(f.metadata["help"]), name
    # the method's settings, not PEFT's module lists, the recorded state or the recipe's own seed
    assert {"init_compression", "target_compression", "target_params", "prune_ratio", "selection", "score",
            "budget_tolerance"} <= set(method)
    assert not {"target_modules", "modules_to_save", "adapter_widths", "rounds_done", "seed"} & set(method)
    assert set(method) <= {f.name for f in dataclasses.fields(MiMiConfig)}


def test_info_names_the_default_budget_of_an_adapter_saved_with_the_default_config(backbone, tmp_path, capsys):
    from peft import get_peft_model
    from transformers import AutoModelForImageClassification

    model = get_peft_model(AutoModelForImageClassification.from_pretrained(backbone),
                           MiMiConfig(modules_to_save=["classifier"]))  # no budget given: σt = 32
    model.save_pretrained(tmp_path / "adapter")
    assert main(["info", str(tmp_path / "adapter"), "--model", backbone]) == 0
    assert "(target_compression 32); rounds done: 0" in capsys.readouterr().out
