"""The Adapter+ configuration of "Adapters Strike Back" (Steitz & Roth, CVPR 2024): the strongest "train it small"
baseline the structured suite compares MiMi with. Written here from the paper's description, for benchmarks only:

- one adapter per block, on the MLP's output ("Post-Adapter": the sub-layer's output before the block's residual
  add, where MiMi's MLP adapter also sits; no adapter on the attention output);
- ``A(y) = y + drop_path(s ⊙ (W_up · GELU(W_down · y + b_down) + b_up))`` with a learned channel-wise scaling
  ``s`` (initialised to ones) and biases, no layer norm;
- Houlsby initialisation: W_down and W_up from a normal of std 0.01 truncated at ±2 std, biases zero;
- stochastic depth 0.1 on the adapter branch in training.

At a budget σt the width is the one whose parameter count is closest to ``B(σt)`` (MiMi's budget for uniform
adapters of width ``d/σt`` on two sub-layers per block): with one adapter per block, about twice that width.
"""

from __future__ import annotations

import torch
from torch import nn

DROP_PATH = 0.1
INIT_STD = 0.01


class AdapterPlus(nn.Module):
    """``y -> y + drop_path(s ⊙ up(GELU(down(y))))`` on the last dimension (``d``); ``width`` hidden neurons."""

    def __init__(self, d: int, width: int, drop_path: float = DROP_PATH):
        super().__init__()
        self.down = nn.Linear(d, width)
        self.up = nn.Linear(width, d)
        self.scale = nn.Parameter(torch.ones(d))
        self.drop_path = drop_path
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        delta = self.scale * self.up(nn.functional.gelu(self.down(y)))
        if self.training and self.drop_path > 0:  # per sample, as timm's DropPath
            keep = torch.rand(y.shape[0], *(1,) * (y.dim() - 1), device=y.device) >= self.drop_path
            delta = delta * keep.to(delta.dtype) / (1 - self.drop_path)
        return y + delta


class PostAdapted(nn.Module):
    """A Linear followed by its Adapter+ (the MLP's output projection, wrapped in place)."""

    def __init__(self, linear: nn.Linear, width: int):
        super().__init__()
        self.linear = linear
        self.adapter = AdapterPlus(linear.out_features, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(x))


def params_per_adapter(d: int, width: int) -> int:
    return 2 * d * width + width + d + d  # W_down, W_up, both biases, the scaling


def width_for_budget(dims: list[int], budget: int) -> int:
    """The uniform width whose total over adapters of sizes ``dims`` is closest to ``budget`` (at least 1)."""
    best = min(range(1, max(dims) + 1), key=lambda w: abs(sum(params_per_adapter(d, w) for d in dims) - budget))
    return best


def mlp_outputs(model: nn.Module) -> list[str]:
    """The MLP output projections of a ViT-family classifier (``...mlp.fc2`` in transformers 5, ``...output.dense``
    in 4.x ViT / DeiT)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and (n.endswith("mlp.fc2") or (n.endswith("output.dense") and ".attention." not in n))]
    if not names:
        raise ValueError(f"no MLP output projection found in {type(model).__name__}")
    return names


def add_adapter_plus(model: nn.Module, budget: int, seed: int) -> nn.Module:
    """Freeze ``model`` but its classifier and wrap every MLP output projection with an Adapter+ whose uniform width
    fits ``budget`` parameters; returns ``model`` (changed in place)."""
    names = mlp_outputs(model)
    width = width_for_budget([model.get_submodule(n).out_features for n in names], budget)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, PostAdapted(getattr(parent, child), width))
    for name, p in model.named_parameters():
        p.requires_grad_(".adapter." in name or name.startswith("classifier"))
    return model
