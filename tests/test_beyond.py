"""The options beyond the paper (issue 13): scale-fair and data-aware neuron scores, and the benchmark that
measures them against vanilla adapters of the same size and epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_images, make_model
from peft import PeftModel, get_peft_model

from peft_mimi import MiMiConfig

ROOT = Path(__file__).resolve().parents[1]
LABELS = torch.tensor([0, 1, 2, 0])


def mimi(**overrides) -> MiMiConfig:
    return MiMiConfig(**{"target_compression": 16.0, "modules_to_save": ["classifier"], **overrides})


def train_step(model) -> None:
    model.train()
    model(pixel_values=make_images(), labels=LABELS).loss.backward()


@pytest.mark.parametrize("score", ["taylor", "contribution"])
def test_activity_scores_are_gathered_in_training_only_and_reset_by_each_round(score):
    model = get_peft_model(make_model("swin"), mimi(score=score, init_weights=False))
    tuner = model.base_model
    layers = [layer for _, layer in tuner._layers("default")]
    model.eval()
    with torch.no_grad():
        model(pixel_values=make_images())
    assert all(layer.activity_scores("default") is None for layer in layers), "evaluation must not count"
    with pytest.raises(ValueError, match="training step"):
        tuner.prune_round()
    train_step(model)
    stats = [layer.activity_scores("default") for layer in layers]
    assert all(s is not None and s.shape == (layer.physical_width("default"),) and (s >= 0).all()
               for s, layer in zip(stats, layers))
    tuner.prune_round()
    assert all(layer.activity_scores("default") is None for layer in layers), "scores are per round"
    while tuner.num_rounds():
        train_step(model)
        tuner.prune_round(compact=False)
    assert tuner.live_params() <= tuner.budget()


def test_taylor_score_keeps_the_neurons_the_loss_depends_on():
    model = get_peft_model(make_model("vit"), mimi(score="taylor", init_weights=False))
    tuner = model.base_model
    name, layer = next(iter(tuner._layers("default")))
    with torch.no_grad():  # neuron 0 of the first adapter silenced: its activation cannot change the loss
        layer.mimi_up["default"].weight[:, 0] = 0
    train_step(model)
    assert float(tuner.neuron_scores()[name][0]) == 0.0


@pytest.mark.parametrize("score", ["relative", "taylor", "contribution"])
def test_new_scores_are_validated_saved_and_reloaded(score, tmp_path):
    with pytest.raises(ValueError, match="is not known"):
        MiMiConfig(target_compression=16.0, score="taylr")
    model = get_peft_model(make_model("vit"), mimi(score=score, init_weights=False))
    train_step(model)
    model.base_model.prune_round()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["score"] == score
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert loaded.peft_config["default"].score == score
    assert loaded.base_model.adapter_widths() == model.base_model.adapter_widths()
    model.eval()
    torch.testing.assert_close(loaded(make_images()).logits, model(make_images()).logits)


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


def test_reconstruct_makes_a_cut_change_the_output_less():
    def cut_error(reconstruct: bool) -> float:
        model = get_peft_model(make_model("vit"), mimi(init_weights=False, reconstruct=reconstruct))
        x = make_images(8)
        model.train()
        model(pixel_values=x)  # training forward: the activations' statistics
        model.eval()
        with torch.no_grad():
            before = model(pixel_values=x).logits
            model.base_model.prune_round()
            return float((model(pixel_values=x).logits - before).norm())

    assert cut_error(True) < 0.8 * cut_error(False)
    with pytest.raises(ValueError, match="reconstruct must be True or False"):
        MiMiConfig(target_compression=16.0, reconstruct="yes")


def test_reconstruct_is_saved_in_adapter_config_and_reloaded(tmp_path):
    model = get_peft_model(make_model("vit"), mimi(init_weights=False, reconstruct=True))
    train_step(model)
    model.base_model.prune_round()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["reconstruct"] is True
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert loaded.peft_config["default"].reconstruct is True
    assert MiMiConfig(target_compression=16.0).reconstruct is False, "the paper's plain removal is the default"
