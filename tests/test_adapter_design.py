"""The default design, Adapter+'s adapter (Steitz & Roth 2024): channel scaling, biases, the Houlsby start and
stochastic depth. Each is counted, pruned, trained, saved, reloaded, fused and exported exactly as the paper's plain
adapter is; a file saved before designs existed loads as the paper's."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_images, make_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_mimi import MiMiConfig
from peft_mimi.export import to_plain_module
from peft_mimi.layer import HOULSBY_STD, MiMiLayer


def plus_model(seed: int = 0, **overrides):
    """MiMiConfig's default design on the tiny ViT: one adapter per block, on its MLP output."""
    torch.manual_seed(seed)
    config = MiMiConfig(**{"target_compression": 16.0, "modules_to_save": ["classifier"], **overrides})
    return get_peft_model(make_model("vit"), config)


def mimi_layers(model) -> list[MiMiLayer]:
    return [m for m in model.modules() if isinstance(m, MiMiLayer)]


def held_params(model) -> int:
    """What the adapters' tensors hold, counted from the tensors themselves."""
    return sum(p.numel() for name, p in model.named_parameters() if ".mimi_" in name)


def randomise_scales(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mimi_layers(model):
            for scale in layer.mimi_scale.values():
                scale.copy_(torch.rand(scale.shape, generator=generator) * 2 - 0.5)


def test_the_scaling_counts_in_the_budget_and_pruning_lands_on_it_freeing_removed_adapters_scales():
    model = plus_model(target_compression=64.0)
    tuner = model.base_model
    dims = tuner.feature_sizes()
    # every adapter: width·(2d + 1) for the neurons, d for the up bias, d for the scaling
    widths = tuner.adapter_widths()
    assert tuner.live_params() == held_params(model) == sum(w * (2 * dims[m] + 1) + 2 * dims[m]
                                                            for m, w in widths.items())
    assert tuner.budget() == sum(max(1, dims[m] // 64) * (2 * dims[m] + 1) + 2 * dims[m] for m in dims)
    while tuner.num_rounds():
        tuner.prune_round()
    assert tuner.live_params() <= tuner.budget()
    assert tuner.live_params() == held_params(model)  # a removed adapter keeps no scaling
    for layer in mimi_layers(model):
        assert ("default" in layer.mimi_scale) == (layer.live_width("default") > 0)


def test_a_scaled_adapter_saves_only_what_survives_and_reloads_fuses_and_exports_to_the_same_logits(tmp_path):
    model = plus_model(target_compression=32.0).eval()
    randomise_scales(model)
    with torch.no_grad():
        for layer in mimi_layers(model):  # W_up is not zero at the Houlsby start; give the biases values too
            torch.nn.init.normal_(layer.mimi_up["default"].bias, std=0.1)
    tuner = model.base_model
    while tuner.num_rounds():
        tuner.prune_round()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    widths, dims = tuner.adapter_widths(), tuner.feature_sizes()
    scales = {k.removeprefix("base_model.model.").removesuffix(".mimi_scale"): v for k, v in tensors.items()
              if k.endswith(".mimi_scale")}
    assert {m: tuple(v.shape) for m, v in scales.items()} == {m: (dims[m],) for m, w in widths.items() if w > 0}
    assert sum(v.numel() for k, v in tensors.items() if ".mimi_" in k) == tuner.live_params()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["channel_scaling"] is True

    images = make_images(3)
    with torch.no_grad():
        expected = model(pixel_values=images).logits
        for low_cpu_mem_usage in (True, False):  # the scaling created on the meta device, then filled from the file
            reloaded = PeftModel.from_pretrained(make_model("vit"), tmp_path,
                                                 low_cpu_mem_usage=low_cpu_mem_usage).eval()
            torch.testing.assert_close(reloaded(pixel_values=images).logits, expected, rtol=0, atol=0)
        plain = to_plain_module(reloaded)  # the scaling folded into W_up and b_up
        torch.testing.assert_close(plain(pixel_values=images).logits, expected, atol=1e-5, rtol=1e-5)
        reloaded.fuse_for_inference()
        torch.testing.assert_close(reloaded(pixel_values=images).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_config_and_weights_that_disagree_on_the_scaling_are_refused_before_loading(tmp_path):
    plus_model().save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["channel_scaling"] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"channel_scaling=False but .* holds a mimi_scale for module"):
        PeftModel.from_pretrained(make_model("vit"), tmp_path)


def test_a_config_saved_before_designs_existed_loads_as_the_papers_design(tmp_path):
    model = get_peft_model(make_model("vit"), MiMiConfig(design="paper", target_compression=16.0, init_weights=False))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for key in ("design", "channel_scaling", "init_weights", "drop_path"):  # what such a file lacks
        del config[key]
    config_path.write_text(json.dumps(config))
    images = make_images(2)
    reloaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    loaded = reloaded.peft_config["default"]
    assert (loaded.design, loaded.adapter_bias, loaded.channel_scaling, loaded.drop_path) == ("paper", False, False, 0)
    assert len(reloaded.base_model.adapter_widths()) == 4  # attention and MLP outputs of both blocks
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images).logits, model.eval()(pixel_values=images).logits)


def test_the_houlsby_start_draws_both_matrices_small_and_keeps_the_model_near_the_base():
    model = plus_model(init_compression=1.0, drop_path=0.0).eval()
    for layer in mimi_layers(model):
        for linear in (layer.mimi_down["default"], layer.mimi_up["default"]):
            weight = linear.weight.detach()
            assert weight.abs().max() <= 2 * HOULSBY_STD
            assert 0.6 * HOULSBY_STD < weight.std() < 1.0 * HOULSBY_STD  # the truncated normal's std is 0.88σ
        assert torch.equal(layer.mimi_scale["default"].detach(), torch.ones(layer.feature_size))
    images = make_images(2)
    with torch.no_grad():
        adapted = model(pixel_values=images).logits
        with model.disable_adapter():
            base = model(pixel_values=images).logits
    assert not torch.equal(adapted, base)
    torch.testing.assert_close(adapted, base, atol=0.05, rtol=0)


def test_stochastic_depth_drops_whole_images_in_training_only():
    model = plus_model(drop_path=0.5, init_weights=False)
    layer = mimi_layers(model)[0]
    y = torch.randn(64, 5, layer.feature_size)
    layer.eval()
    full = layer.adapter_delta("default", y)
    layer.train()
    torch.manual_seed(0)
    dropped = layer.adapter_delta("default", y)
    kept = dropped.flatten(1).abs().sum(1) > 0
    assert 16 < int(kept.sum()) < 48  # about half the images keep their branch, scaled by 1 / (1 - 0.5)
    torch.testing.assert_close(dropped[kept], 2 * full[kept])
    images = make_images(3)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=images).logits, model(pixel_values=images).logits)


def test_the_trainer_cuts_and_trains_a_scaled_adapter_and_saves_what_it_evaluated(backbone, tmp_path):
    from test_train import RECIPE

    from peft_mimi.evaluate import load_adapter
    from peft_mimi.train import train

    result = train(backbone, "digits", tmp_path / "out", RECIPE, mimi=MiMiConfig(target_compression=16.0))
    assert result.rounds == 2 and result.live_params <= result.budget
    assert result.live_params == held_params(result.model)
    reloaded, _ = load_adapter(result.adapter_dir)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images).logits,
                                   result.model.eval()(pixel_values=images).logits)
    card = (result.adapter_dir / "README.md").read_text()
    assert ("| adapter design | `gelu` activation, biases, learned channel scaling (folded into W_up for inference), "
            "Houlsby initialisation, stochastic depth 0.1 in training |") in card
    scales = [layer.mimi_scale["default"] for layer in mimi_layers(result.model) if "default" in layer.mimi_scale]
    assert scales and any(not torch.equal(s.detach(), torch.ones_like(s)) for s in scales)  # the scaling trained
