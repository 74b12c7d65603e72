"""Every benchmark keeps working: its smoke mode runs end to end and writes its result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "extra", "outputs"),
    [
        ("bench_inference.py", [], ["inference.md", "inference.json"]),
        ("bench_storage.py", [], ["storage.md", "storage.json"]),
        ("bench_accuracy.py", ["--what", "accuracy"], ["accuracy.md", "accuracy.json"]),
        ("bench_training_cost.py", [], ["training_cost.md", "training_cost.json"]),
    ],
)
def test_benchmark_smoke_mode_writes_its_results(script, extra, outputs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(tmp_path), *extra],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0, name
    raw = json.loads((tmp_path / outputs[1]).read_text())
    assert raw, "empty results"
