"""The families with default targets beyond ViT/DeiT/DINOv2/Swin: CLIP and SigLIP vision towers and classifiers,
BEiT, Data2VecVision, ViTMAE, ViTMSN, DINOv2 with SwiGLU MLPs and DINOv3. Each is built tiny and random, gets MiMi
with MiMiConfig's default targets, runs, prunes a round, and reloads from disk to identical logits and widths.

No test names a module: what is adapted is checked against the model itself (the default design: one adapter per
block, writing the hidden size and reading the MLP's hidden width; the paper's: a second one reading the hidden
size), so the same tests hold under transformers 4.x and 5.x.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers
from conftest import FAMILIES as FIRST_FAMILIES
from conftest import make_model
from peft import PeftModel, get_peft_model
from torch import nn

from peft_mimi import MiMiConfig

IMAGE_SIZE = 32
HIDDEN = 32
LAYERS = 2
VISION = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
              num_attention_heads=2, intermediate_size=2 * HIDDEN)
TEXT = dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * HIDDEN)
TOWERS = dict(vision_config=VISION, text_config=TEXT)

# family: (model class, config class, config arguments), looked up in the installed transformers by name
FAMILIES = {
    "clip-vision": ("CLIPVisionModel", "CLIPVisionConfig", VISION),
    "clip-classifier": ("CLIPForImageClassification", "CLIPConfig", dict(**TOWERS, num_labels=3)),
    "siglip-vision": ("SiglipVisionModel", "SiglipVisionConfig", VISION),
    "siglip-classifier": ("SiglipForImageClassification", "SiglipConfig", dict(**TOWERS, num_labels=3)),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(**VISION, num_labels=3)),
    "data2vec-vision": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig", dict(**VISION, num_labels=3)),
    "vit-mae": ("ViTMAEModel", "ViTMAEConfig", VISION),
    "vit-msn": ("ViTMSNForImageClassification", "ViTMSNConfig", dict(**VISION, num_labels=3)),
    "dinov2-swiglu": ("Dinov2ForImageClassification", "Dinov2Config",
                      dict(**VISION, use_swiglu_ffn=True, num_labels=3)),
    "dinov3": ("DINOv3ViTModel", "DINOv3ViTConfig", VISION),
}


def make(family: str, seed: int = 0) -> nn.Module:
    """The family's tiny random model in eval mode, identical for a given seed; skips the test when the installed
    transformers lacks the family."""
    model_class, config_class, kwargs = FAMILIES[family]
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()


def mimi_config(model: nn.Module, **overrides) -> MiMiConfig:
    kwargs = dict(target_compression=16.0, init_weights=False,
                  modules_to_save=["classifier"] if hasattr(model, "classifier") else None)
    return MiMiConfig(**{**kwargs, **overrides})


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of a classifier, the last hidden state of an encoder. ViTMAE masks patches at random: fixed
    noise makes its forward deterministic."""
    kwargs = {}
    if getattr(getattr(model, "config", None), "model_type", None) == "vit_mae":
        kwargs["noise"] = torch.linspace(0, 1, (IMAGE_SIZE // 8) ** 2).expand(len(x), -1)
    with torch.no_grad():
        out = model(pixel_values=x, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def block_of(name: str) -> str:
    """The transformer block a module sits in: its name up to the last numeric index."""
    return re.match(r"(.*\.\d+)\.", name).group(1)


def adapt(model: nn.Module, config: MiMiConfig) -> tuple[nn.Module, list[str]]:
    """``get_peft_model(model, config)`` and the messages of the partial-block warnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, config)
    return peft_model, [str(w.message) for w in caught if "only in part" in str(w.message)]


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("design, reads", [("adapter_plus", [False]), ("paper", [False, True])])
def test_default_targets_adapt_the_designs_sublayers_of_every_block(family, design, reads):
    base = make(family)
    model, warned = adapt(base, mimi_config(base, design=design))
    assert not warned
    names = list(model.base_model.adapter_widths())
    layers = {block_of(name) for name in names}
    assert len(names) == len(reads) * LAYERS and len(layers) == LAYERS
    modules = dict(model.base_model.model.named_modules())
    for block in layers:
        adapted = [modules[name].get_base_layer() for name in names if block_of(name) == block]
        assert all(layer.out_features == HIDDEN for layer in adapted)  # each writes the residual stream
        # the MLP's output reads its hidden width; the paper's attention output reads the hidden size; fc1/q/k/v are
        # never adapted
        assert sorted(layer.in_features == HIDDEN for layer in adapted) == reads


def test_prune_save_and_reload_give_identical_widths_and_outputs(family, tmp_path):
    base = make(family)
    model = get_peft_model(base, mimi_config(base))
    x = images()
    before = outputs(model, x)
    tuner = model.base_model
    start = sum(tuner.adapter_widths().values())
    widths = tuner.prune_round()
    assert sum(widths.values()) < start and tuner.peft_config["default"].rounds_done == 1
    after = outputs(model, x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(family), tmp_path).eval()
    assert loaded.base_model.adapter_widths() == widths
    assert torch.equal(outputs(loaded, x), after)


@pytest.mark.parametrize("name", FIRST_FAMILIES)
def test_defaults_of_vit_deit_dinov2_swin_are_not_warned_about(name):
    for config, per_block in ((MiMiConfig(), 1), (MiMiConfig(design="paper"), 2)):
        model, warned = adapt(make_model(name), config)
        assert not warned
        assert len(model.base_model.adapter_widths()) == per_block * LAYERS


def mlp_outputs(model) -> list[str]:
    """The adapted module names that read the MLP's hidden width (the second MLP Linear of each block)."""
    modules = dict(model.base_model.model.named_modules())
    return [name for name in model.base_model.adapter_widths() if modules[name].get_base_layer().in_features != HIDDEN]


def test_targets_that_miss_the_attention_outputs_get_one_warning_naming_them_in_the_papers_design(family):
    defaults = get_peft_model(make(family), mimi_config(make(family), design="paper"))
    mlp = mlp_outputs(defaults)
    attention = sorted(set(defaults.base_model.adapter_widths()) - set(mlp))
    base = make(family)
    model, messages = adapt(base, mimi_config(base, design="paper", target_modules=mlp))
    assert len(messages) == 1
    # summarised: one pattern for the attention outputs of all blocks, with their count
    pattern = re.sub(r"\.\d+\.", ".*.", attention[0])
    assert f"{pattern} ({LAYERS} modules)" in messages[0]
    assert sorted(model.base_model.adapter_widths()) == sorted(mlp)


def test_adapting_some_blocks_whole_is_not_warned_about():
    base = make("beit")
    defaults = list(get_peft_model(make("beit"), mimi_config(base)).base_model.adapter_widths())
    first_block = [name for name in defaults if block_of(name) == block_of(defaults[0])]
    model, warned = adapt(base, mimi_config(base, target_modules=first_block))
    assert not warned
    assert sorted(model.base_model.adapter_widths()) == sorted(first_block)


@pytest.mark.parametrize("model_class, config_class", [("CLIPModel", "CLIPConfig"), ("SiglipModel", "SiglipConfig")])
def test_a_dual_tower_model_gets_adapters_in_its_vision_encoder_only(model_class, config_class):
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**TOWERS))
    vision = model.vision_model
    names = list(get_peft_model(model, MiMiConfig(target_compression=16.0)).base_model.adapter_widths())
    assert len(names) == LAYERS  # the MLP output of every block of the vision encoder
    in_vision_encoder = {f"vision_model.encoder.{name}" for name, _ in vision.encoder.named_modules()}
    assert set(names) <= in_vision_encoder


class TimmLikeViT(nn.Module):
    """timm's block layout (`blocks.N.attn.qkv/proj`, `blocks.N.mlp.fc1/fc2`), a model without a model type."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "attn": nn.ModuleDict({"qkv": nn.Linear(HIDDEN, 3 * HIDDEN), "proj": nn.Linear(HIDDEN, HIDDEN)}),
            "mlp": nn.ModuleDict({"fc1": nn.Linear(HIDDEN, 2 * HIDDEN), "fc2": nn.Linear(2 * HIDDEN, HIDDEN)}),
        }) for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, 3)


def test_a_model_without_defaults_is_warned_about_by_its_layout():
    model, warned = adapt(TimmLikeViT(), MiMiConfig(target_modules=["mlp.fc2", "head"]))
    assert not warned and len(model.base_model.adapter_widths()) == LAYERS + 1  # the default design: MLP outputs
    _, warned = adapt(TimmLikeViT(), MiMiConfig(target_modules=["attn.proj"]))
    assert len(warned) == 1 and f"blocks.*.mlp.fc2 ({LAYERS} modules)" in warned[0] and "'adapter_plus'" in warned[0]
    _, warned = adapt(TimmLikeViT(), MiMiConfig(design="paper", target_modules=["mlp.fc2", "head"]))
    assert len(warned) == 1 and f"blocks.*.attn.proj ({LAYERS} modules)" in warned[0]
    model, warned = adapt(TimmLikeViT(), MiMiConfig(design="paper", target_modules=["attn.proj", "mlp.fc2"]))
    assert not warned
    assert len(model.base_model.adapter_widths()) == 2 * LAYERS
