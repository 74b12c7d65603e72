"""Bad input gets a clear error that names the problem and the fix; nothing unsafe is ever loaded."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model
from peft import PeftModel, get_peft_model

from peft_mimi import MiMiConfig

PACKAGE = Path(__file__).resolve().parents[1] / "peft_mimi"


def test_a_config_without_arguments_works_like_every_peft_config():
    config = MiMiConfig()
    assert (config.target_compression, config.target_params, config.effective_target_compression) == (None, None, 32.0)
    assert MiMiConfig(target_params=1000).effective_target_compression is None  # one budget only
    assert MiMiConfig.from_peft_type(**config.to_dict()).effective_target_compression == 32.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_compression": 8.0, "target_params": 100}, "takes one budget"),
        ({"target_compression": 0}, r"target_compression must be a number > 0, got 0"),
        ({"target_compression": float("nan")}, "target_compression must be a number > 0"),
        ({"target_compression": "32"}, "target_compression must be a number > 0, got '32'"),
        ({"target_params": -1}, "target_params must be an int >= 0, got -1"),
        ({"target_params": 1.5}, "target_params must be an int >= 0"),
        ({"target_compression": 8.0, "init_compression": -4}, "init_compression must be a number > 0"),
        ({"target_compression": 8.0, "prune_ratio": 1.0}, r"prune_ratio must be in \(0, 1\), got 1.0"),
        ({"target_compression": 8.0, "prune_ratio": 0}, r"prune_ratio must be in \(0, 1\)"),
        ({"target_compression": 8.0, "selection": "greedy"}, r"selection='greedy' is not known; choose one of"),
        ({"target_compression": 8.0, "score": "fisher"}, r"score='fisher' is not known; choose one of"),
        ({"target_compression": 8.0, "activation": "swish"}, r"activation='swish' is not known"),
        ({"target_compression": 8.0, "init_weights": "yes"},
         r"init_weights must be True, False or one of \('houlsby',\), got 'yes'"),
        ({"target_compression": 8.0, "channel_scaling": "yes"}, "channel_scaling must be True or False"),
        ({"target_compression": 8.0, "drop_path": 1.0}, r"drop_path is a probability in \[0, 1\) \(e.g. 0.1\)"),
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
    model = get_peft_model(make_model("vit", hidden_size=32), MiMiConfig(target_compression=16.0))
    model.save_pretrained(tmp_path)
    first = next(iter(model.base_model.adapter_widths()))  # the first block's attention output
    with pytest.raises(ValueError, match=rf"'{re.escape(first)}'.*\(8, 32\) in the weights file but "
                                         r"\(8, 64\) in the model"):
        PeftModel.from_pretrained(make_model("vit", hidden_size=64), tmp_path)


def test_target_modules_that_match_nothing_or_a_non_linear_layer():
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    # the defaults' names as the message lists them (their last two parts): 'attention.o_proj', 'mlp.fc2' in
    # transformers 5, 'output.dense' in 4.x
    adapted = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0)).base_model.adapter_widths()
    defaults = list(dict.fromkeys(".".join(name.split(".")[-2:]) for name in adapted))
    listed = ".*".join(re.escape(repr(suffix)) for suffix in defaults)
    with pytest.raises(NoMatchingPeftModuleError, match=r"not found in the base model.*Linear layers end in: "
                                                        rf"\[.*{listed}"):
        get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0, target_modules=["nothing"]))
    with pytest.raises(TypeError, match=rf"LayerNorm.*nn.Linear layers only.*{re.escape(defaults[0])}"):
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
    """A plain adapter (the paper's design: no biases, no scaling, two adapters per block), saved in ``path``."""
    model = get_peft_model(make_model("vit"), MiMiConfig(design="paper", target_compression=16.0))
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


class Crash(BaseException):
    """The process dies here: nothing after this point runs (not even `except Exception` handlers)."""


def _adapter_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_on_linux_a_save_swaps_the_directories_in_one_step_so_the_target_is_never_absent(tmp_path, monkeypatch):
    from peft_mimi import save_adapter

    target = tmp_path / "adapter"
    model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0, init_weights=False))
    save_adapter(model, target)
    model.base_model.prune_round()
    inode = target.stat().st_ino

    def replace(src, dst):  # the two-rename fallback would pass through a moment without the target
        raise AssertionError(f"renamed {src} -> {dst}")

    monkeypatch.setattr(os, "replace", replace)
    save_adapter(model, target)
    monkeypatch.undo()
    assert target.stat().st_ino != inode  # the new directory, swapped in
    assert PeftModel.from_pretrained(make_model("vit"), target).base_model.adapter_widths() == \
        model.base_model.adapter_widths()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the old one and the staging are gone


@pytest.mark.parametrize("crash_at", ["old aside", "new in", "aside deleted"])
def test_a_save_that_crashes_at_any_step_leaves_a_complete_adapter_and_the_next_call_recovers(
    tmp_path, monkeypatch, crash_at
):
    from peft_mimi import save_adapter
    from peft_mimi.files import recover_directory

    target = tmp_path / "adapter"
    model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0, init_weights=False))
    save_adapter(model, target)
    (target / "notes.txt").write_text("the user's own file")
    old = _adapter_files(target)
    model.base_model.prune_round()  # a newer adapter: other widths in the config, other tensors in the weights

    steps = []
    real_replace, real_rmtree = os.replace, __import__("shutil").rmtree

    def replace(src, dst):
        steps.append("old aside" if Path(src) == target else "new in" if Path(dst) == target else "other")
        if steps[-1] == crash_at:
            raise Crash
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if Path(path).name == f".old-{target.name}" and crash_at == "aside deleted":
            raise Crash
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("peft_mimi.files._exchange", lambda first, second: False)  # a system without the swap
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr("shutil.rmtree", rmtree)
    with pytest.raises(Crash):
        save_adapter(model, target)
    monkeypatch.undo()

    # at the crash, the target holds the complete old adapter or the complete new one; between the two renames it is
    # absent and the complete old one waits under the aside name
    found = target if target.exists() else target.with_name(f".old-{target.name}")
    assert found == target or crash_at == "new in"
    loaded = PeftModel.from_pretrained(make_model("vit"), found).base_model.adapter_widths()
    assert loaded == (model.base_model.adapter_widths() if crash_at == "aside deleted"
                      else json.loads(old["adapter_config.json"])["adapter_widths"])
    assert _adapter_files(found) == old or crash_at == "aside deleted"

    recover_directory(target)  # what the next save_adapter / publish_directory does first
    assert not target.with_name(f".old-{target.name}").exists()
    assert (_adapter_files(target) == old) == (crash_at != "aside deleted")
    save_adapter(model, target)
    assert PeftModel.from_pretrained(make_model("vit"), target).base_model.adapter_widths() == \
        model.base_model.adapter_widths()
    assert (target / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no staging or aside copy is left behind"


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


# ------------------------------------------------- adapter_config.json is checked against the weights before allocating
# the tiny ViT's adapted modules in the paper's design, in this transformers' names: block 0's attention and MLP
# outputs, then block 1's
ADAPTED = tuple(get_peft_model(make_model("vit"), MiMiConfig(design="paper", target_compression=16.0))
                .base_model.adapter_widths())
BLOCK_0 = os.path.commonprefix(ADAPTED[:2])  # 'vit.layers.0.' (transformers 5), 'vit.encoder.layer.0.' (4.x)
LAYER = ADAPTED[1]  # block 0's MLP output
KEY = f"base_model.model.{LAYER}"


def _edit_adapter(directory: Path, config: dict | None = None, tensors=None) -> None:
    """Rewrite the adapter in ``directory``: ``config`` entries replace those of adapter_config.json (None deletes),
    ``tensors(dict)`` edits the weights in place (a valid safetensors file is written back)."""
    from safetensors.torch import load_file, save_file

    if config:
        path = directory / "adapter_config.json"
        saved = json.loads(path.read_text())
        for key, value in config.items():
            if value is None:
                saved.pop(key, None)
            else:
                saved[key] = value
        path.write_text(json.dumps(saved))
    if tensors:
        path = directory / "adapter_model.safetensors"
        weights = load_file(path)
        tensors(weights)
        save_file(weights, path, metadata={"format": "pt"})


def _widths(**changes) -> dict:
    widths = dict.fromkeys(ADAPTED, 8)
    widths.update({LAYER: changes.pop("width", 8)})
    return {k: v for k, v in widths.items() if v is not None}


def _pop(*names):
    return lambda weights: [weights.pop(name) for name in names]


def _set(name, value):
    return lambda weights: weights.__setitem__(name, value)


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"adapter_widths": _widths(width=9)}, None,
         rf"adapter_config.json records width 9 for module '{LAYER}', which does not fit .*adapter_model.safetensors: "
         r"mimi_down.weight has shape \(8, 32\) in the weights file but \(9, 32\) at the recorded width\. The config "
         r"and the weights do not belong together.*Save the adapter again"),
        ({"adapter_widths": _widths(width=10**9)}, None,
         rf"records width 1000000000 for module '{LAYER}', which does not fit .*shape \(8, 32\) in the weights file"),
        ({"adapter_widths": _widths(width=0)}, None,
         rf"records width 0 \(removed\) for module '{LAYER}', but .*\(8, 32\)"),
        (None, _pop(f"{KEY}.mimi_down.weight", f"{KEY}.mimi_up.weight"),
         rf"holds no tensor for module '{LAYER}', but .*adapter_config.json records width 8 for it: the loader would "
         "allocate 8 neurons"),
        ({"adapter_widths": _widths(width=None)}, None,
         rf"holds an adapter for module '{LAYER}' \(mimi_down.weight of shape \(8, 32\)\) but .*adapter_config.json "
         "records no width for it"),
        ({"adapter_widths": {}}, None, r"records no adapter_widths \(got \{\}\), which every saved MiMi adapter has"),
        ({"adapter_bias": True}, None,
         rf"has adapter_bias=True but .* holds no biases for module '{re.escape(BLOCK_0)}"),
        (None, _set(f"{KEY}.mimi_down.weight", torch.zeros(8, 32, dtype=torch.int8)),
         rf"holds mimi_down.weight of module '{LAYER}' \(shape \(8, 32\)\) as I8; MiMi weights are floating point"),
        (None, _set(f"{KEY}.mimi_mask", torch.ones(8)),
         r"holds mimi_mask of module .* as F32; .* the neuron mask is BOOL"),
        (None, _set(f"{KEY}.mimi_mask", torch.ones(7, dtype=torch.bool)),
         r"holds mimi_mask of module .* with shape \(7,\), but its mimi_down.weight \(8, 32\) .* implies \(8,\)"),
        (None, _set(f"{KEY}.mimi_up.weight", torch.zeros(32, 7)),
         r"holds mimi_up.weight of module .* with shape \(32, 7\), but its mimi_down.weight \(8, 32\) \(width 8, "
         r"feature size 32\) implies \(32, 8\)"),
        (None, _set(f"{KEY}.mimi_down.weight", torch.zeros(256)),
         r"mimi_down.weight of module .* with shape \(256,\); it must be \(width, feature size\)"),
        (None, _pop(f"{KEY}.mimi_up.weight"), r"holds \['mimi_down.weight'\] for module .* but not both"),
        (None, lambda w: w.__setitem__(f"{KEY}.mimi_down.default.weight", w.pop(f"{KEY}.mimi_down.weight")),
         rf"holds a tensor named '{KEY}.mimi_down.default.weight' \(shape \(8, 32\)\), which is not a MiMi adapter "
         "tensor"),
    ],
    ids=["width", "huge-width", "width-0", "width-without-tensors", "unrecorded", "no-widths", "bias", "int-weights",
         "float-mask", "mask-shape", "up-shape", "1d-down", "down-without-up", "name"],
)
def test_a_config_that_disagrees_with_its_weights_is_refused_naming_file_module_width_and_shape(
    tmp_path, config, tensors, message
):
    _saved_adapter(tmp_path)
    _edit_adapter(tmp_path, config, tensors)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(make_model("vit"), tmp_path)


def test_an_adapter_saved_in_half_precision_or_with_masks_and_biases_still_loads(tmp_path):
    model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0, adapter_bias=True))
    model.base_model.model.get_submodule(LAYER).mask_neurons("default", torch.tensor([True, False] * 4))
    model.save_pretrained(tmp_path)
    _edit_adapter(tmp_path, tensors=lambda w: w.update({k: v.bfloat16() for k, v in w.items() if "mimi_mask" not in k}))
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert loaded.base_model.adapter_widths()[LAYER] == 4


def test_a_config_claiming_a_huge_width_is_refused_before_anything_is_allocated(tmp_path):
    """Before this check, PEFT built the 3-million-neuron adapter (768 MB) and only then compared it with the 8-neuron
    tensors; the refusal now comes from the header alone."""
    import subprocess
    import sys

    _saved_adapter(tmp_path)
    _edit_adapter(tmp_path, {"adapter_widths": _widths(width=3_000_000)})
    script = (
        "import resource, sys, json; sys.path.insert(0, sys.argv[1]); from conftest import make_model\n"
        "from peft import PeftModel; import peft_mimi\n"
        "base = make_model('vit'); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    PeftModel.from_pretrained(base, sys.argv[2]); error = None\n"
        "except ValueError as e:\n    error = str(e)\n"
        "print(json.dumps({'error': error, 'growth_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert re.search(rf"records width 3000000 for module '{LAYER}', which does not fit .* shape \(8, 32\)",
                     result["error"] or "")
    assert result["growth_kb"] < 50 * 1024, f"the refusal raised the peak RSS by {result['growth_kb'] / 1024:.0f} MB"


# ------------------------------------------------------------------- the weights are checked against the model
def test_the_package_has_no_import_cycle_and_the_config_reads_no_weights(tmp_path):
    import ast

    imports: dict[str, set[str]] = {}  # module -> the package's modules it imports, at the top or in a function
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imports[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0]
                names = [node.module] if node.module else [alias.name for alias in node.names]
                imports[module].update(f"{base}.{name}" for name in names)
    cycles = []
    for start in imports:  # depth-first from each module: does it reach itself?
        stack, seen = list(imports[start]), set()
        while stack:
            module = stack.pop()
            if module == start:
                cycles.append(start)
                break
            if module not in seen:
                seen.add(module)
                stack.extend(imports.get(module, ()))
    assert not cycles, f"modules that import themselves through others: {sorted(cycles)}"

    weights = _saved_adapter(tmp_path)
    weights.write_bytes(weights.read_bytes()[:100])  # damaged
    assert MiMiConfig.from_pretrained(str(tmp_path)).adapter_widths, "reading a config reads only the config"
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} .* is damaged"):  # loading the adapter checks
        PeftModel.from_pretrained(make_model("vit"), tmp_path)


def _config_and_weights(directory: Path):
    from peft_mimi.files import check_adapter_weights

    return MiMiConfig.from_pretrained(str(directory)), check_adapter_weights(directory)


def test_the_weights_are_checked_against_the_model_before_injection(tmp_path):
    from peft_mimi.files import check_adapter_fits_model

    _saved_adapter(tmp_path)
    config, weights = _config_and_weights(tmp_path)
    assert weights.adapters == dict.fromkeys(_widths(), (8, 32))
    check_adapter_fits_model(make_model("vit"), config, weights)  # the backbone it was made for
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    check_adapter_fits_model(loaded.base_model.model, config, weights)  # a second adapter onto wrapped layers

    with pytest.raises(ValueError, match=rf"Adapter mismatch in module '{re.escape(ADAPTED[0])}': "
                                         r"mimi_down.weight has shape \(8, 32\) in the weights file but \(8, 64\) in "
                                         r"the model \(recorded width 8\)\. The adapter in .* belongs to a different "
                                         r"backbone \(hidden size 32\)"):
        check_adapter_fits_model(make_model("vit", hidden_size=64), config, weights)
    with pytest.raises(ValueError, match=rf"records width 8 for module '{re.escape(ADAPTED[2])}', which this "
                                         r"ViTForImageClassification does not have .* different backbone"):
        check_adapter_fits_model(make_model("vit", layers=1), config, weights)
    config.adapter_widths.pop(LAYER)
    with pytest.raises(ValueError, match=rf"targets module '{LAYER}' .* but records no width for it"):
        check_adapter_fits_model(make_model("vit"), config, weights)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("target_modules", 5, r"target_modules must be a list of module names or a regex, .*; got 5"),
        ("target_modules", [["mlp.fc2"]], r"target_modules must be a list of module names or a regex"),
        ("target_modules", "[", r"target_modules='\[' is not a valid regex"),
        ("exclude_modules", [{}], r"exclude_modules must be a list of module names or a regex"),
        ("modules_to_save", "classifier", r"modules_to_save must be a list of module names, .*; got 'classifier'"),
        ("modules_to_save", ["("], r"modules_to_save has '\(', not a valid module name"),
    ],
)
def test_module_name_fields_of_the_wrong_type_are_refused_by_name(field, value, message):
    MiMiConfig(target_modules=["mlp.fc2"], exclude_modules=r".*\.0\..*", modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=message):
        MiMiConfig(**{field: value})
