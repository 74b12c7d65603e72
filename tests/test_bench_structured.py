"""The structured suite's runner (benchmarks/bench_structured.py) and its Adapter+ baseline, on a tiny random ViT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_images, make_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import adapter_plus  # noqa: E402
import bench_structured  # noqa: E402

RECORD_FIELDS = {"task", "method", "sigma_t", "params", "epochs", "seed", "accuracy", "image_size", "device", "lr"}


@pytest.mark.slow
def test_smoke_grid_records_every_method_and_resume_trains_nothing_again(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PEFT_MIMI_CACHE": str(tmp_path / "cache"),
           "MPLBACKEND": "Agg"}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_structured.py"), "--smoke", "--out", str(tmp_path)]
    subprocess.run([*command, "--what", "grid"], check=True, cwd=ROOT, env=env, capture_output=True, timeout=900)
    raw = json.loads((tmp_path / "accuracy.json").read_text())
    runs = raw["runs"]
    assert {r["method"] for r in runs} == {"probe", "adapter", "mimi", "adapter_plus", "lora", "adalora", "full"}
    assert all(RECORD_FIELDS <= r.keys() and 0 <= r["accuracy"] <= 100 for r in runs)
    assert all(r["task"] == "dsprites_location" and r["seed"] == 0 and r["device"] == "cpu" for r in runs)
    assert {r["augmentation"] for r in runs} == {"none"}  # VTAB-1k's protocol: no crops, no flips
    by = {(r["method"], r["sigma_t"]): r for r in runs}
    # the large adapters hold more than the budgeted ones; MiMi ends within the budget vanilla adapters define
    assert by["adapter", 4.0]["params"] > by["adapter", 16.0]["params"] >= by["mimi", 16.0]["params"] > 0
    assert by["mimi", 16.0]["epochs"] == by["adapter", 16.0]["epochs"] == by["lora", 16.0]["epochs"] > 1
    budget = by["adapter", 16.0]["params"]  # Adapter+ at the same budget: the width whose count is closest to it
    assert abs(by["adapter_plus", 16.0]["params"] - budget) <= 0.1 * budget
    assert by["probe", None]["params"] == 0 and by["probe", None]["lr"] is None
    assert len(by["mimi", 16.0]["rounds"]) > 1 and by["mimi", 16.0]["widths"]
    assert by["mimi", 16.0]["design"] == "adapter_plus"  # the product's default: one adapter per block, on its MLP
    assert raw["final"] is True
    table = (tmp_path / "accuracy.md").read_text()
    assert "| MiMi (default: Adapter+'s adapters) σt=16 |" in table and "| linear probe |" in table
    assert "Discrimination:" in table
    # where MiMi put its neurons: the run's final widths, per block (the smoke backbone has no easy-task runs)
    chosen = json.loads((tmp_path / "widths.json").read_text())["widths"]["16.0"]["dsprites_location (default)"]
    assert sum(chosen.values()) == sum(by["mimi", 16.0]["widths"].values()) and set(chosen) == {"0.MLP", "1.MLP"}
    assert "| dsprites_location | default | 1 |" in (tmp_path / "widths.md").read_text()

    # --resume finds every run recorded: nothing is trained again, the records are unchanged
    done = subprocess.run([*command, "--what", "grid", "--resume"], check=True, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "[grid]" not in done.stdout
    assert json.loads((tmp_path / "accuracy.json").read_text())["runs"] == runs

    # the decomposition's "allocation only" rows: a MiMi row's final widths trained from scratch (the paper's
    # MiMi's with its plain adapters, the default's with Adapter+'s)
    subprocess.run([*command, "--what", "grid", "--resume", "--methods", "mimi_paper", "mimi_widths",
                    "adapter_plus_widths", "mimi_gradient"], check=True, cwd=ROOT, env=env, capture_output=True,
                   timeout=300)
    runs = {(r["method"], r["sigma_t"]): r for r in json.loads((tmp_path / "accuracy.json").read_text())["runs"]}
    paper, widths = runs["mimi_paper", 16.0], runs["mimi_widths", 16.0]
    assert paper["design"] == "paper" and len(paper["widths"]) == 4  # attention and MLP outputs of both blocks
    assert widths["widths"] == paper["widths"] and widths["params"] == paper["params"]
    assert widths["epochs"] == paper["epochs"] and len(widths["rounds"]) == 1  # no pruning round
    default, plus = runs["mimi", 16.0], runs["adapter_plus_widths", 16.0]
    assert plus["widths"] == default["widths"] and plus["params"] == default["params"]  # scaling and biases counted
    assert plus["epochs"] == default["epochs"] and len(plus["rounds"]) == 1
    gradient = runs["mimi_gradient", 16.0]  # the default with the gradient score: same budget, rounds and epochs
    assert (gradient["score"], default["score"]) == ("gradient", "mimi")
    assert gradient["epochs"] == default["epochs"] and len(gradient["rounds"]) == len(default["rounds"])


def test_records_from_before_the_default_design_changed_read_under_todays_names():
    old = {"task": "a", "sigma_t": 64.0, "seed": 0, "label": "MiMi σt=64"}
    assert bench_structured.renamed({**old, "method": "mimi"})["method"] == "mimi_paper"  # the paper's adapters
    assert bench_structured.renamed({**old, "method": "mimi"})["design"] == "paper"
    assert bench_structured.renamed({**old, "method": "mimi_plus_long"})["method"] == "mimi_long"
    assert bench_structured.renamed({**old, "method": "mimi_plus"})["method"] == "mimi_plus"  # seed 0: the prototype
    seed_1 = bench_structured.renamed({**old, "method": "mimi_plus", "seed": 1})  # MiMiConfig's options: the default
    assert (seed_1["method"], seed_1["design"], seed_1["label"]) == ("mimi", "adapter_plus",
                                                                     "MiMi (default: Adapter+'s adapters) σt=64")
    new = {**old, "method": "mimi", "design": "adapter_plus"}
    assert bench_structured.renamed(new)["method"] == "mimi"
    assert bench_structured.renamed({**old, "method": "adapter"}) == {**old, "method": "adapter"}


def test_runs_trained_with_crops_and_flips_are_other_runs_than_those_without():
    # the first sitting's records predate the field: trained with the product's crops and flips, which change a
    # position or orientation label, so they never stand in for a run of the protocol (the probe never augments)
    old = {"task": "a", "method": "adapter", "sigma_t": 4.0, "seed": 0, "image_size": 112, "epochs": 10, "lr": 3e-3}
    new = {**old, "augmentation": "none"}
    assert bench_structured.augmentation(old) == "crop+flip" and bench_structured.augmentation(new) == "none"
    assert bench_structured.run_key(old) != bench_structured.run_key(new)
    assert len(bench_structured.merged([old, new, dict(new)])) == 2
    assert bench_structured.augmentation({**old, "method": "probe"}) == "none"


def test_learning_rate_is_the_best_on_validation_per_task_and_family():
    selection = [
        {"task": "a", "method": "adapter", "lr": 1e-3, "accuracy": 50.0},
        {"task": "a", "method": "adapter", "lr": 3e-3, "accuracy": 60.0},
        {"task": "a", "method": "mimi", "lr": 1e-3, "accuracy": 70.0},
        {"task": "a", "method": "mimi", "lr": 3e-3, "accuracy": 70.0},  # a tie: the smaller rate
        {"task": "b", "method": "adapter", "lr": 1e-3, "accuracy": 80.0},
        {"task": "b", "method": "adapter", "lr": 3e-3, "accuracy": 40.0},
    ]
    chosen = bench_structured.chosen_lrs(selection)
    assert {key: c["lr"] for key, c in chosen.items()} == {("a", "adapter"): 3e-3, ("a", "mimi"): 1e-3,
                                                           ("b", "adapter"): 1e-3}


def test_table_order_puts_the_references_first_then_each_budget():
    rows = [{"method": m, "sigma_t": s, "label": f"{m} {s}"} for m, s in
            [("lora", 64.0), ("mimi", 256.0), ("adapter", 4.0), ("probe", None), ("mimi", 64.0), ("full", None)]]
    ordered = [(r["method"], r["sigma_t"]) for r in sorted(rows, key=bench_structured.table_order)]
    assert ordered == [("probe", None), ("adapter", 4.0), ("full", None), ("mimi", 64.0), ("lora", 64.0),
                       ("mimi", 256.0)]


def test_the_issue_bars_compare_the_default_mimi_with_the_best_alternative_and_its_spread_with_vanillas():
    def run(method, task, seed, accuracy):
        return {"task": task, "method": method, "label": f"{method} σt=64", "sigma_t": 64.0, "seed": seed,
                "accuracy": accuracy, "params": 100, "epochs": 10, "wall_s": 1.0, "device": "cpu", "lr": 3e-3}
    records = [run("mimi", "a", 0, 80.0), run("mimi", "a", 1, 82.0), run("mimi", "b", 0, 50.0),
               run("adapter", "a", 0, 79.0), run("adapter", "a", 1, 79.0), run("adapter", "b", 0, 49.0),
               run("lora", "a", 0, 83.0), run("lora", "b", 0, 40.0)]
    rows = bench_structured.summary(records, ["a", "b"])
    versus = bench_structured.against_alternatives(rows, ["a", "b"])
    # the best alternative on the mean is vanilla (64 against LoRA's 61.5, although LoRA leads on task a); MiMi
    # (65.5) against it: +2 on task a (two seeds each), +1 on task b
    assert versus == [["σt = 64", "vanilla adapters", "+2.0 (seeds 2/2)", "+1.0 (seeds 1/1)", "**+1.5**"]]
    assert bench_structured.against_alternatives(rows[:1], ["a", "b"]) == []  # no alternative: no line
    spread = bench_structured.seed_spread(rows, ["a", "b"])
    # only rows with two seeds on a task; MiMi's std (1.41) against vanilla's (0.0) on task a
    assert spread == [["mimi σt=64", "1.4 (n=2), +1.4 vs vanilla", "—"], ["adapter σt=64", "0.0 (n=2)", "—"]]


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_adapter_plus_wraps_each_mlp_output_within_the_budget_and_starts_near_the_backbone(family):
    model = make_model(family, hidden_size=32, layers=2)
    images = make_images(2)
    before = model(pixel_values=images).logits
    adapter_plus.add_adapter_plus(model, budget=2000, seed=0)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n: c for n, c in trainable.items() if not n.startswith("classifier")}
    width = adapter_plus.width_for_budget([32, 32], 2000)
    assert sum(adapters.values()) == 2 * adapter_plus.params_per_adapter(32, width) <= 2000
    assert sum(n.endswith(".adapter.scale") for n in adapters) == 2  # one per block, on the MLP only
    assert all(".attention." not in n for n in adapters)
    after = model.eval()(pixel_values=images).logits
    # Houlsby initialisation: small random weights, so the model starts close to (not equal to) the backbone
    assert 0 < (after - before).abs().max() < 1e-2


def test_adapter_plus_drop_path_drops_whole_samples_in_training_only():
    layer = adapter_plus.AdapterPlus(8, 4, drop_path=0.5)
    torch.nn.init.ones_(layer.up.weight)
    y = torch.randn(64, 3, 8)
    layer.train()
    torch.manual_seed(0)
    delta = layer(y) - y
    dropped = (delta.abs().sum(dim=(1, 2)) == 0)
    assert 0 < int(dropped.sum()) < 64  # some samples keep no adapter output, the others keep all of it
    layer.eval()
    assert ((layer(y) - y).abs().sum(dim=(1, 2)) > 0).all()
