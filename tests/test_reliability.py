"""Bad input gets a clear error that names the problem and the fix; nothing unsafe is ever loaded."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model
from peft import PeftModel, get_peft_model

from peft_mimi import MiMiConfig

PACKAGE = Path(__file__).resolve().parents[1] / "peft_mimi"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one budget"),
        ({"target_compression": 8.0, "target_params": 100}, "exactly one budget"),
        ({"target_compression": 0}, r"target_compression must be a number > 0, got 0"),
        ({"target_compression": float("nan")}, "target_compression must be a number > 0"),
        ({"target_compression": "32"}, "target_compression must be a number > 0, got '32'"),
        ({"target_params": -1}, "target_params must be an int >= 0, got -1"),
        ({"target_params": 1.5}, "target_params must be an int >= 0"),
        ({"target_compression": 8.0, "init_compression": -4}, "init_compression must be a number > 0"),
        ({"target_compression": 8.0, "prune_ratio": 1.0}, r"prune_ratio must be in \(0, 1\), got 1.0"),
        ({"target_compression": 8.0, "prune_ratio": 0}, r"prune_ratio must be in \(0, 1\)"),
        ({"target_compression": 8.0, "selection": "greedy"}, r"selection='greedy' is not known; choose one of"),
        ({"target_compression": 8.0, "score": "taylor"}, r"score='taylor' is not known; choose one of"),
        ({"target_compression": 8.0, "activation": "swish"}, r"activation='swish' is not known"),
        ({"target_compression": 8.0, "init_weights": "yes"}, "init_weights must be True or False"),
        ({"target_compression": 8.0, "adapter_widths": {"a": -1}}, r"adapter_widths\['a'\] must be an int >= 0"),
        ({"target_compression": 8.0, "adapter_widths": [1, 2]}, "adapter_widths must be a dict"),
        ({"target_compression": 8.0, "rounds_done": -1}, "rounds_done must be an int >= 0"),
    ],
)
def test_every_config_field_is_validated_with_the_field_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiMiConfig(**kwargs)


def test_a_budget_at_or_above_the_initial_size_means_no_pruning_with_a_warning():
    with pytest.warns(UserWarning, match="will not prune"):
        MiMiConfig(init_compression=4.0, target_compression=2.0)
    with pytest.warns(UserWarning, match="will not prune"):
        model = get_peft_model(make_model("vit"), MiMiConfig(target_params=10**9))
    assert model.base_model.num_rounds() == 0


def test_a_saved_config_with_a_malformed_value_is_refused_on_load(tmp_path):
    get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["prune_ratio"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"prune_ratio must be in \(0, 1\), got 2"):
        PeftModel.from_pretrained(make_model("vit"), tmp_path)


def test_a_config_from_a_newer_version_loads_with_a_warning(tmp_path):
    get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["a_future_option"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert any("a_future_option" in str(w.message) for w in caught)
    assert model.base_model.adapter_widths()


def test_an_adapter_for_another_hidden_size_is_refused_naming_module_and_shapes(tmp_path):
    get_peft_model(make_model("vit", hidden_size=32), MiMiConfig(target_compression=16.0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'vit.layers.0.attention.o_proj'.*\(8, 32\) in the weights file but "
                                         r"\(8, 64\) in the model"):
        PeftModel.from_pretrained(make_model("vit", hidden_size=64), tmp_path)


def test_target_modules_that_match_nothing_or_a_non_linear_layer():
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    with pytest.raises(NoMatchingPeftModuleError, match=r"not found in the base model.*Linear layers end in: "
                                                        r"\[.*'attention.o_proj'.*'mlp.fc2'"):
        get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0, target_modules=["nothing"]))
    with pytest.raises(TypeError, match=r"LayerNorm.*nn.Linear layers only.*attention.o_proj"):
        get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0, target_modules=["layernorm_before"]))


def test_nothing_is_ever_unpickled():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"import pickle|from pickle|\bdill\b|pickle\.loads?\(", line):
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
            if "trust_remote_code=True" in line:
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
    assert not offenders, offenders


def _saved_adapter(path: Path) -> Path:
    model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0))
    model.save_pretrained(path)
    return path / "adapter_model.safetensors"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: raw[: len(raw) // 2], "file not fully covered"),  # a save or copy cut short
        (lambda raw: raw[:5], "header"),  # cut inside the header
        (lambda raw: raw[:8] + b"\x00" + raw[9:], "invalid JSON in header"),  # a flipped header byte
        (lambda raw: raw + b"\x00" * 16, "file not fully covered"),  # trailing bytes
    ],
)
def test_a_damaged_weights_file_is_refused_naming_the_file(tmp_path, damage, reason):
    weights = _saved_adapter(tmp_path / "adapter")
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} \(.* bytes\) is damaged .*{reason}.*save the "
                                         r"adapter again|download it again"):
        PeftModel.from_pretrained(make_model("vit"), tmp_path / "adapter")
    # the same check guards a second adapter loaded into a model that already has one
    model = PeftModel.from_pretrained(make_model("vit"), _saved_adapter(tmp_path / "good").parent)
    with pytest.raises(ValueError, match="is damaged"):
        model.load_adapter(tmp_path / "adapter", adapter_name="other")


def test_a_missing_weights_file_is_named_before_peft_fails(tmp_path):
    _saved_adapter(tmp_path).unlink()
    with pytest.warns(UserWarning, match=rf"{re.escape(str(tmp_path))} holds adapter_config.json but no "
                                         r"adapter_model.safetensors.*save the adapter again"):
        with pytest.raises(Exception):  # noqa: B017, PT011  (PEFT then tries the path as a Hub repo id)
            PeftModel.from_pretrained(make_model("vit"), tmp_path)


def test_save_adapter_that_fails_midway_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    import peft.peft_model

    from peft_mimi import save_adapter

    target = tmp_path / "adapter"
    model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0))
    save_adapter(model, target)
    (target / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    real_save_file = peft.peft_model.safe_save_file  # what PeftModel.save_pretrained writes with

    def disk_full(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata)
        with open(filename, "r+b") as handle:  # half of the file reached the disk, then the disk was full
            handle.truncate(Path(filename).stat().st_size // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "mimi_up" in n).add_(1.0)  # a newer state to save
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not list(tmp_path.glob(".tmp-*")), "the staging directory is removed"
    monkeypatch.undo()
    PeftModel.from_pretrained(make_model("vit"), target)  # the previous adapter still loads

    save_adapter(model, target)  # a save that succeeds replaces the adapter and keeps the user's file
    assert (target / "notes.txt").read_text() == "the user's own file"
    assert (target / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]


def test_loading_without_importing_peft_mimi_fails_in_peft_and_the_card_says_what_to_import(tmp_path):
    import subprocess
    import sys

    from peft_mimi.card import model_card

    model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0))
    model.save_pretrained(tmp_path)
    tests, path = str(Path(__file__).parent), str(tmp_path)
    script = (
        f"import sys; sys.path.insert(0, {tests!r}); from conftest import make_model; from peft import PeftModel\n"
        f"try:\n    PeftModel.from_pretrained(make_model('vit'), {path!r})\n"
        "except KeyError as error:\n    print('KeyError', error)\n"
        f"import peft_mimi\nPeftModel.from_pretrained(make_model('vit'), {path!r}); print('loaded after import')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "KeyError 'MIMI'" in out.stdout and "loaded after import" in out.stdout
    assert "import peft_mimi" in model_card(model)
