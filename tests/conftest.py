"""Tiny randomly initialised Hugging Face vision models, one per supported family."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

# one thread per test process: `make test` runs two pytest workers on two cores, and tiny ops are much slower
# when two processes each spin up several threads
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

IMAGE_SIZE = 32
FAMILIES = ("vit", "deit", "dinov2", "swin")


def make_model(family: str = "vit", num_labels: int = 3, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    """A tiny classifier of the given family (in eval mode), deterministic for a given seed."""
    return _make_model(family, num_labels, seed, hidden_size, layers).eval()


def _make_model(family, num_labels, seed, hidden_size, layers):
    torch.manual_seed(seed)
    common = dict(image_size=IMAGE_SIZE, num_labels=num_labels)
    if family == "swin":
        config = SwinConfig(patch_size=4, embed_dim=hidden_size // 2, depths=[1] * layers, num_heads=[1, 2][:layers],
                            window_size=4, **common)
        return SwinForImageClassification(config)
    vit_like = dict(patch_size=8, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                    intermediate_size=2 * hidden_size, **common)
    if family == "vit":
        return ViTForImageClassification(ViTConfig(**vit_like))
    if family == "deit":
        return DeiTForImageClassification(DeiTConfig(**vit_like))
    if family == "dinov2":
        return Dinov2ForImageClassification(Dinov2Config(**vit_like))
    raise ValueError(family)


def require_fashion_mnist() -> None:
    """Skip the calling test, naming the Debian package, when the Fashion-MNIST files are not on this machine (the
    README's `make test` installs only Python packages; `.ci/run` installs nothing more)."""
    from peft_mimi import data

    try:
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            data._find_idx(stem)
    except FileNotFoundError as missing:
        pytest.skip(f"optional data: {missing}")


def make_images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def backbone(tmp_path_factory) -> str:
    """A tiny randomly initialised ViT saved as a local checkpoint directory, with its image processor: what
    `load_backbone`, `train` and the CLI accept as a model path."""
    from transformers import ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny-vit")
    make_model("vit", num_labels=10).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)
