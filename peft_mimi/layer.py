"""The MiMi adapter around one `nn.Linear`: ``A(y) = y + W_up · act(W_down · y)`` on the layer's output (with
``channel_scaling``, ``y + s ⊙ W_up · act(W_down · y)``; with ``drop_path``, the branch dropped per image in
training).

The layer knows how to apply, mask and shrink its own adapters, nothing about the rest of the model. Each named
adapter has a *physical* width (the rows of ``W_down``) and a bool mask over those neurons; the *live* width is
the number of unmasked neurons. Masking keeps tensor shapes fixed (so an optimizer built over them keeps
working, as in HF `Trainer`); shrinking (``keep_neurons``) rebuilds the Linear pair with only the kept neurons.
An adapter of width 0 has no tensors at all and costs nothing.

Mixed-task batches: ``forward(x, adapter_names=[...])`` (one adapter name per image, ``"__base__"`` for none, as
in PEFT's LoRA) adds to each image's rows the delta of that image's adapter only, whatever adapters are active.

Inference: ``fuse(adapter_names)`` runs the wrapped Linear and the adapters as one :class:`FusedMiMiLinear` (three
matrix products, the residual added in place, no Python in between), so that an adapter costs its arithmetic and
little else; a layer whose adapters were all removed becomes its plain Linear again. ``unfuse()`` undoes it; while
fused, training and pruning are refused, and adding, switching or deleting adapters undoes the fusion.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from .pruning import importance_scores

BASE_ADAPTER_NAME = "__base__"  # in adapter_names: this image goes through the base model, without adapters

MERGE_ERROR = (
    "MiMi adapters cannot be merged into the base weights: W_up · act(W_down · y) is non-linear in y. Keep the "
    "adapter as a separate module (it is tiny), or call `unload()` to get the base model back without it."
)


FUSED_ERROR = (
    "The MiMi adapters are fused for inference (fuse_for_inference()): call unfuse() before {verb}. Fusion caches "
    "the adapters' weights, which training, pruning or changing adapters would make stale."
)


def _activation(name: str) -> nn.Module:
    return nn.Identity() if name == "identity" else ACT2FN[name]


# compiled (AOTInductor, DINOv2-S on a 2-core CPU), adapters up to this width compute W_down·y as a product and a sum
# rather than a GEMM: as fast or faster up to width 32 (at width 96, 9 % slower at batch 32)
COMPILED_PRODUCT_SUM_MAX_WIDTH = 32
# and up to this width the whole adapter is products and sums fused into the code around it
# (FusedMiMiLinear._compiled_up): 1.03-1.04x the backbone at batch 1 with widths 11-22 (σt = 24), against 1.07-1.08x
# with the up-projection a GEMM; with widths 26-38 (σt = 12) level at batch 1 and slower at batch 32
COMPILED_FUSED_MAX_WIDTH = 24

HOULSBY_STD = 0.01  # init_weights="houlsby": the std of W_down's and W_up's truncated normal start


def _scaled(up_weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``up_weight`` (``(d, n)``) with row ``i`` multiplied by ``scale[i]`` (``(d, 1)``; None: unchanged)."""
    return up_weight if scale is None else up_weight * scale.to(up_weight.dtype)


# the same non-linearities as `_activation`, as torch functions: what the fused path and exported models call
FUSED_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "identity": None}


class FusedMiMiLinear(nn.Module):
    """A Linear and its MiMi adapter as one module, for inference: plain torch, nothing of PEFT or peft_mimi's tuner.

    ``y = W·x + b`` (``weight``: ``(d, k)``), then ``y += W_up·act(W_down·y + b_down) + b_up`` in place (``down_weight``
    ``(n, d)``, ``up_weight`` ``(d, n)``): three matrix products and the activation, no copy of the output and no
    Python beyond this forward (compiled, a narrow adapter is products and sums that Inductor fuses into the code
    around it: :meth:`_compiled_up`). Equal to the adapted layer up to float rounding. Several adapters active
    together are one wider adapter (their neurons side by side, ``b_up`` summed). ``weight`` and ``bias`` may be the
    wrapped Linear's own parameters (shared, not copied)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, down_weight: torch.Tensor,
        down_bias: torch.Tensor | None, up_weight: torch.Tensor, up_bias: torch.Tensor | None, activation: str,
    ) -> None:
        super().__init__()
        if activation not in FUSED_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(FUSED_ACTIVATIONS)}")
        self.out_features, self.in_features = weight.shape
        self.width = down_weight.shape[0]
        self.activation = activation
        for name, tensor in (("weight", weight), ("bias", bias), ("down_weight", down_weight),
                             ("down_bias", down_bias), ("up_weight", up_weight), ("up_bias", up_bias)):
            if tensor is not None and not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=False)
            setattr(self, name, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        if torch.compiler.is_compiling() and self.width <= COMPILED_PRODUCT_SUM_MAX_WIDTH:
            # compiled (torch.compile, torch.export, export_compiled): W_down·y as a product and a sum, one generated
            # loop over y where a GEMM call would cost more than its arithmetic (eager PyTorch would materialise the
            # product: not there)
            hidden = (y.unsqueeze(1) * self.down_weight).sum(-1)  # (rows, n)
            if self.down_bias is not None:
                hidden = hidden + self.down_bias
            hidden = self._activate(hidden)
            if self.width <= COMPILED_FUSED_MAX_WIDTH:
                return self._compiled_up(y, hidden).view(*x.shape[:-1], self.out_features)
            hidden = hidden.t()
        else:
            # the hidden activations transposed, (n, rows): BLAS runs W_down·yᵀ faster than the skinny (rows, n) one
            if self.down_bias is None:
                hidden = torch.mm(self.down_weight, y.t())
            else:
                hidden = torch.addmm(self.down_bias[:, None], self.down_weight, y.t())
            hidden = self._activate(hidden)
        if self.up_bias is not None:
            y = y + self.up_bias
        # y is this call's own tensor, and no backward needs it: accumulating into it saves a pass over the output
        y.addmm_(hidden.t(), self.up_weight.t())
        return y.view(*x.shape[:-1], self.out_features)

    def _activate(self, hidden: torch.Tensor) -> torch.Tensor:
        act = FUSED_ACTIVATIONS[self.activation]
        return hidden if act is None else act(hidden)

    def _compiled_up(self, y: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``y + W_up·hidden + b_up`` (``hidden``: ``(rows, n)``, activated) as compiled code runs it for a narrow
        adapter: a sum of ``width`` scaled rows of ``W_upᵀ`` added to ``y``, which Inductor generates inside the
        kernel that consumes the layer's output (in a ViT the residual add and the next LayerNorm), so that the
        adapter, with ``W_down·y`` as one loop, adds no call of its own (benchmarks/results/inference_*.md). Eager
        PyTorch would run each term as its own operation: there the GEMM of :meth:`forward` is faster."""
        # a view that changes nothing, but Inductor stores its input: the activation is computed once per hidden
        # value, not again inside the sum for each of the d outputs it feeds (GELU's erf made that 1.2x the backbone)
        hidden = hidden.as_strided(hidden.shape, hidden.stride())
        out = y if self.up_bias is None else y + self.up_bias
        up_rows = self.up_weight.t().contiguous()  # (n, d): a constant once the weights are frozen
        for neuron in range(self.width):
            out = out + hidden[:, neuron, None] * up_rows[neuron]
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, width={self.width}, "
                f"activation={self.activation}")


class MiMiLayer(BaseTunerLayer):
    """Mixin holding the adapters of one wrapped layer, keyed by adapter name."""

    adapter_layer_names = ("mimi_down", "mimi_up", "mimi_scale")
    other_param_names = ("mimi_width", "mimi_mask", "mimi_activation", "mimi_score", "mimi_drop_path")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.mimi_down = nn.ModuleDict({})
        self.mimi_up = nn.ModuleDict({})
        self.mimi_scale = nn.ParameterDict({})  # channel_scaling: s, one value per output feature
        self.mimi_mask = BufferDict({}, persistent=True)
        self.mimi_drop_path: dict[str, float] = {}
        self.mimi_width: dict[str, int] = {}
        self.mimi_activation: dict[str, nn.Module] = {}
        self.mimi_score: dict[str, str] = {}
        # per-neuron accumulated |gradient| for score="gradient"; not saved
        self._grad_l1: dict[str, torch.Tensor] = {}
        self._grad_hooks: dict[str, list] = {}
        # adapters with masked neurons, kept on the Python side so that forward needs no device sync
        self._masked: set[str] = set()
        self._activation_name: dict[str, str] = {}
        # fused for inference (see `fuse`): the adapters fused, and the FusedMiMiLinear computing them (None when
        # none has a live neuron here); kept out of _modules so that state_dict and parameters() do not see it
        self.fused_adapters: tuple[str, ...] = ()
        self.__dict__["_fused"] = None
        self._disable_adapters = False
        self.merged_adapters = []
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MiMi adapts nn.Linear layers only, got {type(base_layer).__name__}.")
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.kwargs = kwargs

    @property
    def feature_size(self) -> int:
        """``d``: the size of the wrapped layer's output, which the adapter reads and writes."""
        return self.out_features

    def update_layer(
        self, adapter_name: str, width: int, *, init_weights: bool | str, activation: str, bias: bool, score: str,
        scale: bool = False, drop_path: float = 0.0,
    ) -> None:
        """Create (or replace) adapter ``adapter_name`` with ``width`` neurons (0 = no adapter on this layer)."""
        self._unfuse_for("adding or replacing an adapter")
        if width < 0:
            raise ValueError(f"adapter width must be >= 0, got {width}")
        self.mimi_activation[adapter_name] = _activation(activation)
        self._activation_name[adapter_name] = activation
        self.mimi_score[adapter_name] = score
        self.mimi_width[adapter_name] = width
        self.mimi_drop_path[adapter_name] = drop_path
        for container in (self.mimi_down, self.mimi_up, self.mimi_scale):
            if adapter_name in container:
                del container[adapter_name]
        d = self.feature_size
        if width > 0:
            self.mimi_down[adapter_name] = nn.Linear(d, width, bias=bias)
            self.mimi_up[adapter_name] = nn.Linear(width, d, bias=bias)
            if scale:
                self.mimi_scale[adapter_name] = nn.Parameter(torch.ones(d))
            self._init_weights(adapter_name, init_weights)
        self.mimi_mask[adapter_name] = torch.ones(width, dtype=torch.bool)
        self._masked.discard(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._track_gradients(adapter_name)
        self.set_adapter(self.active_adapters)

    def _init_weights(self, adapter_name: str, init_weights: bool | str) -> None:
        down, up = self.mimi_down[adapter_name], self.mimi_up[adapter_name]
        if down.weight.is_meta:  # low_cpu_mem_usage: the real values are loaded later
            return
        if init_weights == "houlsby":  # both matrices small and random: N(0, 0.01²) truncated at ±2 std
            for linear in (down, up):
                nn.init.trunc_normal_(linear.weight, std=HOULSBY_STD, a=-2 * HOULSBY_STD, b=2 * HOULSBY_STD)
        elif init_weights:  # W_down keeps nn.Linear's default (Kaiming-uniform, bound 1/sqrt(d)), W_up starts at 0
            nn.init.zeros_(up.weight)
        if down.bias is not None:
            nn.init.zeros_(down.bias)
        if up.bias is not None:
            nn.init.zeros_(up.bias)

    # ----------------------------------------------------------------------------------------------- widths
    def physical_width(self, adapter_name: str) -> int:
        return self.mimi_width.get(adapter_name, 0)

    def live_width(self, adapter_name: str) -> int:
        """Neurons that are neither removed nor masked."""
        if self.physical_width(adapter_name) == 0:
            return 0
        return int(self.mimi_mask[adapter_name].sum())

    def live_neurons(self, adapter_name: str) -> torch.Tensor:
        """Indices of the live neurons, a LongTensor of shape (live_width,)."""
        if self.physical_width(adapter_name) == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(self.mimi_mask[adapter_name].cpu(), as_tuple=False).flatten()

    def scores(self, adapter_name: str, generator: torch.Generator | None = None,
               grad_l1: torch.Tensor | None = None) -> torch.Tensor:
        """Importance of the live neurons (in the order of :meth:`live_neurons`), float32 on the CPU. The
        ``"gradient"`` score uses ``grad_l1`` when given (per physical neuron, e.g. summed over processes), else this
        layer's own accumulated gradients. Reads only."""
        live = self.live_neurons(adapter_name)
        if len(live) == 0:
            return torch.zeros(0)
        down, up = self.mimi_down[adapter_name], self.mimi_up[adapter_name]
        all_scores = importance_scores(
            self.mimi_score[adapter_name],
            down.weight,
            up.weight,
            down.bias,
            grad_l1=self._grad_l1.get(adapter_name) if grad_l1 is None else grad_l1,
            generator=generator,
        )
        return all_scores.cpu()[live]

    # ----------------------------------------------------------------------------------------- masking
    def mask_neurons(self, adapter_name: str, keep_live: torch.Tensor) -> None:
        """Mask neurons: ``keep_live`` is a bool tensor over the *live* neurons (True = stays live).
        Shapes do not change, so an optimizer over these parameters keeps working."""
        self._check_not_fused("pruning")
        live = self.live_neurons(adapter_name)
        if keep_live.shape != live.shape:
            raise ValueError(f"keep mask has shape {tuple(keep_live.shape)}, expected {tuple(live.shape)}")
        if self.physical_width(adapter_name) == 0:  # a removed adapter has nothing to mask
            return
        mask = self.mimi_mask[adapter_name]
        mask[live[~keep_live.cpu()].to(mask.device)] = False
        self.refresh_mask_state(adapter_name)
        with torch.no_grad():  # masked neurons contribute nothing; zero them so they also look dead
            dead = ~mask
            self.mimi_down[adapter_name].weight[dead] = 0
            self.mimi_up[adapter_name].weight[:, dead] = 0
            if self.mimi_down[adapter_name].bias is not None:
                self.mimi_down[adapter_name].bias[dead] = 0

    def keep_neurons(self, adapter_name: str, keep_live: torch.Tensor | None = None) -> int:
        """Physically shrink the adapter to its live neurons, minus those with ``keep_live`` False (a bool
        tensor over the live neurons; None keeps all live ones). Returns the new width; at 0 the adapter's
        tensors are deleted. Parameters are replaced: rebuild any optimizer that held the old ones."""
        self._check_not_fused("pruning or compacting")
        live = self.live_neurons(adapter_name)
        if keep_live is not None:
            if keep_live.shape != live.shape:
                raise ValueError(f"keep mask has shape {tuple(keep_live.shape)}, expected {tuple(live.shape)}")
            live = live[keep_live.cpu()]
        width = len(live)
        if width == self.physical_width(adapter_name):
            return width
        self._untrack_gradients(adapter_name)
        old_down, old_up = self.mimi_down.pop(adapter_name), self.mimi_up.pop(adapter_name)
        if width == 0 and adapter_name in self.mimi_scale:  # a removed adapter keeps no tensor
            del self.mimi_scale[adapter_name]
        if width > 0:
            requires_grad = old_down.weight.requires_grad
            idx = live.to(old_down.weight.device)
            down = nn.Linear(self.feature_size, width, bias=old_down.bias is not None,
                             device=old_down.weight.device, dtype=old_down.weight.dtype)
            up = nn.Linear(width, self.feature_size, bias=old_up.bias is not None,
                           device=old_up.weight.device, dtype=old_up.weight.dtype)
            with torch.no_grad():
                down.weight.copy_(old_down.weight[idx])
                up.weight.copy_(old_up.weight[:, idx])
                if down.bias is not None:
                    down.bias.copy_(old_down.bias[idx])
                    up.bias.copy_(old_up.bias)
            down.requires_grad_(requires_grad)
            up.requires_grad_(requires_grad)
            self.mimi_down[adapter_name], self.mimi_up[adapter_name] = down, up
        old_mask = self.mimi_mask[adapter_name]
        self.mimi_mask[adapter_name] = torch.ones(width, dtype=torch.bool, device=old_mask.device)
        self.mimi_width[adapter_name] = width
        self._masked.discard(adapter_name)
        self._track_gradients(adapter_name)
        return width

    def refresh_mask_state(self, adapter_name: str) -> None:
        """Re-read whether the adapter has masked neurons (after masking or after loading a mask)."""
        if self.live_width(adapter_name) < self.physical_width(adapter_name):
            self._masked.add(adapter_name)
        else:
            self._masked.discard(adapter_name)

    def _track_gradients(self, adapter_name: str) -> None:
        if self.mimi_score.get(adapter_name) != "gradient" or adapter_name not in self.mimi_down:
            return
        down, up = self.mimi_down[adapter_name], self.mimi_up[adapter_name]

        def accumulate(per_neuron: torch.Tensor) -> None:
            total = self._grad_l1.get(adapter_name)
            self._grad_l1[adapter_name] = per_neuron.float() if total is None else total + per_neuron.float()

        self._grad_hooks[adapter_name] = [
            down.weight.register_hook(lambda g: accumulate(g.detach().abs().sum(dim=1))),
            up.weight.register_hook(lambda g: accumulate(g.detach().abs().sum(dim=0))),
        ]

    def _untrack_gradients(self, adapter_name: str) -> None:
        for handle in self._grad_hooks.pop(adapter_name, []):
            handle.remove()
        self._grad_l1.pop(adapter_name, None)

    def reset_gradient_scores(self, adapter_name: str) -> None:
        """Forget the accumulated gradients (called after each round: scores are per round)."""
        self._grad_l1.pop(adapter_name, None)

    _STATISTICS = ("_grad_l1",)

    def round_statistics(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The data-aware statistics gathered since the last round (the ``"gradient"`` score's sums), by name: what a
        checkpoint must keep so that a resumed round prunes as an uninterrupted one would."""
        return {name: getattr(self, name)[adapter_name] for name in self._STATISTICS
                if adapter_name in getattr(self, name)}

    def load_round_statistics(self, adapter_name: str, statistics: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`round_statistics` returned (unknown names are an error)."""
        for name, tensor in statistics.items():
            if name not in self._STATISTICS:
                raise ValueError(f"unknown round statistic {name!r}; expected one of {self._STATISTICS}")
            getattr(self, name)[adapter_name] = tensor

    def gradient_scores(self, adapter_name: str) -> torch.Tensor | None:
        """Per-neuron accumulated L1 norm of the weight gradients since the last round, or None."""
        return self._grad_l1.get(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._unfuse_for("deleting an adapter")
        self._untrack_gradients(adapter_name)
        self._masked.discard(adapter_name)
        self._activation_name.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = (adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names)
        if self.fused_adapters and names != self.fused_adapters:
            self._unfuse_for("switching adapters")
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    # ------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def fused_module(self, adapter_names: Sequence[str]) -> FusedMiMiLinear | None:
        """The inference form of this layer with ``adapter_names`` active: a new :class:`FusedMiMiLinear` sharing the
        wrapped Linear's weight and bias and holding a copy of the live neurons of those adapters (masked and
        removed ones left out) in the Linear's dtype; None when none of them has a live neuron here (the wrapped
        Linear alone is the inference form). Adapters active together must share one activation."""
        parts = [(name, self.live_neurons(name)) for name in adapter_names if self.live_width(name) > 0]
        if not parts:
            return None
        activations = {self._activation_name[name] for name, _ in parts}
        if len(activations) > 1:
            raise ValueError(f"Adapters {[name for name, _ in parts]} use different activations {sorted(activations)} "
                             "and cannot be fused together; fuse one adapter at a time.")
        base = self.get_base_layer()
        dtype = base.weight.dtype
        downs = [(self.mimi_down[name], live.to(base.weight.device)) for name, live in parts]
        ups = [self.mimi_up[name] for name, _ in parts]
        # the channel scaling, folded into W_up and b_up: s ⊙ (W_up·h + b_up) = (s ⊙ W_up)·h + s ⊙ b_up
        scales = [self.mimi_scale[name][:, None] if name in self.mimi_scale else None for name, _ in parts]
        # adapters with and without biases fuse together: a missing down bias is zeros, a missing up bias adds nothing
        with_bias = [up.bias is not None for up in ups]
        down_bias = up_bias = None
        if any(with_bias):
            down_bias = torch.cat([down.bias[live] if down.bias is not None else live.new_zeros(len(live), dtype=dtype)
                                   for down, live in downs]).to(dtype)
            up_bias = sum(_scaled(up.bias[:, None], s)[:, 0].to(dtype)
                          for up, s, has_bias in zip(ups, scales, with_bias) if has_bias)
        return FusedMiMiLinear(
            weight=base.weight,
            bias=base.bias,
            down_weight=torch.cat([down.weight[live] for down, live in downs]).to(dtype),
            down_bias=down_bias,
            up_weight=torch.cat([_scaled(up.weight[:, live], s) for up, s, (_, live) in zip(ups, scales, downs)],
                                dim=1).to(dtype),
            up_bias=up_bias,
            activation=activations.pop(),
        )

    def fuse(self, adapter_names: Sequence[str]) -> None:
        """Run ``adapter_names`` (their live neurons) as one :class:`FusedMiMiLinear` with the wrapped Linear, for
        inference; only the wrapped Linear where none has a live neuron here. Holds a copy of the adapters' live
        neurons (not of the Linear) until :meth:`unfuse`; calling it again refreshes the copy. An adapter this layer
        does not carry counts as removed here."""
        if not adapter_names:
            raise ValueError("fuse() needs at least one adapter name.")
        self.__dict__["_fused"] = self.fused_module(adapter_names)
        self.fused_adapters = tuple(adapter_names)

    def unfuse(self) -> None:
        """Drop the fused copy: forward runs the adapters' own modules again (training and pruning allowed)."""
        self.__dict__["_fused"] = None
        self.fused_adapters = ()

    def _check_not_fused(self, verb: str) -> None:
        if self.fused_adapters:
            raise RuntimeError(FUSED_ERROR.format(verb=verb))

    def _unfuse_for(self, verb: str) -> None:
        """Changing the adapters makes the fused copy stale: drop it (with a warning) rather than refuse, so that the
        change happens whole (PEFT updates its own records before reaching the layers)."""
        if self.fused_adapters:
            warnings.warn(f"{verb} undoes fuse_for_inference(); call it again for the fused inference path.",
                          stacklevel=3)
            self.unfuse()

    # ------------------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        warnings.warn("MiMi adapters are never merged; nothing to unmerge.", stacklevel=2)


def _refresh_masks_after_load(layer: MiMiLayer, incompatible_keys) -> None:
    for adapter_name in layer.mimi_width:
        if adapter_name in layer.mimi_mask and not layer.mimi_mask[adapter_name].is_meta:
            layer.refresh_mask_state(adapter_name)
    if layer.fused_adapters:  # new weights: fuse them again
        layer.fuse(layer.fused_adapters)


class Linear(nn.Module, MiMiLayer):
    """An `nn.Linear` with MiMi adapters on its output."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        width: int,
        *,
        init_weights: bool | str = True,
        activation: str = "gelu",
        bias: bool = False,
        score: str = "mimi",
        scale: bool = False,
        drop_path: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__()
        MiMiLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.register_load_state_dict_post_hook(_refresh_masks_after_load)
        self.update_layer(adapter_name, width, init_weights=init_weights, activation=activation, bias=bias,
                          score=score, scale=scale, drop_path=drop_path)

    def adapter_delta(self, adapter_name: str, y: torch.Tensor) -> torch.Tensor | None:
        """``W_up · act(W_down · y)`` for one adapter (times ``s`` with channel scaling, dropped per row with
        probability ``drop_path`` in training), or None when it has no neurons here."""
        if adapter_name not in self.mimi_down:
            return None
        down, up = self.mimi_down[adapter_name], self.mimi_up[adapter_name]
        hidden = self.mimi_activation[adapter_name](down(y.to(down.weight.dtype)))
        if adapter_name in self._masked:
            hidden = hidden * self.mimi_mask[adapter_name].to(hidden.dtype)
        delta = up(hidden)
        if adapter_name in self.mimi_scale:
            delta = delta * self.mimi_scale[adapter_name].to(delta.dtype)
        drop = self.mimi_drop_path.get(adapter_name, 0.0)
        if self.training and drop > 0:  # stochastic depth: drop the branch per row of the batch (per image)
            keep = torch.rand(delta.shape[0], *(1,) * (delta.dim() - 1), device=delta.device) >= drop
            delta = delta * (keep.to(delta.dtype) / (1 - drop))
        return delta

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        """The base layer's output plus the deltas of the active adapters, or, with ``adapter_names`` (one name
        per image of the batch), plus the delta of each image's own adapter (see :meth:`_mixed_batch_forward`).
        Fused (:meth:`fuse`): the fused module alone, unless adapters are disabled or ``adapter_names`` is given."""
        if self.fused_adapters and adapter_names is None and not self._disable_adapters:
            if self.training:
                raise RuntimeError(FUSED_ERROR.format(verb="training (model.train())"))
            fused = self._fused
            # forward() directly: the fused module is private to this layer, nothing hooks it
            return self.base_layer(x, *args, **kwargs) if fused is None else fused.forward(x)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(result, adapter_names)
        base = result
        for adapter_name in self.active_adapters:
            delta = self.adapter_delta(adapter_name, base)
            if delta is not None:
                result = result + delta.to(result.dtype)
        return result

    def _mixed_batch_forward(self, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """``result`` (the base output, first dim = rows) plus, on the rows of each image, the delta of that image's
        adapter. The rows of image ``i`` are ``i*k .. i*k+k-1`` with ``k = rows / len(adapter_names)``: the layout
        of any batch-major reshape, e.g. Swin's attention, which sees every window of an image as a row. Rows are
        gathered per adapter (one index_select and one index_add per adapter present in the batch); an image whose
        adapter is ``"__base__"``, has width 0 or does not reach this layer gets no delta and costs nothing."""
        rows, images = result.shape[0], len(adapter_names)
        if images == 0 or rows % images:
            raise ValueError(
                f"adapter_names has {images} names but {self.__class__.__name__} received {rows} rows: give one "
                "adapter name per image of the batch."
            )
        indices, deltas = [], []
        for adapter_name, index in _rows_by_adapter(tuple(adapter_names), rows // images, result.device):
            delta = self.adapter_delta(adapter_name, result.index_select(0, index))
            if delta is not None:
                indices.append(index)
                deltas.append(delta.to(result.dtype))
        if not deltas:
            return result
        # one scatter for all adapters: an index_add per adapter would copy the whole output each time
        return result.index_add(0, torch.cat(indices), torch.cat(deltas))

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._fused is not None:  # not a registered submodule: move and cast it along (.to(), .half(), ...)
            self._fused._apply(fn, recurse)
        return self

    def __repr__(self) -> str:
        return "mimi." + super().__repr__()


@lru_cache(maxsize=32)
def _rows_by_adapter(
    adapter_names: tuple[str, ...], rows_per_image: int, device: torch.device
) -> tuple[tuple[str, torch.Tensor], ...]:
    """``((adapter name, LongTensor of its rows), ...)`` for every adapter in ``adapter_names`` but ``"__base__"``.
    Cached: every MiMi layer of one forward pass asks for the same grouping."""
    images: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        if name != BASE_ADAPTER_NAME:
            images.setdefault(name, []).append(i)
    offsets = torch.arange(rows_per_image)
    return tuple(
        (name, (torch.tensor(idx)[:, None] * rows_per_image + offsets).flatten().to(device))
        for name, idx in images.items()
    )
