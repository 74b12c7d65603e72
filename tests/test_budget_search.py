"""Budget search (issue 13): prune down to the floor, measuring the validation accuracy after every round, and keep the
smallest adapter within a tolerance of the best round. The pure rule, `peft_mimi.train.train` (restore, the validation
split, the saved config and card, resume mid-search), the CLI and the HF Trainer with `MiMiPruningCallback`.

The end-to-end tests script the validation signal by round (`scripted_validation`): training, pruning, copies and
restores are real, and which round must be kept is known in advance.
"""

from __future__ import annotations

import json
import math
import random

import datasets
import pytest
import torch
from conftest import make_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_train import Interrupt, failing_data_after
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_mimi.run as run_module
import peft_mimi.train as train_module
from peft_mimi import MiMiConfig, MiMiPruningCallback
from peft_mimi.checkpoint import latest_checkpoint
from peft_mimi.cli import main as cli_main
from peft_mimi.data import ImageTransform, load_builtin_dataset, load_image_dataset, make_collate_fn
from peft_mimi.evaluate import evaluate_adapter, load_adapter
from peft_mimi.pruning import budget_search
from peft_mimi.run import split_validation
from peft_mimi.train import TrainingRecipe, train

# The paper's plain adapters on both outputs of the 2 blocks (the search's arithmetic, not the design, is tested):
# d = 32, σ0 = 4, σt = 32: widths 8 -> 1, 2048 -> 256 adapter parameters in R = 3 rounds. 96 training images,
# 10 % held out for validation; 6 batches of 16 per epoch, so 6 optimizer steps per round.
RECIPE = TrainingRecipe(epochs_per_round=1, batch_size=16, lr=3e-3, max_train_samples=96, max_eval_samples=48,
                        seed=0, checkpoint_every_steps=4)
SEARCH = MiMiConfig(design="paper", target_compression=32.0, budget_tolerance=1.0)
# validation accuracy by round: round 1 is the best; rounds 2 and 3 (smaller) fall more than 1 point below it, so the
# search trains all four rounds (one epoch each), keeps round 1 and finishes it (the 4 epochs left of 2·(R+1) = 8)
SCRIPT = {0: 0.50, 1: 0.60, 2: 0.30, 3: 0.585}


# ------------------------------------------------------------------------------------------------- the pure rule
@pytest.mark.parametrize(("sizes", "accuracies", "tolerance", "chosen"), [
    ([8, 4, 2, 1], [0.90, 0.895, 0.89, 0.85], 1.0, 2),  # the last round falls out: keep the one before
    ([8, 4, 2, 1], [0.90, 0.90, 0.90, 0.90], 0.0, 3),  # all equal: the smallest
    ([8, 4, 2], [0.70, 0.80, 0.805], 1.0, 2),  # an under-trained first round does not set the bar
    ([8, 4, 2], [0.80, 0.795, 0.85], 1.0, 2),  # a later best moves the bar up for every round
    ([8, 4, 2, 1], [0.85, 0.86, 0.84, 0.855], 1.0, 3),  # a dip, then back within 1 point
    ([8, 4, 2, 1], [0.85, 0.86, 0.84, 0.80], 1.0, 1),  # a dip that never comes back: the round before it
    ([8, 4], [0.85, 0.84], 1.0, 1),  # exactly 1 point below counts as within (no rounding surprises)
    ([8, 4], [0.85, 0.8399], 1.0, 0),
    ([8, 4, 4], [0.90, 0.88, 0.895], 2.0, 2),  # same size: the more accurate
    ([8, 4, 4], [0.90, 0.895, 0.89], 2.0, 1),
    ([8, 4, 2, 1], [0.9, 0.5, 0.4, 0.3], 100.0, 3),  # tolerance 100 points: always the floor
    ([5], [0.0], 1.0, 0),
])
def test_the_rule_keeps_the_smallest_round_within_tolerance_of_the_best(sizes, accuracies, tolerance, chosen):
    assert budget_search(sizes, accuracies, tolerance) == chosen


def test_the_rule_on_random_tables_and_why_one_copy_suffices():
    """The definition, on 500 random schedules (sizes never grow, as pruning only removes): the chosen round is
    within tolerance of the best, no smaller round is, and as rounds are added the choice only stays or moves to
    the newest round (what lets the trainer and the callback keep a single copy of the chosen adapter)."""
    rng = random.Random(0)
    for _ in range(500):
        rounds = rng.randint(1, 7)
        sizes = sorted((rng.choice([64, 32, 32, 16, 8, 4, 0]) for _ in range(rounds)), reverse=True)
        accuracies = [rng.choice([0.5, 0.6, 0.61, 0.62, 0.7, 0.705, 0.71]) for _ in range(rounds)]
        tolerance = rng.choice([0.0, 0.5, 1.0, 5.0])
        previous = None
        for n in range(1, rounds + 1):
            chosen = budget_search(sizes[:n], accuracies[:n], tolerance)
            best = max(accuracies[:n])
            within = [r for r in range(n) if best - accuracies[r] <= tolerance / 100 + 1e-9]
            assert chosen in within and sizes[chosen] == min(sizes[r] for r in within)
            assert previous is None or chosen in (previous, n - 1)
            previous = chosen


def test_the_rule_refuses_what_it_cannot_judge():
    with pytest.raises(ValueError, match="one size per accuracy"):
        budget_search([8, 4], [0.5], 1.0)
    with pytest.raises(ValueError, match="at least one round"):
        budget_search([], [], 1.0)
    with pytest.raises(ValueError, match="accuracy points >= 0"):
        budget_search([8], [0.5], -1.0)
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        budget_search([8, 4], [0.5, float("nan")], 1.0)
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        budget_search([8], [85.0], 1.0)  # points instead of a fraction


# ------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("tolerance", [-1.0, -0.01, float("nan"), float("inf"), "1", True])
def test_a_bad_tolerance_is_refused(tolerance):
    with pytest.raises(ValueError, match="budget_tolerance is in accuracy points and must be a number >= 0"):
        MiMiConfig(budget_tolerance=tolerance)


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, 1.5, -0.1, float("nan"), True])
def test_a_validation_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"validation_fraction .* must be in \(0, 1\)"):
        TrainingRecipe(validation_fraction=fraction)


def test_the_cli_refuses_a_negative_tolerance_with_a_usage_error(tmp_path, capsys):
    code = cli_main(["train", "--model", "fmnist-vit", "--data", "digits", "--output-dir", str(tmp_path / "out"),
                     "--budget-tolerance", "-1"])
    assert code == 2
    assert "budget_tolerance is in accuracy points" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ the validation split
def test_the_validation_split_is_carved_from_train_by_class_and_seed():
    train_split = load_image_dataset("digits")["train"]
    kept, held = split_validation(train_split, 0.1, seed=3)
    assert len(held) == math.ceil(0.1 * len(train_split)) and len(kept) + len(held) == len(train_split)
    assert set(held["label"]) == set(train_split["label"])  # stratified: every class is validated
    again = split_validation(train_split, 0.1, seed=3)[1]
    assert held["label"] == again["label"] and split_validation(train_split, 0.1, seed=4)[1]["label"] != held["label"]
    with pytest.raises(ValueError, match="Cannot hold out 0.1 of 12 training images as a validation split stratified"):
        split_validation(train_split.select(range(12)), 0.1, seed=0)


def test_a_search_never_validates_on_test_images(backbone, tmp_path, monkeypatch):
    """Rows tagged by split: the images train evaluates as validation are training rows that it never trains on,
    and the search chooses with the real validation signal exactly as the rule says."""
    digits = load_image_dataset("digits")
    data = datasets.DatasetDict({
        split: digits[split].add_column("row", [f"{split}-{i}" for i in range(len(digits[split]))])
        for split in ("train", "test")})
    seen = {"trained": set(), "validated": set()}
    real_evaluate, real_loader = train_module.evaluate, run_module.Run.epoch_loader

    def evaluate(model, loader, accelerator, **kwargs):
        rows = set(loader.dataset["row"]) if hasattr(loader.dataset, "column_names") else set()
        if rows and all(row.startswith("train-") for row in rows):
            seen["validated"] |= rows
        return real_evaluate(model, loader, accelerator, **kwargs)

    def epoch_loader(self, round_, epoch):
        seen["trained"] |= set(self.train_set["row"])
        return real_loader(self, round_, epoch)

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(run_module.Run, "epoch_loader", epoch_loader)
    result = train(backbone, data, tmp_path / "out", RECIPE, mimi=MiMiConfig(target_compression=32.0,
                                                                              budget_tolerance=0.5))
    assert len(seen["validated"]) == math.ceil(0.1 * 96) and not seen["validated"] & seen["trained"]
    assert len(seen["trained"]) == 96 - len(seen["validated"])
    *history, finished = result.history
    for n in range(1, len(history) + 1):  # the row of every round records the rule's choice so far
        chosen = budget_search([r["live_params"] for r in history[:n]],
                               [r["validation_accuracy"] for r in history[:n]], 0.5)
        assert history[n - 1]["chosen_round"] == chosen and not history[n - 1]["finish"]
    assert finished["finish"] and result.chosen_round == finished["chosen_round"] == history[-1]["chosen_round"]
    assert result.widths == history[result.chosen_round]["widths"] == finished["widths"]
    assert result.accuracy == finished["accuracy"]


# --------------------------------------------------------------------------------------------- train()
def scripted_validation(monkeypatch):
    """Replace the validation accuracy (only: the test accuracy stays real) by ``SCRIPT[round]``."""
    real = train_module.evaluate

    def evaluate(model, loader, accelerator, **kwargs):
        accuracy = real(model, loader, accelerator, **kwargs)
        if len(loader.dataset) != RECIPE.max_eval_samples:  # the validation split (10 images), not the test (48)
            tuner = accelerator.unwrap_model(model).base_model
            return SCRIPT[tuner.peft_config["default"].rounds_done]
        return accuracy

    monkeypatch.setattr(train_module, "evaluate", evaluate)


@pytest.fixture(scope="module")
def searched(backbone, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        scripted_validation(patch)
        return train(backbone, "digits", tmp_path_factory.mktemp("search") / "out", RECIPE, mimi=SEARCH)


def test_the_search_trains_the_rounds_alike_then_finishes_the_chosen_one(searched):
    *history, finished = searched.history
    assert [row["round"] for row in history] == [0, 1, 2, 3]  # every planned round, down to the floor
    assert [row["epoch"] for row in searched.history] == [1, 2, 3, 4, 8]  # one epoch each, then the finish
    assert [row["validation_accuracy"] for row in history] == [0.5, 0.6, 0.3, 0.585]
    assert [row["chosen_round"] for row in searched.history] == [0, 1, 1, 1, 1]
    assert [row["finish"] for row in searched.history] == [False] * 4 + [True]
    assert history[0]["live_params"] > history[1]["live_params"] > history[2]["live_params"]
    assert history[-1]["live_params"] <= 256 == searched.budget
    chosen = history[1]
    # the adapters were rebuilt at round 1's widths, larger than the last trained ones, and trained on
    assert finished["round"] == searched.chosen_round == searched.rounds == 1
    assert searched.widths == chosen["widths"] == finished["widths"]
    assert sum(chosen["widths"].values()) > sum(history[3]["widths"].values())
    assert searched.live_params == chosen["live_params"] == searched.model.base_model.live_params()
    assert finished["global_step"] == 48 and finished["loss"] is not None
    assert searched.accuracy == finished["accuracy"] and searched.validation_accuracy == 0.6
    assert evaluate_adapter(searched.adapter_dir, "digits", max_eval_samples=48) == finished["accuracy"]
    metrics = [json.loads(line) for line in (searched.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == searched.history


def test_the_finish_starts_from_the_chosen_rounds_weights_with_its_own_schedule(backbone, tmp_path, monkeypatch):
    """At the end of round 3 the search is over: the checkpoint written there holds the copy of round 1's adapter
    the search kept (not round 3's) and the finish's fresh optimizer, whose learning rate restarts from 0."""
    scripted_validation(monkeypatch)
    saved, real_save = {}, train_module.ckpt.save_checkpoint

    def save_checkpoint(accelerator, output_dir, model, tuner, optimizer, scheduler, pos, settings, chosen_state):
        if pos.epoch == pos.batch == 0:  # at a round boundary
            saved[pos.round] = (train_module.ckpt.trainable_tensors(model), chosen_state,
                                scheduler.get_last_lr()[0] if scheduler is not None else None)
        return real_save(accelerator, output_dir, model, tuner, optimizer, scheduler, pos, settings, chosen_state)

    monkeypatch.setattr(train_module.ckpt, "save_checkpoint", save_checkpoint)
    train(backbone, "digits", tmp_path / "out", RECIPE, mimi=SEARCH)
    _, round_one, lr_round_two = saved[2]  # after round 1 (the search's choice from then on)
    model_at_finish, kept, lr_finish = saved[4]
    assert model_at_finish.keys() == round_one.keys() == kept.keys()
    assert all(torch.equal(model_at_finish[k], round_one[k]) for k in round_one)
    round_three = saved[3][0]  # round 2's pruned adapter (round 3 trains it on) is smaller than round 1's
    assert sum(t.numel() for t in round_three.values()) < sum(t.numel() for t in round_one.values())
    assert lr_finish == 0.0 and lr_round_two > 0  # the single cosine would be half-way down; the finish warms up


def test_the_saved_adapter_records_the_option_and_reloads_at_the_chosen_widths(searched):
    config = json.loads((searched.adapter_dir / "adapter_config.json").read_text())
    assert config["budget_tolerance"] == 1.0 and config["target_compression"] == 32.0
    assert config["adapter_widths"] == searched.widths and config["rounds_done"] == 1
    reloaded, _ = load_adapter(searched.adapter_dir)
    assert reloaded.base_model.adapter_widths() == searched.widths
    assert reloaded.peft_config["default"].budget_tolerance == 1.0
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images).logits, searched.model(pixel_values=images).logits)
    card = (searched.adapter_dir / "README.md").read_text()
    assert "| budget search | tolerance 1 accuracy points" in card and "kept round 1 of the 4 trained alike" in card
    assert "then finished it with 4 more epochs" in card
    assert "(validation accuracy 0.6000 on 10 images, standard error 15.5 points, best 0.6000)" in card
    assert "| 1 finished **saved** | 8 | 1024 |" in card and "validation accuracy" in card
    assert "| budget_tolerance | `1.0` |" in card
    run = json.loads((searched.adapter_dir / "mimi_run.json").read_text())
    assert run["settings"]["mimi"]["budget_tolerance"] == 1.0


@pytest.mark.parametrize(("killed_after", "round_", "step"), [(18, 2, 16), (34, 4, 32)])
def test_resume_in_the_middle_of_the_search_ends_like_an_uninterrupted_run(searched, backbone, tmp_path,
                                                                          monkeypatch, killed_after, round_, step):
    """Killed in round 2 (after the checkpoint at step 16, round 1 already chosen): the resumed run takes round 1's
    adapter from the checkpoint, not from memory, trains round 3, finishes round 1 and saves the same adapter.
    Killed in the finish (segment 4, checkpoint at step 32): it goes on finishing round 1's adapter."""
    out = tmp_path / "out"
    scripted_validation(monkeypatch)
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "make_collate_fn", failing_data_after(killed_after, "kill"))
        with pytest.raises(Interrupt):
            train(backbone, "digits", out, RECIPE, mimi=SEARCH)
    checkpoint = latest_checkpoint(out)
    state = json.loads((checkpoint / "state.json").read_text())["position"]
    assert (state["round"], state["global_step"]) == (round_, step)
    assert state["history"][-1]["chosen_round"] == 1 and (checkpoint / "chosen.safetensors").is_file()

    resumed = train(backbone, "digits", out, RECIPE, mimi=SEARCH, resume=True)
    assert resumed.widths == searched.widths and resumed.chosen_round == 1

    def without_time(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert without_time(resumed.history) == without_time(searched.history)
    ours, theirs = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (resumed, searched))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_cli_runs_the_search_from_its_flags(backbone, tmp_path, monkeypatch, capsys):
    scripted_validation(monkeypatch)
    code = cli_main(["train", "--model", backbone, "--data", "digits", "--output-dir", str(tmp_path / "out"),
                     "--target-compression", "32", "--budget-tolerance", "1", "--validation-fraction", "0.1",
                     "--epochs-per-round", "1", "--batch-size", "16", "--max-train-samples", "96",
                     "--max-eval-samples", "48"])
    assert code == 0
    assert ("budget search kept round 1 of 4 trained alike (validation accuracy 0.6000 on 10 images, standard error "
            "15.5 points; best 0.6000; tolerance 1 points), then finished it") in \
        capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["budget_tolerance"] == 1.0 and config["rounds_done"] == 1
    assert cli_main(["info", str(tmp_path / "out" / "adapter"), "--model", backbone]) == 0
    assert ("budget search (tolerance 1 points): kept round 1 of 4 on validation accuracy; the budget above is the "
            "floor it could go to") in capsys.readouterr().out


# ------------------------------------------------------------------------------------- HF Trainer + callback
class _Digits(torch.utils.data.Dataset):
    """Digits training images pre-transformed to tensors, split into training and validation rows."""

    def __init__(self, rows):
        data = load_builtin_dataset("digits")["train"].select(rows)
        collate = make_collate_fn(ImageTransform(32, [0.5] * 3, [0.5] * 3, train=False), num_labels=10)
        batch = collate([data[i] for i in range(len(rows))])
        self.pixel_values, self.labels = batch["pixel_values"], batch["labels"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


class _ScriptedAccuracy:
    """A compute_metrics whose accuracy is ``SCRIPT[rounds_done]`` of the model being evaluated."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, prediction):
        self.calls += 1
        return {"accuracy": SCRIPT[self.model.base_model.peft_config["default"].rounds_done]}


def trainer_with_search(model, tmp_path, compute_metrics, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=8, learning_rate=5e-3,
                logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                eval_strategy="no")
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=_Digits(range(64)),
                   eval_dataset=_Digits(range(64, 80)), compute_metrics=compute_metrics)


def search_model():
    return get_peft_model(make_model("vit", num_labels=10),
                          MiMiConfig(design="paper", target_compression=32.0, budget_tolerance=1.0,
                                     modules_to_save=["classifier"]))


def test_the_trainer_callback_searches_on_the_trainers_evaluation(tmp_path):
    model = search_model()
    trainer = trainer_with_search(model, tmp_path, _ScriptedAccuracy(model))
    callback = MiMiPruningCallback.attach(trainer, restart_lr=True)
    copies = {}

    def copy(model):
        return ({n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
                 if ".mimi_" in n or ".modules_to_save." in n}, model.base_model.adapter_widths())

    class Copy(TrainerCallback):  # before the pruning callback: sees each segment's adapter before it is pruned
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            copies[model.base_model.peft_config["default"].rounds_done] = copy(model)

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == callback.finish_step:  # the first step of the finish
                copies["finish"] = copy(model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            copies["end"] = copy(model)  # before the pruning callback compacts it

    trainer.callback_handler.callbacks.insert(0, Copy())
    trainer.train()

    # 8 epochs of 4 steps, R = 3: a cut every epoch, the last round one epoch too, then the finish
    assert callback.prune_steps == [4, 8, 12] and callback.finish_step == 16
    assert trainer.state.global_step == 32
    assert callback.search.accuracies == [0.5, 0.6, 0.3, 0.585] and callback.chosen_round == 1
    tuner = model.base_model
    (chosen, widths), (start, _), (end, _) = copies[1], copies["finish"], copies["end"]
    assert all(torch.equal(start[n], chosen[n]) for n in chosen)  # the finish starts from round 1's copy, head too
    assert copies["finish"][1] == widths and sum(widths.values()) > sum(copies[3][1].values())
    assert not all(torch.equal(end[n], chosen[n]) for n in chosen if ".mimi_down." in n)  # and trains it on
    assert tuner.adapter_widths() == widths and tuner.peft_config["default"].rounds_done == 1
    assert tuner.peft_config["default"].adapter_widths == widths  # compacted at the chosen widths
    for name, tensor in model.named_parameters():
        if ".mimi_" in name:  # the finished adapter's live neurons, now compact
            layer = name.split(".mimi_")[0]
            live = chosen[f"{layer}.mimi_mask.default"]
            expected = end[name][live] if ".mimi_down." in name else end[name][:, live]
            torch.testing.assert_close(tensor, expected)
    logged = [entry for entry in trainer.state.log_history if "mimi/validation_accuracy" in entry]
    assert [entry["mimi/chosen_round"] for entry in logged] == [0, 1, 1, 1]

    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["budget_tolerance"] == 1.0 and saved["adapter_widths"] == widths
    loaded = PeftModel.from_pretrained(make_model("vit", num_labels=10), tmp_path / "adapter")
    assert loaded.base_model.adapter_widths() == widths


def test_the_trainer_search_resumes_from_a_checkpoint(tmp_path):
    reference = search_model()
    trainer = trainer_with_search(reference, tmp_path / "ref", _ScriptedAccuracy(reference))
    MiMiPruningCallback.attach(trainer)
    trainer.train()

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 20:  # rounds 0 and 1 evaluated, round 1 chosen
                control.should_training_stop = True

    model = search_model()
    trainer = trainer_with_search(model, tmp_path / "run", _ScriptedAccuracy(model), save_strategy="steps",
                                  save_steps=20)
    MiMiPruningCallback.attach(trainer)
    trainer.add_callback(StopAfter())
    trainer.train()
    assert (tmp_path / "run" / "checkpoint-20" / "mimi_budget_search.safetensors").is_file()

    resumed = search_model()
    trainer = trainer_with_search(resumed, tmp_path / "run", _ScriptedAccuracy(resumed))
    callback = MiMiPruningCallback.attach(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-20"))
    assert callback.search.accuracies == [0.5, 0.6, 0.3, 0.585] and callback.chosen_round == 1
    assert resumed.base_model.adapter_widths() == reference.base_model.adapter_widths()
    assert resumed.base_model.peft_config["default"].rounds_done == 1


def test_the_trainer_search_explains_a_missing_validation_signal(tmp_path):
    trainer = trainer_with_search(search_model(), tmp_path, None)
    trainer.eval_dataset = None
    with pytest.raises(ValueError, match="has no eval_dataset"):
        MiMiPruningCallback.attach(trainer)
    trainer = trainer_with_search(search_model(), tmp_path, None)  # evaluates, but reports no accuracy
    MiMiPruningCallback.attach(trainer)
    with pytest.raises(ValueError, match=r"metrics\['eval_accuracy'\].*compute_metrics"):
        trainer.train()


# ----------------------------------------------------------------------------------------------- the benchmark
def test_the_benchmark_runs_and_judges_the_search_on_test(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "budget_search.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    raw = json.loads((tmp_path / "budget_search.json").read_text())
    search, sweep = raw["rows"]
    assert (search["kind"], sweep["kind"], sweep["sigma"]) == ("search", "sweep", 8.0) and raw["final"]
    *rounds, finished = search["rounds"]
    assert finished["finish"] and not any(r["finish"] for r in rounds)
    assert search["chosen_round"] == finished["round"] == budget_search(
        [r["live_params"] for r in rounds], [r["validation_accuracy"] for r in rounds], 1.0)
    assert sweep["epochs"] == search["epochs"] == finished["epoch"]  # the sweep's sizes train as long as the search
    summary = raw["summary"][0]
    assert summary["sweep_seeds"] == 1 and summary["compute_ratio"][0] == 1.0  # one size: the same epochs
    text = (tmp_path / "budget_search.md").read_text()
    assert text.startswith("Command: `python benchmarks/budget_search.py --smoke") and "## Reading" in text
    assert "Against the sweep's choice (1 runs)" in text
