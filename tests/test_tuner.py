"""MiMi as a PEFT method: the behaviours PEFT demands of every tuner, and MiMi's own, on all four families."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_images, make_model
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file, save_file

import peft_mimi
from peft_mimi import MiMiConfig, MiMiModel


def mimi(**overrides) -> MiMiConfig:
    """The paper's design (two plain adapters per block, W_up from zero): the counts below are written for it; the
    default design is exercised here where it differs, in test_families.py and in test_adapter_design.py."""
    kwargs = dict(design="paper", target_compression=16.0, modules_to_save=["classifier"])
    kwargs.update(overrides)
    return MiMiConfig(**kwargs)


def prune_to_budget(model) -> dict[str, int]:
    tuner = model.base_model
    while tuner.num_rounds():
        tuner.prune_round()
    return tuner.adapter_widths()


def test_import_registers_a_real_peft_type_and_is_idempotent():
    import importlib

    assert PeftType.MIMI.value == "MIMI"
    assert PeftType("MIMI") is PeftType.MIMI
    importlib.reload(peft_mimi)
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MIMI].__name__ == "MiMiModel"
    assert MiMiConfig(target_compression=8.0).peft_type == PeftType.MIMI


def is_attention_output(name: str) -> bool:
    """The attention output projection, in transformers 5's names or 4.x's."""
    return name.endswith(("attention.o_proj", "attention.output.dense"))


def is_mlp_output(name: str) -> bool:
    """The second MLP Linear, in transformers 5's names or 4.x's (`layer.N.output.dense`; DINOv2's `mlp.fc2`)."""
    return name.endswith(("mlp.fc2", ".output.dense")) and not is_attention_output(name)


def test_default_targets_are_the_mlp_outputs_and_for_the_paper_the_attention_outputs_too(family):
    depth = 2
    names = list(get_peft_model(make_model(family), MiMiConfig()).base_model.adapter_widths())
    assert len(names) == depth and all(is_mlp_output(n) for n in names), names
    names = list(get_peft_model(make_model(family), mimi()).base_model.adapter_widths())  # design="paper"
    assert len(names) == 2 * depth, names
    assert sum(is_attention_output(n) for n in names) == depth, names
    assert sum(is_mlp_output(n) for n in names) == depth, names


def test_the_default_design_is_adapter_plus_and_a_design_fills_only_what_is_not_given():
    config = MiMiConfig()
    assert (config.design, config.adapter_bias, config.channel_scaling, config.init_weights, config.drop_path) == (
        "adapter_plus", True, True, "houlsby", 0.1)
    paper = MiMiConfig(design="paper", drop_path=0.2)
    assert (paper.adapter_bias, paper.channel_scaling, paper.init_weights, paper.drop_path) == (False, False, True, 0.2)
    with pytest.raises(ValueError, match=r"design='adapters' is not known; choose one of \('adapter_plus', 'paper'\)"):
        MiMiConfig(design="adapters")


def test_an_adapted_model_keeps_its_mode_so_drop_path_acts_only_in_training():
    model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0))  # drop_path 0.1 by default
    x = make_images()
    assert torch.equal(model(x).logits, model(x).logits)  # the backbone was in eval mode: so are its adapters
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)


def test_widths_start_proportional_to_the_layer(family):
    model = get_peft_model(make_model(family), mimi(init_compression=4.0))
    tuner = model.base_model
    for name, d in tuner.feature_sizes().items():
        assert tuner.adapter_widths()[name] == d // 4


def test_zero_initialised_up_projection_starts_as_the_base_model(family):
    base = make_model(family)
    x = make_images()
    expected = base(x).logits
    model = get_peft_model(base, mimi())
    torch.testing.assert_close(model(x).logits, expected)


def test_disable_adapter_gives_the_base_model_and_is_restored_on_exit(family):
    base = make_model(family)
    x = make_images()
    expected = base(x).logits
    model = get_peft_model(base, mimi(init_weights=False))
    adapted = model(x).logits
    assert not torch.allclose(adapted, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(x).logits, expected)
    torch.testing.assert_close(model(x).logits, adapted)


def test_only_adapters_and_head_train(family):
    model = get_peft_model(make_model(family), mimi(init_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(pixel_values=make_images(), labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(".mimi_" in n or "classifier" in n for n in changed), changed
    assert any(".mimi_down" in n for n in changed) and any(".mimi_up" in n for n in changed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".mimi_" in n or "modules_to_save" in n for n in trainable), trainable


def test_print_trainable_parameters_counts_adapters_and_head(capsys):
    model = get_peft_model(make_model("vit"), mimi())
    model.print_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()
    head = sum(p.numel() for p in make_model("vit").classifier.parameters())
    assert trainable == model.base_model.live_params() + head
    assert f"{trainable:,}" in capsys.readouterr().out


def test_pruning_lands_on_the_budget_and_can_remove_whole_adapters(family):
    model = get_peft_model(make_model(family), mimi(target_compression=64.0, init_weights=False))
    tuner = model.base_model
    rounds = tuner.num_rounds()
    assert rounds >= 2
    history = []
    for _ in range(rounds):
        history.append(tuner.prune_round())
    assert tuner.num_rounds() == 0
    assert tuner.live_params() <= tuner.budget()
    assert tuner.peft_config["default"].rounds_done == rounds
    for before, after in zip(history, history[1:]):
        assert all(after[k] <= before[k] for k in before)
    x = make_images()
    assert torch.isfinite(model(x).logits).all()


def test_global_selection_reallocates_between_layers_and_local_does_not():
    def pruned_widths(selection):
        model = get_peft_model(make_model("vit"), mimi(target_compression=32.0, selection=selection,
                                                       init_weights=False))
        tuner = model.base_model
        # make the first block's adapters clearly more important than the second block's
        for name, module in model.named_modules():
            if hasattr(module, "mimi_down") and "default" in module.mimi_down:
                scale = 5.0 if ".layers.0." in name else 0.1
                module.mimi_down["default"].weight.data.mul_(scale)
        tuner.prune_round()
        return tuner.adapter_widths()

    glob, local = pruned_widths("global"), pruned_widths("local")
    first = [k for k in glob if ".layers.0." in k]
    second = [k for k in glob if ".layers.1." in k]
    assert all(glob[k] == 8 for k in first) and all(glob[k] == 0 for k in second)
    assert all(local[k] == 4 for k in first + second)


def test_every_score_variant_prunes_to_the_budget():
    for score in ("mimi", "l1", "down_l1", "random", "gradient"):
        model = get_peft_model(make_model("swin"), mimi(score=score, init_weights=False))
        tuner = model.base_model
        model.train()
        while tuner.num_rounds():
            model(pixel_values=make_images(), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
            tuner.prune_round()
        assert model.base_model.live_params() <= model.base_model.budget()


def test_gradient_score_without_a_backward_pass_is_an_error():
    model = get_peft_model(make_model("vit"), mimi(score="gradient", init_weights=False))
    with pytest.raises(ValueError, match="backward"):
        model.base_model.prune_round()


def test_masked_pruning_keeps_shapes_and_compact_matches_it():
    model = get_peft_model(make_model("vit"), mimi(target_compression=32.0, init_weights=False))
    tuner = model.base_model
    shapes = {n: p.shape for n, p in model.named_parameters()}
    while tuner.num_rounds():
        tuner.prune_round(compact=False)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    x = make_images()
    masked_logits = model(x).logits
    widths = tuner.adapter_widths()
    assert tuner.compact() == widths
    torch.testing.assert_close(model(x).logits, masked_logits)
    assert tuner.peft_config["default"].adapter_widths == widths


def test_saved_adapter_holds_only_live_neurons_and_reloads_in_a_fresh_process(tmp_path, family):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_model(family).save_pretrained(base_dir)
    base = type(make_model(family)).from_pretrained(base_dir)
    model = get_peft_model(base, mimi(target_compression=32.0, init_weights=False))
    widths = prune_to_budget(model)
    model.save_pretrained(adapter_dir)

    assert sorted(p.name for p in adapter_dir.iterdir()) == ["README.md", "adapter_config.json",
                                                             "adapter_model.safetensors"]
    saved_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "MIMI"
    assert saved_config["adapter_widths"] == widths
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    dims = model.base_model.feature_sizes()
    adapter_weights = sum(v.numel() for k, v in tensors.items() if ".mimi_" in k)
    assert adapter_weights == sum(2 * dims[m] * w for m, w in widths.items())
    assert not any("mimi_mask" in k for k in tensors)
    head = sum(v.numel() for k, v in tensors.items() if "classifier" in k)
    assert head == sum(p.numel() for p in make_model(family).classifier.parameters())
    assert set(tensors) == {k for k in tensors if ".mimi_" in k or "classifier" in k}

    x = make_images()
    torch.save(x, tmp_path / "x.pt")
    expected = model(x).logits
    script = textwrap.dedent(f"""
        import sys, torch, peft_mimi
        from peft import PeftModel
        from transformers import AutoModelForImageClassification
        base = AutoModelForImageClassification.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}, low_cpu_mem_usage=bool(int(sys.argv[1])))
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        torch.save({{"logits": model(x).logits, "widths": model.base_model.adapter_widths()}}, sys.argv[2])
    """)
    for low_cpu in ("0", "1"):
        out = tmp_path / f"out{low_cpu}.pt"
        subprocess.run([sys.executable, "-c", script, low_cpu, str(out)], check=True)
        result = torch.load(out, weights_only=True)
        assert result["widths"] == widths
        torch.testing.assert_close(result["logits"], expected, rtol=0, atol=0)


def test_adapters_pruned_to_width_zero_are_recorded_and_restored(tmp_path):
    model = get_peft_model(make_model("vit"), mimi(target_compression=None, target_params=0, init_weights=False))
    prune_to_budget(model)
    widths = model.base_model.adapter_widths()
    assert set(widths.values()) == {0}
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not any(".mimi_" in k for k in tensors)
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert loaded.base_model.adapter_widths() == widths
    x = make_images()
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_masked_checkpoint_round_trips_with_its_masks(tmp_path):
    model = get_peft_model(make_model("vit"), mimi(target_compression=32.0, init_weights=False))
    model.base_model.prune_round(compact=False)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert any("mimi_mask" in k for k in tensors)
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert loaded.base_model.adapter_widths() == model.base_model.adapter_widths()
    x = make_images()
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_config_json_round_trip(tmp_path):
    config = MiMiConfig(init_compression=2.0, target_params=1234, prune_ratio=0.25, selection="local",
                        score="down_l1", activation="relu", adapter_bias=True, target_modules=["fc2"],
                        modules_to_save=["classifier"], adapter_widths={"a.fc2": 3, "b.fc2": 0})
    config.save_pretrained(tmp_path)
    loaded = MiMiConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.peft_type == PeftType.MIMI


def test_the_config_holds_the_method_the_peft_fields_and_the_recorded_state_only():
    from dataclasses import fields

    from peft.config import PeftConfig

    own = {f.name for f in fields(MiMiConfig)} - {f.name for f in fields(PeftConfig)}
    assert own == {
        "design", "init_compression", "target_compression", "target_params", "prune_ratio", "selection",  # method
        "score", "budget_tolerance", "init_weights", "activation", "adapter_bias", "channel_scaling", "drop_path",
        "target_modules", "exclude_modules", "modules_to_save",  # PEFT's module fields
        "adapter_widths", "rounds_done", "seed",  # recorded state
    }
    documented = re.findall(r"^        (\w+) \(`", MiMiConfig.__doc__, flags=re.MULTILINE)  # the Args: block
    assert documented == [f.name for f in fields(MiMiConfig) if f.name in own]
    assert peft_mimi.pruning.SCORES == ("mimi", "l1", "down_l1", "gradient", "random")  # the paper's and ablations


def test_an_old_config_loads_when_a_removed_setting_was_off_and_is_refused_when_it_was_on(tmp_path):
    model = get_peft_model(make_model("vit"), mimi(init_weights=False))
    prune_to_budget(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())

    path.write_text(json.dumps({**saved, "reconstruct": False}))  # written by every save before the removal
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert not hasattr(loaded.peft_config["default"], "reconstruct")
    assert loaded.base_model.adapter_widths() == model.base_model.adapter_widths()

    for removed, fix in (({"reconstruct": True}, 'delete the "reconstruct" key from adapter_config.json'),
                         ({"score": "taylor"}, 'set "score" to "mimi" in adapter_config.json')):
        path.write_text(json.dumps({**saved, **removed}))
        with pytest.raises(ValueError, match=f"peft_mimi no longer has.*{re.escape(fix)}"):
            PeftModel.from_pretrained(make_model("vit"), tmp_path)
    with pytest.raises(TypeError, match="reconstruct"):  # only old files get the leniency, not new code
        MiMiConfig(reconstruct=False)


def test_the_default_budget_is_not_written_into_the_config_so_another_budget_can_be_set_later(tmp_path):
    import dataclasses

    config = MiMiConfig()
    assert (config.target_compression, config.effective_target_compression) == (None, 32.0)
    config.target_params = 1000  # set after construction, as a script or the Trainer might
    assert config.effective_target_compression is None
    config.save_pretrained(tmp_path)
    assert MiMiConfig.from_pretrained(tmp_path).target_params == 1000

    replaced = dataclasses.replace(MiMiConfig(), target_params=1000)
    assert (replaced.target_compression, replaced.target_params) == (None, 1000)
    model = get_peft_model(make_model("vit"), dataclasses.replace(mimi(target_compression=None), target_params=1000))
    assert model.base_model.budget() == 1000
    prune_to_budget(model)
    assert 0 < model.base_model.live_params() <= 1000
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_model("vit"), tmp_path / "adapter").peft_config["default"]
    assert (reloaded.target_compression, reloaded.target_params) == (None, 1000)

    default = get_peft_model(make_model("vit"), mimi(target_compression=None)).base_model
    uniform_32 = get_peft_model(make_model("vit"), mimi(target_compression=32.0)).base_model
    assert default.budget() == uniform_32.budget()  # the default σt = 32 applies without being written


def test_neuron_scores_are_local_and_change_nothing_while_pruning_sums_the_gradients_of_every_process(monkeypatch):
    model = get_peft_model(make_model("vit"), mimi(score="gradient", init_weights=False))
    tuner = model.base_model
    model.train()
    model(pixel_values=make_images(), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    layers = dict(tuner._layers("default"))
    accumulated = {name: layer.gradient_scores("default").clone() for name, layer in layers.items()}

    # a two-process run, seen from one process: all_reduce sums (here: doubles) what every process holds
    calls = []

    def all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: None)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")

    scores = tuner.neuron_scores()  # one process alone may call it: no collective, nothing mutated
    assert calls == []
    for name, layer in layers.items():
        torch.testing.assert_close(layer.gradient_scores("default"), accumulated[name])
        torch.testing.assert_close(scores[name], accumulated[name] / (2 * layer.feature_size))

    ranked = []

    def keep_all(scores, *args, **kwargs):
        ranked.extend(scores)
        return [torch.ones(len(s), dtype=torch.bool) for s in scores]

    monkeypatch.setattr(peft_mimi.model, "select_neurons", keep_all)
    tuner.prune_round()  # every process prunes together: one all_reduce of all the layers' gradients
    assert calls == [sum(t.numel() for t in accumulated.values())]
    for got, (name, layer) in zip(ranked, layers.items(), strict=True):
        torch.testing.assert_close(got, 2 * accumulated[name] / (2 * layer.feature_size))


TWO_PROCESSES = """
import datetime, json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from conftest import make_images, make_model
from peft import get_peft_model
from peft_mimi import MiMiConfig

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
model = get_peft_model(make_model("vit"), MiMiConfig(target_compression=16.0, score="gradient", init_weights=False))
model.train()
model(pixel_values=make_images(seed=rank + 1), labels=torch.tensor([0, 1, 2, 0])).loss.backward()  # own batch
tuner = model.base_model
if rank == 1:
    tuner.neuron_scores()  # one process alone
dist.barrier()
grads = {name: layer.gradient_scores("default").tolist() for name, layer in tuner._layers("default")}
budget, final = tuner.budget(), tuner.num_rounds() == 1
widths = tuner.prune_round()  # every process together
print(json.dumps({"grads": grads, "budget": budget, "final": final, "widths": widths}))
"""


def test_two_processes_prune_together_on_their_summed_gradients_and_may_score_alone(tmp_path):
    import socket
    from pathlib import Path

    from peft_mimi.pruning import select_neurons

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(TWO_PROCESSES)
    tests = str(Path(__file__).parent)
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), tests], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for process in ranks:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    first, second = results
    assert first["widths"] == second["widths"], "every process ends with the same widths"
    assert first["grads"] != second["grads"], "each process saw its own batch"
    names = list(first["widths"])
    summed = [(torch.tensor(first["grads"][n]) + torch.tensor(second["grads"][n])) / (2 * 32) for n in names]
    keep = select_neurons(summed, [32] * len(names), ratio=0.5, budget=first["budget"], final=first["final"])
    assert dict(zip(names, (int(k.sum()) for k in keep))) == first["widths"]


def test_several_adapters_load_switch_and_delete(tmp_path):
    x = make_images()
    trained = {}
    for name, budget in (("cats", 16.0), ("dogs", 64.0)):
        model = get_peft_model(make_model("vit"), mimi(target_compression=budget, init_weights=False))
        prune_to_budget(model)
        model.save_pretrained(tmp_path / name)
        trained[name] = (model(x).logits, model.base_model.adapter_widths())

    model = PeftModel.from_pretrained(make_model("vit"), tmp_path / "cats", adapter_name="cats")
    model.load_adapter(tmp_path / "dogs", adapter_name="dogs")
    for name in ("cats", "dogs", "cats"):
        model.set_adapter(name)
        torch.testing.assert_close(model(x).logits, trained[name][0])
        assert model.base_model.adapter_widths(name) == trained[name][1]
    model.delete_adapter("dogs")
    assert list(model.peft_config) == ["cats"]
    assert not any(".dogs" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x).logits, trained["cats"][0])


def test_requires_grad_follows_set_adapter():
    model = get_peft_model(make_model("vit"), mimi())
    model.add_adapter("other", mimi())
    def trainable(adapter):
        return {p.requires_grad for n, p in model.named_parameters() if ".mimi_" in n and n.endswith(
            (f".{adapter}.weight", f".{adapter}.bias"))}
    assert trainable("default") == {True} and trainable("other") == {False}
    model.set_adapter("other")
    assert trainable("default") == {False} and trainable("other") == {True}


def test_head_in_modules_to_save_round_trips(tmp_path):
    model = get_peft_model(make_model("vit"), mimi())
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    torch.testing.assert_close(loaded(make_images()).logits, model(make_images()).logits)


def test_merge_is_refused_with_an_explanation_and_unload_returns_the_base():
    base = make_model("vit")
    x = make_images()
    expected = base(x).logits
    model = get_peft_model(base, mimi(init_weights=False))
    with pytest.raises(NotImplementedError, match="non-linear"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="non-linear"):
        model.merge_adapter()
    unloaded = model.unload()
    assert not any("mimi" in n for n, _ in unloaded.named_modules())
    torch.testing.assert_close(unloaded(x).logits, expected)


def test_a_file_whose_tensors_disagree_with_the_recorded_widths_is_refused(tmp_path):
    model = get_peft_model(make_model("vit"), mimi(target_compression=32.0, init_weights=False))
    prune_to_budget(model)
    widths = model.base_model.adapter_widths()
    module = next(name for name, width in widths.items() if is_attention_output(name) and width > 0)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(f"{module}.mimi_down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, path)
    shapes = r"shape \(\d+, 32\) in the weights file but \(\d+, 32\)"
    with pytest.raises(ValueError, match=f"{re.escape(module)}.*{shapes}"):
        PeftModel.from_pretrained(make_model("vit"), tmp_path)


def test_a_file_missing_a_live_adapter_is_refused(tmp_path):
    model = get_peft_model(make_model("vit"), mimi(init_weights=False))
    module = [name for name in model.base_model.adapter_widths() if is_mlp_output(name)][1]  # the 2nd block's MLP
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if f"{module}.mimi_" not in k}
    save_file(tensors, path)
    with pytest.raises(ValueError, match=f"no tensor for module '{re.escape(module)}'"):
        PeftModel.from_pretrained(make_model("vit"), tmp_path)


def test_adapter_for_another_depth_is_refused(tmp_path):
    model = get_peft_model(make_model("vit", layers=2), mimi())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different backbone"):
        PeftModel.from_pretrained(make_model("vit", layers=1), tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_backbones(dtype):
    base = make_model("vit").to(dtype)
    model = get_peft_model(base, mimi(init_weights=False))
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if ".mimi_" in n}
    assert adapter_dtypes == {torch.float32}  # PEFT's autocast_adapter_dtype keeps adapters in fp32
    if dtype is not torch.float16:  # fp16 matmuls are not implemented for every CPU op
        logits = model(make_images().to(dtype)).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_any_model_through_target_modules():
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 16)
            self.out = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.out(torch.relu(self.inp(x)))

    model = get_peft_model(Mlp(), MiMiConfig(target_modules=["inp", "out"], target_compression=8.0,
                                             init_compression=2.0))
    assert model.base_model.adapter_widths() == {"inp": 8, "out": 4}
    assert isinstance(model.base_model, MiMiModel)
    assert model(torch.randn(2, 8)).shape == (2, 8)


def test_model_type_without_defaults_lists_its_linear_layers():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"no default target_modules.*proj"):
        get_peft_model(Tiny(), mimi())
