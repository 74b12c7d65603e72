"""The demo's code path end to end on a few steps (a tiny local backbone instead of the shipped one)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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
    assert set(out["widths"]) and all(w >= 0 for w in out["widths"].values())
