"""The demo's code path end to end on a few steps (a tiny local backbone instead of the shipped one)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from peft_mimi.pruning import adapter_params, budget_for_compression

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_runs_end_to_end_and_reloads_identically(tmp_path, capsys, backbone):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    sys.modules["demo"] = demo
    spec.loader.exec_module(demo)

    out = demo.main(["--backbone", backbone, "--max-train-samples", "128", "--epochs-per-round", "1",
                     "--target-compression", "16", "--output-dir", str(tmp_path / "demo")])

    printed = capsys.readouterr().out
    assert out["reload_identical"] is True
    assert "reload check: identical predictions" in printed
    assert "MiMi accuracy" in printed and "head only" in printed
    assert (tmp_path / "demo" / "widths.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").exists()

    # the width table: one row per adapter, "module  d  width  params", each row's params those of its width
    widths = out["widths"]
    rows = {name: (int(d), int(width), int(params.replace(",", "")))
            for name, d, width, params in re.findall(r"^(\S+) +(\d+) +(\d+) +([\d,]+)$", printed, re.MULTILINE)
            if name in widths}
    assert {name: width for name, (_, width, _) in rows.items()} == widths
    terms = dict(bias=True, scale=True)  # the default design's adapters: biases and a channel scaling
    assert all(params == adapter_params(d, width, **terms) for d, width, params in rows.values())
    # and the summary under it: the rows add up to the live parameters, which fit the budget of σt = 16
    adapters, removed, live, budget = (int(n.replace(",", "")) for n in re.search(
        r"(\d+) adapters, (\d+) removed, ([\d,]+) parameters \(budget ([\d,]+)\)", printed).groups())
    assert (adapters, removed) == (len(widths), sum(width == 0 for width in widths.values()))
    assert live == sum(params for _, _, params in rows.values())
    assert budget == budget_for_compression([d for d, _, _ in rows.values()], 16.0, **terms)
    assert 0 < live <= budget
