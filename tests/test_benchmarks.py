"""Every benchmark keeps working: its smoke mode runs end to end and writes its result files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def assert_drawn(path: Path) -> None:
    """``path`` is a PNG that decodes to a picture with something drawn on it, not a blank or tiny canvas."""
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 200 and pixels[..., :3].std() > 0.02, path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "extra", "outputs"),
    [
        ("bench_inference.py", [], ["inference.md", "inference.json"]),
        ("bench_storage.py", [], ["storage.md", "storage.json"]),
        ("bench_training_cost.py", [], ["training_cost.md", "training_cost.json"]),
    ],
)
def test_benchmark_smoke_mode_writes_its_results(script, extra, outputs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(tmp_path), *extra],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    raw = json.loads((tmp_path / outputs[1]).read_text())
    assert raw["config"]["smoke"] is True
    table = (tmp_path / outputs[0]).read_text()
    if script == "bench_storage.py":
        (result,) = raw["results"].values()
        variants = {v["label"]: v for v in result["variants"]}
        assert set(variants) == {
            "MiMi σt=16 compacted", "MiMi σt=64 compacted", "MiMi σt=64 masked (compact=False)",
            "Adapters σ=4 (vanilla)", "Adapters σ=64 (vanilla)", "LoRA r=2 (≈B(σt=16))", "LoRA r=1 (≈B(σt=64))",
            "Linear probe (head)", "BitFit (biases + head)", "Full fine-tuning (whole model)"}
        stored = {label: v["fp32"]["stored_values"] for label, v in variants.items()}
        head = stored["Linear probe (head)"]
        # pruned to the budget, MiMi stores what vanilla adapters of the final width store; masked, what σ = 4 stores
        assert head < stored["MiMi σt=64 compacted"] == stored["Adapters σ=64 (vanilla)"]
        assert stored["MiMi σt=64 compacted"] < stored["MiMi σt=16 compacted"]
        assert stored["MiMi σt=64 masked (compact=False)"] > stored["Adapters σ=4 (vanilla)"]
        assert stored["Full fine-tuning (whole model)"] == result["backbone_params"] + head
        for label in ("MiMi σt=16 compacted", "MiMi σt=64 compacted"):  # float tensors only: 4 and 2 bytes a value
            assert variants[label]["fp32"]["tensor_bytes"] == 4 * stored[label] == 2 * variants[label]["bf16"][
                "tensor_bytes"]
            assert f"| {label} | {stored[label]:,} |" in table
    if script == "bench_training_cost.py":
        runs = {label: rows[0] for label, rows in raw["runs"].items()}
        mimi = next(row for label, row in runs.items() if label.startswith("MiMi"))
        vanilla = runs["Adapters σ=16"]
        assert raw["epochs"] == (raw["rounds"] + 1) * raw["config"]["epochs_per_round"] == sum(
            segment["epochs"] for segment in mimi["segments"])
        sizes = [segment["live_params"] for segment in mimi["segments"]]
        assert sizes == sorted(sizes, reverse=True) and len(sizes) == raw["rounds"] + 1
        assert sizes[0] == runs["Adapters σ=4"]["method_params"] and mimi["method_params"] == sizes[-1]
        assert 0 < mimi["method_params"] <= vanilla["method_params"], "MiMi ends within the budget of σt = 16"
        assert all(0 <= row["accuracy"] <= 1 and row["wall_s"] > 0 for row in runs.values())
        assert raw["mimi_over_vanilla"] == pytest.approx(mimi["wall_s"] / vanilla["wall_s"], rel=0.05)
        for label, row in runs.items():
            assert f"| {label} | {row['method_params']:,} | {raw['epochs']} |" in table
    if script == "bench_inference.py":  # each variant also timed alone with its reference; the package as deployed
        (variants,) = [r["variants"] for r in raw["results"].values()]
        mimi = {k: v for k, v in variants.items() if k.startswith("MiMi σt=64 (")}
        backbone, wide = variants["backbone (no adapter)"], variants["Adapters σ=4, vanilla (not timed)"]
        assert backbone["adapter_params"] == 0 and len({v["adapter_params"] for v in mimi.values()}) == 1
        assert 0 < next(iter(mimi.values()))["adapter_params"] < wide["adapter_params"]
        # counted FLOPs: pruned adapters cost a little, masked ones what the wide adapters cost, merged LoRA nothing
        pruned = mimi["MiMi σt=64 (3/4 adapters), default"]["gflops"]
        assert backbone["gflops"] < pruned < variants["MiMi σt=64 masked, not shrunk (not timed)"]["gflops"] == \
            wide["gflops"]
        assert variants["LoRA r=1 merged"]["gflops"] == backbone["gflops"]
        assert all(t > 0 for v in variants.values() for times in v.get("latency_s", {}).values() for t in times)
        assert f"| backbone (no adapter) | 0 | {backbone['gflops']:.4f} | +0.00% |" in table
        assert all(v["pair_ratio"].keys() == {"1", "4"} for k, v in variants.items() if k.startswith("MiMi")
                   and "latency_s" in v)
        (compiled,) = [v for k, v in variants.items() if k.startswith("MiMi") and "export_compiled" in k]
        assert compiled["deployed_ratio"]["1"] > 0 and "packages" not in compiled
        assert len(compiled["deployed_ratios"]["4"]) == 2  # the smoke run's fresh processes, each timed
        # and in each, a copy of the backbone's package against the backbone's: the measurement's own spread
        assert len(compiled["control_ratios"]["4"]) == 2 and all(r > 0 for r in compiled["control_ratios"]["4"])


@pytest.mark.slow
def test_inference_benchmark_pairs_the_compiled_model_with_the_compiled_backbone(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--smoke", "--no-aot", "--compile",
                    "--notes", "a 'quoted' note", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    raw = json.loads((tmp_path / "inference.json").read_text())
    (variants,) = [r["variants"] for r in raw["results"].values()]
    (compiled,) = [v for k, v in variants.items() if k.startswith("MiMi") and "torch.compile" in k]
    assert compiled["same_form_as"] == "backbone (no adapter), torch.compile"  # not the eager backbone
    assert compiled["same_form_ratio"].keys() == compiled["pair_ratio"].keys() == {"1", "4"}
    # the command on top of the results can be pasted back into a shell
    assert "--notes 'a '\"'\"'quoted'\"'\"' note'" in (tmp_path / "inference.md").read_text().splitlines()[0]


@pytest.mark.slow
def test_accuracy_benchmark_smoke_runs_every_part_and_the_summary_pairs_seeds(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "smoke-vit"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_accuracy.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert {r["method"]["kind"] for r in accuracy["rows"]} == {"mimi", "adapter", "lora", "adalora", "linear",
                                                                "probe", "pixels"}
    floors = [r for r in accuracy["rows"] if r["method"]["kind"] in ("probe", "pixels")]
    assert all(r["floor"]["n_iter"] < r["floor"]["max_iter"] and r["epochs"] == 0 for r in floors), "converged"
    trained = [r for r in accuracy["rows"] if r["method"]["kind"] not in ("probe", "pixels")]
    assert all(r["segments"] and r["segments"][-1]["loss"] for r in trained), "per-epoch losses from the history"
    at_budget = [r for r in accuracy["rows"] if r["budget_sigma"] is not None]
    assert len({r["epochs"] for r in at_budget}) == 1, "every method at a budget trains MiMi's epochs"
    adalora = next(r for r in at_budget if r["method"]["kind"] == "adalora")
    assert 0 < adalora["method_params"] <= 4 * next(r for r in at_budget if r["method"]["kind"] == "lora")[
        "method_params"], "AdaLoRA's count is its surviving ranks, not its initial 4x rank"

    ablation = json.loads((out / "ablation.json").read_text())["rows"]
    mimi = next(r for r in ablation if r["label"] == "global / mimi")
    scratch = next(r for r in ablation if r["method"]["kind"] == "widths")
    assert scratch["method"]["widths"] == mimi["widths"] and scratch["method_params"] == mimi["method_params"]
    assert scratch["epochs"] == mimi["epochs"]

    sweep = json.loads((out / "sweep.json").read_text())["rows"]
    for row in (r for r in sweep if r["method"]["kind"] == "mimi"):  # each setting has a same-epochs vanilla run
        assert any(v["method"]["kind"] == "adapter" and v["epochs"] == row["epochs"] for v in sweep), row["label"]
    assert_drawn(out / "accuracy.png")
    for run in json.loads((out / "allocation.json").read_text())["runs"]:  # the per-layer widths MiMi ended with
        assert run["widths"].keys() == run["initial_widths"].keys()
        assert all(0 <= width <= run["initial_widths"][module] for module, width in run["widths"].items())
        assert run["adapters_alive"] == sum(width > 0 for width in run["widths"].values()) > 0
        assert 0 <= run["accuracy"] <= 1
        assert_drawn(out / run["plot"])

    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summarize.py"), "--results", str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    cell = summary["backbones"]["smoke-vit"]["cells"][0]
    diff = cell["mimi_minus_adapter"]
    assert diff["wins"] + diff["ties"] + diff["losses"] == 1
    assert abs(diff["mean_diff"] - 100 * (cell["accuracy_mimi"][0] - cell["accuracy_adapter"][0])) < 1e-9


@pytest.mark.slow
def test_pretrain_backbones_smoke_trains_both_through_train_and_the_shipped_cards_name_the_old_loop(
    tmp_path, monkeypatch
):
    require_fashion_mnist()  # the backbones were pretrained on it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = ROOT / "benchmarks" / "pretrain_backbones.py"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=120)
    for name in ("fmnist-vit", "fmnist-swin"):
        folder = tmp_path / name
        for file in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
            assert (folder / file).stat().st_size > 0, f"{name}/{file}"
        log = json.loads((folder / "pretrain_log.json").read_text())
        assert log["trainer"] == "peft_mimi.train.train" and log["epochs"] == 1
        assert log["training_recipe"]["head_lr"] is None and log["training_recipe"]["warmup_ratio"] == 0.05
        assert [row["epoch"] for row in log["history"]] == [1] and log["history"][0]["train_loss"] > 0
        assert 0 <= log["test_accuracy"] <= 1 and 0 <= log["test_accuracy_first_2000"] <= 1

    # The shipped weights came from the old loop: their cards are what the script renders for such a log.
    spec = importlib.util.spec_from_file_location("pretrain_backbones", script)
    pretrain = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, pretrain)  # its dataclass looks its module up there
    spec.loader.exec_module(pretrain)
    for name in pretrain.RECIPES:
        shipped = pretrain.WEIGHTS_DIR / name
        pretrain.write_card(tmp_path, json.loads((shipped / "pretrain_log.json").read_text()))
        card = (tmp_path / "README.md").read_text()
        assert card == (shipped / "README.md").read_text(), f"rerun: pretrain_backbones.py --cards-only ({name})"
        assert pretrain.EARLIER_VERSION in card and "not a bit-identical one" in card


def test_training_subsets_keep_every_class_even_when_the_split_is_sorted_by_class():
    import datasets

    from peft_mimi.data import balanced_subset

    labels = [0] * 400 + [1] * 400 + [2] * 400  # mnist's built-in split is ordered like this
    split = datasets.Dataset.from_dict({"label": labels, "i": list(range(1200))})
    chosen = balanced_subset(split, 90, seed=0)
    assert [chosen["label"].count(c) for c in range(3)] == [30, 30, 30]
    assert chosen["i"] == sorted(chosen["i"]) and len(set(chosen["i"])) == 90  # the split's order is kept
    assert balanced_subset(split, 90, seed=1)["i"] != chosen["i"], "a random subset, drawn with the seed"
    assert balanced_subset(split, 90, seed=0)["i"] == chosen["i"]
    assert balanced_subset(split, None, seed=0) is split and balanced_subset(split, 5000, seed=0) is split


def test_plots_are_drawn_from_the_committed_results(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_results.py"), "--out", str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    for name in ("ablation", "sweep", "inference", "storage", "training_cost"):
        assert_drawn(tmp_path / f"{name}.png")


@pytest.mark.slow
def test_a_mimi_rows_recipe_options_replace_the_benchmarks_schedule(monkeypatch):
    # `bench_accuracy.py --mimi-options first_epochs=2 epochs_per_round=1 final_epochs=3`: two epochs before the
    # first cut, one per later round, three after the last cut, instead of the benchmark's E per round (the
    # long_ends candidate on the headline protocol)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import common

    method = common.Method("mimi", "long ends", target_compression=16.0,
                           recipe_options={"first_epochs": 2, "epochs_per_round": 1, "final_epochs": 3})
    result = common.run(method, common.SMOKE, "digits", seed=0, epochs_per_round=2, total_epochs=None, lr=3e-3,
                        batch_size=16, max_train=32, max_test=16)
    epochs = [segment["epochs"] for segment in result.segments]
    assert len(epochs) >= 3 and epochs[0] == 2 and epochs[-1] == 3 and set(epochs[1:-1]) == {1}
    assert result.epochs == sum(epochs)
    # a schedule that does not add up to the epochs its rivals train at this budget is refused, not published
    with pytest.raises(ValueError, match=f"trained {result.epochs} epochs where its rivals train {result.epochs + 1}"):
        common.run(method, common.SMOKE, "digits", seed=0, epochs_per_round=2, total_epochs=result.epochs + 1,
                   lr=3e-3, batch_size=16, max_train=32, max_test=16)


@pytest.mark.slow
def test_inference_profile_splits_the_compiled_forward_into_kernels_and_library_calls(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--smoke", "--profile",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    text = (tmp_path / "inference_profile.md").read_text()
    compiled = text.split("## Compiled: generated kernels and library calls")[1]
    bare, mimi = "backbone (no adapter)", "MiMi (export.to_plain_module)"
    rows = [line.strip("| ").split(" | ") for line in compiled.splitlines() if line.startswith(("| " + bare, "| MiMi"))]
    assert [r[:2] for r in rows] == [[bare, "1"], [mimi, "1"], [bare, "32"], [mimi, "32"]]
    assert all(float(cell.split()[0]) > 0 for r in rows for cell in r[2:]), "each model spends time in both"
