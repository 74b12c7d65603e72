"""MiMi's schedule inside transformers.Trainer, on a tiny ViT and the real bundled digits dataset."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_mimi import MiMiConfig, MiMiPruningCallback, rounds_for_cosine_restarts
from peft_mimi.data import ImageTransform, load_builtin_dataset, make_collate_fn

pytest.importorskip("sklearn")


class _Transformed(torch.utils.data.Dataset):
    """Digits pre-transformed to tensors once, so the Trainer tests spend their time training."""

    def __init__(self, split: str, n: int):
        data = load_builtin_dataset("digits")[split].select(range(n))
        collate = make_collate_fn(ImageTransform(32, [0.5] * 3, [0.5] * 3, train=False), num_labels=10)
        batch = collate([data[i] for i in range(n)])
        self.pixel_values, self.labels = batch["pixel_values"], batch["labels"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


@pytest.fixture(scope="module")
def digits():
    return _Transformed("train", 128), _Transformed("test", 64)


def mimi_model(**overrides):
    config = dict(target_compression=16.0, modules_to_save=["classifier"])
    config.update(overrides)
    return get_peft_model(make_model("vit", num_labels=10), MiMiConfig(**config))


def trainer_for(model, train, tmp_path, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=6, learning_rate=5e-3,
                logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                lr_scheduler_type="cosine_with_restarts",
                lr_scheduler_kwargs={"num_cycles": rounds_for_cosine_restarts(model)})
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=train)


class _Recorder(TrainerCallback):
    """Stands in for a reporting integration: records what on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_schedule_lands_on_the_budget_trains_after_the_last_round_and_reloads(digits, tmp_path):
    train, test = digits
    model = mimi_model()
    tuner = model.base_model
    rounds = tuner.num_rounds()
    assert rounds == 2
    trainer = trainer_for(model, train, tmp_path)
    callback = MiMiPruningCallback.attach(trainer)
    recorder = _Recorder()
    trainer.add_callback(recorder)
    snapshots = {}

    class Snapshot(TrainerCallback):  # runs after the pruning callback, which attach() put first
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in (callback.prune_steps[-1], state.max_steps):
                snapshots[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                                if ".mimi_" in n}

    trainer.add_callback(Snapshot())
    trainer.train()

    max_steps = trainer.state.max_steps
    assert callback.prune_steps == [max_steps // 3, 2 * max_steps // 3]
    assert tuner.live_params() <= tuner.budget()
    assert tuner.peft_config["default"].rounds_done == 2
    # compacted at the end: the physical widths are the live widths
    assert tuner.peft_config["default"].adapter_widths == tuner.adapter_widths()
    # the adapters kept training after the last pruning
    after_pruning, at_the_end = snapshots[callback.prune_steps[-1]], snapshots[max_steps]
    assert max_steps > callback.prune_steps[-1]
    assert any(not torch.equal(after_pruning[n], at_the_end[n]) for n in at_the_end)
    # the round metrics reached a reporting callback and the Trainer's history
    round_logs = [log for log in recorder.logs if "mimi/round" in log]
    assert [log["mimi/round"] for log in round_logs] == [1, 2]
    assert round_logs[-1]["mimi/live_params"] <= round_logs[-1]["mimi/budget"]
    assert any("mimi/budget" in entry for entry in trainer.state.log_history)

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_model("vit", num_labels=10), tmp_path / "adapter")
    model.eval()
    x = test.pixel_values[:8]
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert loaded.base_model.adapter_widths() == tuner.adapter_widths()


def test_gradient_accumulation_and_segments_in_epochs(digits, tmp_path):
    train, _ = digits
    model = mimi_model()
    trainer = trainer_for(model, train, tmp_path, gradient_accumulation_steps=2, num_train_epochs=6)
    callback = MiMiPruningCallback(epochs_per_round=2)
    trainer.add_callback(callback)
    trainer.train()
    steps_per_epoch = trainer.state.max_steps // 6
    assert callback.prune_steps == [2 * steps_per_epoch, 4 * steps_per_epoch]
    assert model.base_model.live_params() <= model.base_model.budget()


def test_resume_from_a_mid_schedule_checkpoint(digits, tmp_path):
    train, _ = digits
    reference = mimi_model()
    trainer = trainer_for(reference, train, tmp_path / "ref")
    trainer.add_callback(MiMiPruningCallback())
    trainer.train()
    expected = reference.base_model.adapter_widths()

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 20:  # after the first round (step 16), before the second (step 32)
                control.should_training_stop = True

    model = mimi_model()
    trainer = trainer_for(model, train, tmp_path / "run", save_strategy="steps", save_steps=20)
    trainer.add_callback(MiMiPruningCallback())
    trainer.add_callback(StopAfter())
    trainer.train()
    assert (tmp_path / "run" / "checkpoint-20").is_dir()

    resumed = mimi_model()
    trainer = trainer_for(resumed, train, tmp_path / "run", save_strategy="no")
    callback = MiMiPruningCallback()
    trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-20"))
    assert resumed.base_model.peft_config["default"].rounds_done == 2
    assert resumed.base_model.adapter_widths() == expected


def test_callback_refuses_a_model_that_is_not_mimi(digits, tmp_path):
    train, _ = digits
    trainer = trainer_for(mimi_model(), train, tmp_path)
    trainer.model = make_model("vit", num_labels=10)
    trainer.add_callback(MiMiPruningCallback())
    with pytest.raises(TypeError, match="needs a MiMi model"):
        MiMiPruningCallback().on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    with pytest.raises(TypeError, match="get_peft_model"):
        MiMiPruningCallback.attach(trainer)


def test_too_short_training_is_explained(digits, tmp_path):
    with pytest.raises(ValueError, match="Train longer"):
        MiMiPruningCallback(steps_per_round=10).plan(max_steps=20, num_train_epochs=1, planned_rounds=2)
    with pytest.raises(ValueError, match="not both"):
        MiMiPruningCallback(steps_per_round=10, epochs_per_round=1)
