"""`peft_mimi.train.train`: MiMi's whole schedule with accelerate, on a tiny ViT and the bundled `digits` data.

One shared run (the `run` fixture) is inspected by several tests; the resume, NaN, crash and two-process tests
start their own runs with the same settings so that their results can be compared with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import make_model
from huggingface_hub import ModelCard
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

import peft_mimi.run as run_module
import peft_mimi.train as train_module
from peft_mimi import TARGET_MODULES_BY_MODEL_TYPE, MiMiConfig
from peft_mimi.card import is_hub_model_id, model_card
from peft_mimi.checkpoint import OutputDirectoryBusy, RunLock, latest_checkpoint
from peft_mimi.evaluate import evaluate_adapter, load_adapter
from peft_mimi.train import TrainingRecipe, train

# 96 training images in batches of 16: 6 optimizer steps per epoch. The default design: one adapter per block (2),
# d = 32, each neuron 2·32 + 1 parameters and each adapter 32 + 32 more (up bias, scaling). σ0 = 4, σt = 16:
# widths 8 -> 2, 1168 -> 388 adapter parameters in R = 2 rounds, so 3 rounds of training, one epoch each
# (final_epochs=1: the default would give the last round the remaining R + 2 = 4 epochs; test_the_default_schedule_...
# runs that).
RECIPE = TrainingRecipe(epochs_per_round=1, final_epochs=1, batch_size=16, lr=3e-3, max_train_samples=96,
                        max_eval_samples=48, seed=0, checkpoint_every_steps=4)
MIMI = MiMiConfig(target_compression=16.0)
BUDGET = 388
SETTINGS = dict(data="digits", recipe=RECIPE, mimi=MIMI)
STEPS_PER_ROUND = 6


SECRET_TOKEN = "hf_" + "SeCrEt0123456789" * 2


class HubRecorder:
    """Stands in for `huggingface_hub.HfApi`: records what would be uploaded, uploads nothing."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        readme = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, "readme": readme, **kwargs}))


@pytest.fixture(scope="module")
def run(backbone, tmp_path_factory):
    """One uninterrupted run, pushed to a stand-in Hub."""
    HubRecorder.calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "HfApi", HubRecorder)
        patch.setenv("HF_TOKEN", SECRET_TOKEN)  # must never be written anywhere
        result = train(backbone, output_dir=tmp_path_factory.mktemp("run") / "out", push_to_hub="me/tiny-mimi",
                       **SETTINGS)
    return result


class Interrupt(Exception):
    """Raised from the data pipeline to simulate a process killed in the middle of training."""


def failing_data_after(batches: int, failure: str):
    """A `make_collate_fn` whose training batches, from number `batches` on, raise (`failure="kill"`) or hold NaN
    pixels (`failure="nan"`)."""
    real = run_module.make_collate_fn
    count = {"n": 0}

    def make_collate_fn(transform, num_labels=None):
        collate = real(transform, num_labels)
        if not transform.train:
            return collate

        def failing(examples):
            count["n"] += 1
            batch = collate(examples)
            if count["n"] >= batches:
                if failure == "kill":
                    raise Interrupt(f"killed at batch {count['n']}")
                batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
            return batch

        return failing

    return make_collate_fn


# --------------------------------------------------------------------------------------------- the schedule
def test_widths_land_on_the_budget_after_the_planned_rounds(run):
    assert run.rounds == 2
    assert run.live_params <= run.budget == BUDGET
    assert run.live_params > run.budget - (2 * 32 + 1)  # as close as one neuron allows
    # the default targets of this backbone: the MLP output of both blocks
    adapted = get_peft_model(make_model("vit", num_labels=10), MiMiConfig(target_compression=16.0)).base_model
    assert set(run.widths) == set(adapted.adapter_widths()) and len(run.widths) == 2


def test_every_round_trains_including_after_the_last_pruning(run):
    metrics = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in metrics] == [0, 1, 2]  # R + 1 rounds of training
    assert [row["global_step"] for row in metrics] == [STEPS_PER_ROUND * (r + 1) for r in range(3)]
    assert [row["live_params"] for row in metrics] == [1168, 648, run.live_params]  # 648: 2 adapters of width 4
    assert metrics[-1]["widths"] == run.widths
    for row in metrics:
        assert {"round", "epoch", "widths", "live_params", "budget", "accuracy", "loss", "seconds"} <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0 and row["seconds"] > 0
    assert metrics == run.history


def test_the_saved_adapter_reloads_with_identical_predictions(run):
    adapter = load_file(run.adapter_dir / "adapter_model.safetensors")
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["adapter_widths"] == run.widths and config["rounds_done"] == 2
    assert Path(config["base_model_name_or_path"]).is_dir()  # the backbone the run used, as an absolute path
    for name, width in run.widths.items():  # compact: only live neurons are stored
        key = f"base_model.model.{name}.mimi_down.weight"
        assert (key in adapter) == (width > 0) and (width == 0 or adapter[key].shape[0] == width)

    reloaded, _ = load_adapter(run.adapter_dir)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images).logits, run.model(pixel_values=images).logits)
    accuracy = evaluate_adapter(run.adapter_dir, "digits", max_eval_samples=48)
    assert accuracy == run.accuracy


def test_the_model_card_describes_the_adapter(run):
    text = (run.adapter_dir / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "peft"
    assert {"mimi", "peft", "image-classification"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local path is not a Hub id: it stays out of the front matter
    assert card.data.eval_results[0].metric_value == pytest.approx(run.accuracy)
    for name, width in run.widths.items():
        assert f"| `{name}` | 32 | {width} | {65 * width + 64:,} |" in text  # with biases and scaling
    assert "import peft_mimi" in text and "PeftModel.from_pretrained" in text
    assert "budget" in text and str(BUDGET) in text and "| 2 | 3 |" in text  # round 2 after 3 epochs


def test_push_to_hub_uploads_adapter_and_card(run):
    (create, created), (upload, uploaded) = HubRecorder.calls
    assert (create, upload) == ("create_repo", "upload_folder")
    assert created["repo_id"] == uploaded["repo_id"] == "me/tiny-mimi"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(uploaded["files"])
    assert 'PeftModel.from_pretrained(base, "me/tiny-mimi")' in uploaded["readme"]
    assert not any("token" in name.lower() for name in uploaded["files"])


def test_the_hub_token_is_never_written_or_uploaded(run):
    for path in run.output_dir.rglob("*"):
        if path.is_file():
            assert SECRET_TOKEN.encode() not in path.read_bytes(), path
    assert SECRET_TOKEN not in repr(HubRecorder.calls)


def test_a_run_is_not_overwritten_without_resume(run):
    with pytest.raises(FileExistsError, match="resume=True"):
        train(run.model.peft_config["default"].base_model_name_or_path, output_dir=run.output_dir, **SETTINGS)


# ------------------------------------------------------------------------------------------------ crash safety
def test_resume_after_a_kill_ends_exactly_like_an_uninterrupted_run(run, backbone, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:  # killed in round 1, after the checkpoint at optimizer step 8
        patch.setattr(run_module, "make_collate_fn", failing_data_after(11, "kill"))
        with pytest.raises(Interrupt):
            train(backbone, output_dir=out, **SETTINGS)
    state_file = latest_checkpoint(out) / "state.json"
    state = json.loads(state_file.read_text())
    assert (state["position"]["round"], state["position"]["global_step"], state["position"]["batch"]) == (1, 8, 2)
    # a checkpoint of the previous format counted the scheduler's steps per round: refused, not misread
    saved = state_file.read_text()
    state_file.write_text(json.dumps({**state, "format": 2}))
    with pytest.raises(ValueError, match=r"not a checkpoint this version of peft_mimi can read"):
        train(backbone, output_dir=out, resume=True, **SETTINGS)
    state_file.write_text(saved)

    resumed = train(backbone, output_dir=out, resume=True, **SETTINGS)
    assert resumed.widths == run.widths

    def without_time(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert without_time(resumed.history) == without_time(run.history)  # same losses, accuracies, widths
    ours, theirs = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (resumed, run))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_resume_keeps_the_round_statistics_of_data_aware_scores(backbone, tmp_path, monkeypatch):
    """With a score gathered from training (the gradient score), the statistics of the interrupted round are in the
    checkpoint: the resumed run cuts exactly as an uninterrupted one."""
    settings = {**SETTINGS, "mimi": MiMiConfig(target_compression=16.0, score="gradient")}
    whole = train(backbone, output_dir=tmp_path / "whole", **settings)
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "make_collate_fn", failing_data_after(11, "kill"))
        with pytest.raises(Interrupt):
            train(backbone, output_dir=tmp_path / "out", **settings)
    assert (latest_checkpoint(tmp_path / "out") / "round_statistics.safetensors").is_file()
    resumed = train(backbone, output_dir=tmp_path / "out", resume=True, **settings)
    assert resumed.widths == whole.widths
    ours, theirs = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (resumed, whole))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(backbone, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(run_module, "make_collate_fn", failing_data_after(7, "nan"))
    with pytest.raises(FloatingPointError, match=r"loss became nan in round 1.*ckpt-00002"):
        train(backbone, output_dir=out, **SETTINGS)
    checkpoint = latest_checkpoint(out)
    assert checkpoint.name == "ckpt-00002"  # step 4 and the end of round 0; nothing written after the NaN
    state = json.loads((checkpoint / "state.json").read_text())["position"]
    assert (state["round"], state["global_step"]) == (1, 6)
    saved = load_file(checkpoint / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(run, backbone, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save, saves = torch.save, {"n": 0}

    def crashing_save(obj, path, *args, **kwargs):
        if Path(path).name == "rng-0.pt":  # written by every checkpoint
            saves["n"] += 1
            if saves["n"] == 3:  # checkpoints: step 4, end of round 0, step 8 <- killed while writing
                raise Interrupt("killed while writing checkpoint 3")
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", crashing_save)
        with pytest.raises(Interrupt):
            train(backbone, output_dir=out, **SETTINGS)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-ckpt-00003", "ckpt-00002"]
    assert latest_checkpoint(out).name == "ckpt-00002"
    # the end of round 0, after its pruning: the next round's optimizer, with the surviving neurons' moments
    assert {p.name for p in (root / "ckpt-00002").iterdir()} == {"state.json", "rng-0.pt", "trainable.safetensors",
                                                                 "optimizer.pt", "scheduler.pt"}

    resumed = train(backbone, output_dir=out, resume=True, **SETTINGS)
    assert resumed.widths == run.widths and len(resumed.history) == 3
    assert [row["accuracy"] for row in resumed.history] == [row["accuracy"] for row in run.history]
    assert sorted(p.name for p in root.iterdir()) == [latest_checkpoint(out).name]  # the leftover is gone


def test_resuming_with_other_settings_is_refused(run):
    settings = {**SETTINGS, "recipe": dataclasses.replace(RECIPE, lr=1e-3)}
    with pytest.raises(ValueError, match=r"other settings \(recipe.lr: 0.003 in the checkpoint, 0.001 now\)"):
        train(run.model.peft_config["default"].base_model_name_or_path, output_dir=run.output_dir, resume=True,
              **settings)


def test_a_cut_carries_adamws_moments_of_the_surviving_neurons_into_the_next_rounds_optimizer():
    # a fresh AdamW after a cut would step every weight by the full learning rate; the loop keeps the moments the
    # surviving neurons had (the Trainer's callback masks and keeps its optimizer, so it does the same)
    model = get_peft_model(make_model(), MiMiConfig(init_compression=2.0, target_compression=8.0,
                                                    modules_to_save=["classifier"]))
    tuner = model.base_model
    optimizer = train_module.build_optimizer(model, lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        model(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    names = dict(model.named_parameters())
    before = {n: ({k: v.clone() for k, v in optimizer.state[p].items()}, p.detach().clone()) for n, p in names.items()
              if p in optimizer.state}

    carried = train_module._cut(model, tuner, optimizer)
    fresh = train_module.build_optimizer(model, lr=1e-2, weight_decay=0.05)
    train_module._install_state(fresh, model, carried)

    checked = 0
    for name, p in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
        state, (old_state, old_value) = fresh.state[p], before[name]
        assert torch.equal(state["step"], old_state["step"])
        if "mimi_down" in name and name.endswith("weight"):  # rows are neurons: each surviving row keeps its moments
            rows = [next(i for i in range(len(old_value)) if torch.equal(old_value[i], row)) for row in p.detach()]
            assert len(rows) < len(old_value)  # the cut removed some
            assert torch.equal(state["exp_avg"], old_state["exp_avg"][rows])
            assert torch.equal(state["exp_avg_sq"], old_state["exp_avg_sq"][rows])
            checked += 1
        elif "classifier" in name:  # the head is not cut: its moments are kept whole
            assert torch.equal(state["exp_avg_sq"], old_state["exp_avg_sq"])
        else:
            assert state["exp_avg"].shape == p.shape
    assert checked == sum(w > 0 for w in tuner.adapter_widths().values()) > 0


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="epochs_per_round must be an int >= 1"):
        TrainingRecipe(epochs_per_round=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingRecipe(warmup_ratio=1.5)
    with pytest.raises(ValueError, match=r"final_epochs must be an int >= 1 \(or None\), got 0"):
        TrainingRecipe(final_epochs=0)
    with pytest.raises(ValueError, match="head_lr must be a number > 0"):
        TrainingRecipe(head_lr=0.0)
    with pytest.raises(ValueError, match="needs its image processor"):
        train(make_model("vit", num_labels=10), "digits", tmp_path)
    with pytest.raises(ValueError, match="head classifies 3 classes but the dataset has 10"):
        train(make_model("vit", num_labels=3), "digits", tmp_path, processor=object())
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # nothing written but the run's lock


def test_the_default_schedule_spends_the_papers_epochs_on_the_final_widths():
    """By default each cut takes one epoch and the final widths train the rest of the paper's 2·(R+1) epochs; the
    paper's even split is one setting away; a model without pruning rounds trains epochs_per_round."""
    default = TrainingRecipe()
    assert default.restart_lr is False
    assert default.segment_epochs(4) == [1, 1, 1, 1, 6]  # σt = 64 from σ0 = 4: 10 epochs, 6 at the final widths
    assert default.segment_epochs(7) == [1] * 7 + [9]  # σt = 256: 16 epochs, 9 at the final widths
    assert TrainingRecipe(epochs_per_round=2, restart_lr=True).segment_epochs(4) == [2] * 5  # the paper's
    assert TrainingRecipe(final_epochs=3).segment_epochs(4) == [1, 1, 1, 1, 3]
    assert TrainingRecipe(epochs_per_round=4).segment_epochs(2) == [4, 4, 4]  # never shorter than a round
    assert default.segment_epochs(0) == [1] and TrainingRecipe(epochs_per_round=3).segment_epochs(0) == [3]


def test_the_default_schedule_trains_one_epoch_per_cut_and_the_rest_at_the_final_widths(backbone, tmp_path):
    recipe = dataclasses.replace(RECIPE, final_epochs=None, checkpoint_every_steps=None)
    result = train(backbone, output_dir=tmp_path / "out", **{**SETTINGS, "recipe": recipe})
    assert [row["epoch"] for row in result.history] == [1, 2, 6]  # R = 2: 1 + 1 + (2·3 - 2)
    assert [row["global_step"] for row in result.history] == [6, 12, 36]
    assert result.live_params <= result.budget == BUDGET


# ------------------------------------------------------------------------------------- unattended runs
def test_a_live_run_owns_its_output_directory_and_a_killed_one_does_not(backbone, tmp_path):
    """A second run pointed at a directory a live run is writing is refused at once; once that process is killed
    (SIGKILL: no cleanup runs), the lock is gone and the directory can be resumed."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from peft_mimi.checkpoint import RunLock
        with RunLock(Path({str(out)!r}), True):
            print("locked", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirectoryBusy, match=rf"{out} is being written by a live run \(pid "
                                                                   rf"{holder.pid} "):
            train(backbone, output_dir=out, **SETTINGS)
    finally:
        holder.kill()
        holder.wait()
    result = train(backbone, output_dir=out, resume=True, **SETTINGS)
    assert result.rounds == 2


def test_only_the_global_main_process_locks_the_output_directory(tmp_path, monkeypatch):
    """Multi-node training on a shared filesystem: the first process of the second node (its local main process,
    not the run's) must not take the run's lock, which the run's main process on the first node holds; on a single
    node a second run on the directory is still refused."""
    out = tmp_path / "out"

    class FakeAccelerator:  # what accelerate reports on the first process of node 2
        is_main_process, is_local_main_process = False, True

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(train_module, "Accelerator", FakeAccelerator)
    monkeypatch.setattr(train_module, "_train", lambda *args: "trained")
    with RunLock(out, True):  # held by the run's main process, on node 1
        assert train("a-backbone", "digits", out) == "trained"
        FakeAccelerator.is_main_process = True  # a second run's main process
        with pytest.raises(OutputDirectoryBusy, match="being written by a live run"):
            train("a-backbone", "digits", out)


def test_a_second_run_on_a_live_directory_is_refused_and_the_first_finishes_unharmed(backbone, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        import peft_mimi.run as r
        import peft_mimi.train as t
        from peft_mimi import MiMiConfig
        real = r.make_collate_fn
        def slow(transform, num_labels=None):  # a slow data pipeline: the run stays live for a few seconds
            collate = real(transform, num_labels)
            return (lambda examples: (time.sleep(0.3), collate(examples))[1]) if transform.train else collate
        r.make_collate_fn = slow
        t.train({backbone!r}, "digits", {str(out)!r}, t.TrainingRecipe(**{dataclasses.asdict(RECIPE)!r}),
                mimi=MiMiConfig(target_compression=16.0))
    """)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the first run holds the lock
            if (out / ".lock").is_file() and f"pid {first.pid}" in (out / ".lock").read_text():
                break
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.1)
        with pytest.raises(OutputDirectoryBusy, match="being written by a live run"):
            train(backbone, output_dir=out, resume=True, **SETTINGS)
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in metrics] == [0, 1, 2]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_progress_in_a_log_file_is_plain_lines(backbone, tmp_path, capfd, monkeypatch):
    """Standard error is not a terminal under pytest, as in a log file: progress comes as readable lines with round,
    step, loss and learning rate, and no carriage-return frames."""
    monkeypatch.setenv("PEFT_MIMI_LOG_EVERY_S", "0")
    train(backbone, output_dir=tmp_path / "out", **SETTINGS)
    err = capfd.readouterr().err
    assert "\r" not in err
    steps = [line for line in err.splitlines() if line.startswith("MiMi: round ")]
    assert len(steps) == 3 * STEPS_PER_ROUND
    assert steps[0].startswith("MiMi: round 0/2, step 1/18, loss ") and ", lr " in steps[0]
    assert steps[-1].startswith("MiMi: round 2/2, step 18/18, loss ")
    assert sum(line.startswith("round ") and "accuracy" in line for line in err.splitlines()) == 3


# ------------------------------------------------------------------------------------- objects and baselines
def test_a_python_user_trains_objects_and_any_classifier_through_the_same_loop(backbone, tmp_path):
    """The library call with objects: a MiMi PeftModel and a DatasetDict; and a LoRA model, which has no pruning
    rounds, trained by the same loop for epochs_per_round epochs."""
    from peft import LoraConfig
    from transformers import AutoImageProcessor

    from peft_mimi.backbones import load_backbone
    from peft_mimi.data import load_image_dataset

    data = load_image_dataset("digits")
    processor = AutoImageProcessor.from_pretrained(backbone)
    base, _ = load_backbone(backbone, num_labels=10)
    model = get_peft_model(base, MiMiConfig(target_compression=16.0, modules_to_save=["classifier"]))
    result = train(model, data, tmp_path / "mimi", RECIPE, processor=processor)
    assert result.rounds == 2 and result.live_params <= BUDGET and result.model is model
    assert [row["round"] for row in result.history] == [0, 1, 2]

    base, _ = load_backbone(backbone, num_labels=10)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=TARGET_MODULES_BY_MODEL_TYPE["vit"],
                                           modules_to_save=["classifier"]))
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    result = train(lora, data, tmp_path / "lora", dataclasses.replace(RECIPE, epochs_per_round=3, final_epochs=None),
                   processor=processor)
    assert result.rounds == 0 and result.widths is None and result.budget is None
    assert [row["global_step"] for row in result.history] == [3 * STEPS_PER_ROUND]
    assert result.live_params == sum(t.numel() for t in before.values())
    assert any(not torch.equal(p, before[n]) for n, p in lora.named_parameters() if p.requires_grad)
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_the_head_can_have_its_own_learning_rate(backbone):
    from peft_mimi.backbones import load_backbone
    from peft_mimi.train import build_optimizer

    base, _ = load_backbone(backbone, num_labels=10)
    model = get_peft_model(base, MiMiConfig(target_compression=16.0, modules_to_save=["classifier"]))
    optimizer = build_optimizer(model, lr=1e-3, head_lr=1e-2, weight_decay=0.05)
    rates = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rates[id(p)] == (1e-2 if "classifier" in name else 1e-3), name



def test_mixed_precision_holds_in_every_round_and_when_a_trained_model_trains_again(backbone, tmp_path, request):
    """mixed_precision='bf16' runs the forward passes of every round under autocast, those after each cut too (the
    shrunk model is prepared again for its round's optimizer), and a model that `train` returned trains under it
    again."""
    from accelerate.state import AcceleratorState
    from peft import LoraConfig
    from transformers import AutoImageProcessor

    from peft_mimi.backbones import load_backbone
    from peft_mimi.data import load_image_dataset

    data = load_image_dataset("digits")
    processor = AutoImageProcessor.from_pretrained(backbone)
    recipe = dataclasses.replace(RECIPE, mixed_precision="bf16", checkpoint_every_steps=None)
    rounds: list[tuple[int, torch.dtype]] = []  # (rounds done when the forward ran, dtype of a frozen Linear's output)

    def record(model):
        query = next(m for name, m in model.named_modules() if name.endswith(("q_proj", "attention.query")))
        config = model.peft_config["default"]
        query.register_forward_hook(lambda module, args, out: rounds.append(
            (getattr(config, "rounds_done", 0), out.dtype)))

    AcceleratorState._reset_state(reset_partial_state=True)  # this process's other tests set up accelerate in fp32
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    base, _ = load_backbone(backbone, num_labels=10)
    model = get_peft_model(base, MiMiConfig(target_compression=16.0, modules_to_save=["classifier"]))
    record(model)
    assert train(model, data, tmp_path / "mimi", recipe, processor=processor).rounds == 2
    assert {r for r, _ in rounds} == {0, 1, 2}
    assert {dtype for _, dtype in rounds} == {torch.bfloat16}, rounds

    base, _ = load_backbone(backbone, num_labels=10)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=TARGET_MODULES_BY_MODEL_TYPE["vit"],
                                           modules_to_save=["classifier"]))
    trained = train(lora, data, tmp_path / "lora-1", recipe, processor=processor).model
    rounds.clear()
    record(trained)
    train(trained, data, tmp_path / "lora-2", recipe, processor=processor)
    assert rounds and {dtype for _, dtype in rounds} == {torch.bfloat16}, rounds


@pytest.mark.parametrize("restart_lr", [True, False])
def test_the_schedule_restarts_at_every_round_or_runs_once_across_the_cuts(backbone, tmp_path, monkeypatch,
                                                                            restart_lr):
    """restart_lr=True (the paper's recipe): each round's new optimizer starts its own warm-up + cosine.
    restart_lr=False: each new optimizer continues one warm-up + cosine over the whole run where the last one
    stopped, so the learning rates of the whole run are those of a single schedule (what vanilla adapters get)."""
    rates, real = [], train_module.build_optimizer

    def recording(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        step = optimizer.step

        def step_and_record(self, *step_args, **step_kwargs):
            rates.append(self.param_groups[0]["lr"])  # the rate this optimizer step uses
            return step(*step_args, **step_kwargs)

        optimizer.step = types.MethodType(step_and_record, optimizer)
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", recording)
    recipe = dataclasses.replace(RECIPE, checkpoint_every_steps=None, restart_lr=restart_lr)
    result = train(backbone, output_dir=tmp_path / "out", **{**SETTINGS, "recipe": recipe})
    rounds = len(result.history)
    assert rounds == 3 and len(rates) == rounds * STEPS_PER_ROUND

    one = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=RECIPE.lr)
    span = STEPS_PER_ROUND if restart_lr else rounds * STEPS_PER_ROUND
    schedule = get_cosine_schedule_with_warmup(one, int(RECIPE.warmup_ratio * span), span)
    expected = []
    for _ in range(len(rates) if not restart_lr else STEPS_PER_ROUND):
        expected.append(schedule.get_last_lr()[0])
        one.step()
        schedule.step()
    if restart_lr:
        expected = expected * rounds
    assert rates == pytest.approx(expected)
    assert (max(rates[STEPS_PER_ROUND:]) < max(rates[:STEPS_PER_ROUND])) is not restart_lr

# -------------------------------------------------------------------------------------------- the model card
def test_model_card_front_matter_and_tables_without_training():
    model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0, modules_to_save=["classifier"]))
    model.base_model.prune_round()
    text = model_card(model, base_model="google/vit-base-patch16-224", dataset="digits",
                      history=[{"round": 0, "epoch": 2, "live_params": 2048, "accuracy": 0.5, "loss": 1.0,
                                "seconds": 1.0}], repo_id="me/adapter")
    card = ModelCard(text)
    assert card.data.base_model == "google/vit-base-patch16-224"
    assert card.data.library_name == "peft" and "mimi" in card.data.tags
    modules = model.base_model.adapter_widths()
    assert len(modules) == 2 and all(text.count(f"| `{name}` |") == 1 for name in modules)  # a row per module
    assert is_hub_model_id("owner/name") and not is_hub_model_id("fmnist-vit") and not is_hub_model_id("/tmp/x")


# --------------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_cpu_processes_make_the_same_pruning_decisions(backbone, tmp_path):
    script = tmp_path / "two_ranks.py"
    out = tmp_path / "out"
    script.write_text(textwrap.dedent(f"""
        import json
        from peft_mimi import MiMiConfig
        from peft_mimi.train import TrainingRecipe, train
        result = train({backbone!r}, "digits", {str(out)!r}, TrainingRecipe(**{dataclasses.asdict(RECIPE)!r}),
                       mimi=MiMiConfig(target_compression={MIMI.target_compression!r}))
        from accelerate import PartialState
        state = PartialState()
        with open({str(tmp_path)!r} + f"/rank{{state.process_index}}.json", "w") as f:
            json.dump({{"widths": result.widths, "processes": state.num_processes,
                        "accuracy": [row["accuracy"] for row in result.history]}}, f)
    """))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is configured
    # (huggingface/accelerate#2741); the torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU=1 starts two CPU
    # processes that talk over gloo (DistributedType.MULTI_CPU).
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["processes"] == ranks[1]["processes"] == 2
    assert ranks[0]["widths"] == ranks[1]["widths"] and ranks[0]["accuracy"] == ranks[1]["accuracy"]
    assert sum(65 * w + 64 for w in ranks[0]["widths"].values() if w) <= BUDGET
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["adapter_widths"] == ranks[0]["widths"]
    assert sorted(p.name for p in latest_checkpoint(out).iterdir() if p.name.startswith("rng")) == [
        "rng-0.pt", "rng-1.pt"]
