"""Beyond the paper (issue 13): the benchmark that measures ways to train pruned adapters against vanilla adapters of
the same size and epochs. The options that lost left peft_mimi (issue 32); their published rows stay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_mimi import MiMiConfig

ROOT = Path(__file__).resolve().parents[1]
def test_the_papers_method_is_the_default_setting():
    config = MiMiConfig(target_compression=64.0)
    assert (config.score, config.selection, config.prune_ratio, config.init_compression) == ("mimi", "global", 0.5,
                                                                                             4.0)


def test_beyond_refuses_a_combination_it_cannot_run_as_named(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import beyond
    assert beyond.candidate("long_last+one_cosine").schedule == "long_last"
    with pytest.raises(ValueError, match="combines the schedules"):
        beyond.candidate("long_last+continuous")  # two epoch plans: one would be dropped without a word
    with pytest.raises(ValueError, match="unknown candidate"):
        beyond.candidate("paper+typo")


def test_beyond_still_describes_the_removed_candidates_of_its_published_rows_but_does_not_run_them(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import beyond
    published = json.loads((ROOT / "benchmarks" / "results" / "beyond" / "beyond.json").read_text())["rows"]
    for name in {row["candidate"] for row in published}:  # what --publish-only writes for each row
        assert beyond.describe(name)
    assert beyond.describe("gradient+reconstruct").endswith("second moment (removed from peft_mimi)")
    for name in ("taylor", "gradient+reconstruct"):
        with pytest.raises(ValueError, match="left peft_mimi"):
            beyond.candidate(name)


@pytest.mark.slow
def test_beyond_benchmark_smoke_mode_writes_its_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "beyond.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    raw = json.loads((tmp_path / "beyond.json").read_text())
    rows = raw["rows"]
    assert {r["candidate"] for r in rows} >= {"vanilla", "paper", "kd", "cubic", "drop_0.1", "one_cosine", "continuous"}
    assert len({r["epochs"] for r in rows}) == 1, "every candidate trains the same total epochs"
    assert all(r["params"] <= r["budget"] for r in rows), "and ends within the same budget"
    recipes = {r["candidate"]: r["recipe"] for r in rows}
    assert recipes["paper"]["restart_lr"] is True and recipes["one_cosine"]["restart_lr"] is False
    combined = recipes["long_last+one_cosine"]  # a schedule and the single learning-rate schedule, together
    assert combined["restart_lr"] is False and combined["epochs_per_round"] == 1 and combined["final_epochs"] >= 1
    assert (tmp_path / "beyond.md").stat().st_size > 0 and (tmp_path / "beyond.png").stat().st_size > 0
    # --resume keeps the finished runs and trains nothing again
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "beyond.py"), "--smoke", "--resume", "--out",
                           str(tmp_path)], check=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "seed 0" not in done.stdout
    assert len(json.loads((tmp_path / "beyond.json").read_text())["rows"]) == len(rows)
