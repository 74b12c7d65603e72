"""`MiMiModel`: the PEFT tuner that wraps the target Linears and runs MiMi's model-wide verbs.

It walks the model (which modules get adapters, at which width; a warning when target_modules adapt only part of
the attention and MLP outputs of a block), gathers scores from every layer, asks `peft_mimi.pruning` which
neurons to remove, and tells each layer to mask or shrink itself. It also guards
saving and loading: a saved adapter holds only live neurons plus the recorded widths, and a file whose tensors
disagree with those widths is refused. A classification head in ``modules_to_save`` is loaded at the size it was
saved with, so that adapters for tasks with different numbers of classes can share one backbone; and
``peft_model(pixel_values, adapter_names=[...])`` runs a mixed-task batch (`MiMiModel._enable_peft_forward_hooks`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, NoMatchingPeftModuleError
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .config import ATTENTION_OUTPUTS, TARGET_MODULES_BY_MODEL_TYPE, MiMiConfig, default_target_modules
from .files import check_adapter_fits_model, check_adapter_weights
from .layer import BASE_ADAPTER_NAME, MERGE_ERROR, Linear, MiMiLayer
from .pruning import (
    budget_for_compression,
    initial_width,
    num_rounds,
    select_neurons,
    total_params,
)

_PEFT_PREFIX = "base_model.model."
# torch's wrappers (FSDP, activation checkpointing) add a level to module names that state_dict keys leave out
_TORCH_WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _state_dict_name(module_name: str) -> str:
    """A name from ``named_modules()`` as ``state_dict()`` spells it: without torch's wrapper levels."""
    return ".".join(part for part in module_name.split(".") if part not in _TORCH_WRAPPERS)


class MiMiModel(BaseTuner):
    """MiMi adapters on a pretrained model (see `MiMiConfig`), created by ``peft.get_peft_model``.

    Model-wide verbs, all taking an optional ``adapter_name`` (default: the active adapter):
    ``adapter_widths()``, ``budget()``, ``live_params()``, ``num_rounds()``, ``neuron_scores()``,
    ``prune_round()`` and ``compact()``.

    Mixed-task batches (inference only): ``peft_model(pixel_values, adapter_names=[...])``, one adapter name per
    image (``"__base__"``: the base model), sends every image through its own adapters and its own head in one
    forward pass, as PEFT's LoRA does. When the heads' numbers of classes differ, the logits have as many columns
    as the widest head and an image's columns beyond its own head's classes are ``-inf`` (argmax and softmax
    ignore them); ``peft_mimi.serving.classify_mixed`` returns each image's logits at its own head's size.
    """

    prefix: str = "mimi_"
    tuner_layer_cls = MiMiLayer
    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE

    # ------------------------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        directory = getattr(config, "_source_directory", None)  # set by MiMiConfig.from_pretrained
        # a saved adapter (PeftModel.from_pretrained, load_adapter): its weights file is checked, and its widths
        # against this model, before PEFT allocates anything at the recorded widths or reads a tensor
        weights = check_adapter_weights(directory) if directory is not None and os.path.isdir(directory) else None
        if weights is not None:
            check_adapter_fits_model(model, config, weights)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as error:  # PEFT's message names the patterns, not what the model has
            raise NoMatchingPeftModuleError(
                f"{error} This model's Linear layers end in: {_linear_name_suffixes(model)}; MiMi's usual targets "
                "are the second MLP Linear of every block (design='paper': and the attention output projection)."
            ) from None

    def _prepare_adapter_config(self, peft_config: MiMiConfig, model_config: dict) -> MiMiConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            target_modules = default_target_modules(model_type, peft_config.design)
            if target_modules is None:
                raise ValueError(
                    f"MiMi has no default target_modules for model type {model_type!r} (defaults exist for "
                    f"{sorted(TARGET_MODULES_BY_MODEL_TYPE)}). Name the Linear layers to adapt with "
                    f"MiMiConfig(target_modules=[...]); this model's Linear layers end in: "
                    f"{_linear_name_suffixes(self.model)}."
                )
            peft_config.target_modules = target_modules
        return peft_config

    def _create_and_replace(
        self, mimi_config: MiMiConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
        current_key: str, **optional_kwargs,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"Target module {current_key!r} ({type(base).__name__}) is not supported: MiMi adapts nn.Linear "
                f"layers only. Narrow target_modules to Linear layers (this model's end in: "
                f"{_linear_name_suffixes(self.model)})."
            )
        width = self._starting_width(mimi_config, current_key, base.out_features)
        layer_kwargs = mimi_config.layer_options()
        if isinstance(target, MiMiLayer):
            target.update_layer(adapter_name, width, **layer_kwargs)
        else:
            new_module = Linear(target, adapter_name, width, **layer_kwargs)
            new_module.train(target.training)  # an eval-mode model stays in eval mode (drop_path acts in training)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _starting_width(config: MiMiConfig, key: str, d: int) -> int:
        if config.adapter_widths is not None and key in config.adapter_widths:
            return config.adapter_widths[key]
        if config.inference_mode and config.adapter_widths:
            raise ValueError(
                f"The adapter's adapter_widths has no entry for module {key!r}, which its target_modules match: "
                "the adapter was saved for a different model. Load it onto the backbone it was trained on."
            )
        return initial_width(d, config.init_compression)

    def _post_injection_hook(self, model: nn.Module, config: MiMiConfig, adapter_name: str) -> None:
        layers = dict(self._layers(adapter_name))
        if config.adapter_widths:
            unknown = sorted(set(config.adapter_widths) - set(layers))
            if unknown:
                raise ValueError(
                    f"adapter_widths names {len(unknown)} module(s) that this model has no adapter for, e.g. "
                    f"{unknown[:3]}: the adapter was made for a different backbone (other depth or layout). "
                    f"This model's adapted modules are e.g. {sorted(layers)[:3]}."
                )
        self._record_widths(adapter_name)
        if not config.inference_mode:
            _warn_untargeted_block_outputs(model, adapter_name, set(layers), config.design)
        is_new = config.rounds_done == 0 and not config.inference_mode
        if is_new and config.target_params is not None and config.target_params >= self.live_params(adapter_name):
            warnings.warn(
                f"target_params={config.target_params} is at or above the adapters' initial size "
                f"({self.live_params(adapter_name)} parameters): MiMi will not prune.",
                stacklevel=2,
            )

    # ----------------------------------------------------------------------------- mixed-task batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Called by ``PeftModel.forward`` around the base model's forward. With ``adapter_names`` in ``kwargs``
        (one per image), registers for the duration of the call forward pre-hooks that pass those names to every
        MiMi layer and every ``modules_to_save`` wrapper, and pads narrower heads' logits with ``-inf`` to the
        widest head's number of classes. Raises ``ValueError`` for a wrong length, an unknown adapter name or a
        model in training mode."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        adapter_names = self._check_adapter_names(adapter_names, _batch_size(args, kwargs))
        hook = partial(_pass_adapter_names, adapter_names=adapter_names)
        handles = []
        try:
            for module in self.model.modules():
                if isinstance(module, MiMiLayer):
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                elif isinstance(module, ModulesToSaveWrapper):
                    handles.extend(_route_heads(module, adapter_names))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_adapter_names(self, adapter_names, batch_size: int | None) -> list[str]:
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode. A mixed-task batch is "
                             "for inference: call model.eval() first. To train several adapters, train each one on "
                             "its own batches with set_adapter().")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not all(
            isinstance(name, str) for name in adapter_names
        ):
            raise ValueError(f"adapter_names must be a list of adapter names, one per image; got {adapter_names!r}.")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER_NAME})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)} "
                f"(and {BASE_ADAPTER_NAME!r} for the base model without adapters)."
            )
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(  # PEFT's own wording first (its test suite matches it), then ours
                f"Length of `adapter_names` should be the same as the number of inputs, but got {len(adapter_names)} "
                f"and {batch_size}: adapter_names has {len(adapter_names)} names for a batch of {batch_size} images; "
                "give exactly one adapter name per image."
            )
        return list(adapter_names)

    def _check_merge_allowed(self):
        raise NotImplementedError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise NotImplementedError(MERGE_ERROR)
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    # ------------------------------------------------------------------------------------ inference
    def fuse_for_inference(self, adapter_names: Sequence[str] | None = None) -> None:
        """Run each adapted Linear and its adapters (default: the active ones) as one module for fast inference
        (`peft_mimi.layer.FusedMiMiLinear`: three matrix products, no Python in between), a layer whose adapters
        were removed as its plain Linear; outputs equal the unfused model's up to float rounding. Holds a copy of
        the adapters' live neurons. Training and pruning raise until :meth:`unfuse`; adding, switching or
        deleting adapters undoes the fusion (with a warning); mixed-task batches (``adapter_names=...`` in
        forward) and ``disable_adapter()`` still work, unfused."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for name in names:
            self._adapter(name)
        for _, layer in self._fusable_layers():
            layer.fuse(names)

    def unfuse(self) -> None:
        """Undo :meth:`fuse_for_inference`: the adapters run as separate modules again and can be trained."""
        for _, layer in self._fusable_layers():
            layer.unfuse()

    def _fusable_layers(self) -> Iterator[tuple[str, MiMiLayer]]:
        return ((name, m) for name, m in self.model.named_modules() if isinstance(m, MiMiLayer))

    # --------------------------------------------------------------------------------- inspection
    def _adapter(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            active = self.active_adapters
            if len(active) != 1:
                raise ValueError(f"Several adapters are active ({active}); pass adapter_name explicitly.")
            adapter_name = active[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}.")
        return adapter_name

    def _layers(self, adapter_name: str) -> Iterator[tuple[str, MiMiLayer]]:
        """(module name, layer) for every layer carrying ``adapter_name``, in model order."""
        for name, module in self.model.named_modules():
            if isinstance(module, MiMiLayer) and adapter_name in module.mimi_width:
                yield name, module

    def _record_widths(self, adapter_name: str) -> None:
        self.peft_config[adapter_name].adapter_widths = {
            name: layer.physical_width(adapter_name) for name, layer in self._layers(adapter_name)
        }

    def adapter_widths(self, adapter_name: str | None = None) -> dict[str, int]:
        """``{module name: live width}`` for every adapted module; 0 = the adapter was removed."""
        adapter_name = self._adapter(adapter_name)
        return {name: layer.live_width(adapter_name) for name, layer in self._layers(adapter_name)}

    def feature_sizes(self, adapter_name: str | None = None) -> dict[str, int]:
        """``{module name: d}``: the feature size each adapter reads and writes."""
        adapter_name = self._adapter(adapter_name)
        return {name: layer.feature_size for name, layer in self._layers(adapter_name)}

    def live_params(self, adapter_name: str | None = None) -> int:
        """Parameters held by the live neurons of the adapters (the head is not counted)."""
        adapter_name = self._adapter(adapter_name)
        dims, widths = self._dims_and_widths(adapter_name)
        return total_params(dims, widths, **self.peft_config[adapter_name].param_terms)

    def initial_params(self, adapter_name: str | None = None) -> int:
        """Parameters of the adapters at their starting widths ``floor(d / σ0)``: where the schedule starts."""
        adapter_name = self._adapter(adapter_name)
        config = self.peft_config[adapter_name]
        dims = list(self.feature_sizes(adapter_name).values())
        return budget_for_compression(dims, config.init_compression, **config.param_terms)

    def budget(self, adapter_name: str | None = None) -> int:
        """The parameter budget MiMi prunes down to (``B(σt)`` or ``target_params``)."""
        adapter_name = self._adapter(adapter_name)
        config = self.peft_config[adapter_name]
        if config.target_params is not None:
            return config.target_params
        dims = list(self.feature_sizes(adapter_name).values())
        return budget_for_compression(dims, config.effective_target_compression, **config.param_terms)

    def planned_rounds(self, adapter_name: str | None = None) -> int:
        """All rounds of the schedule, done or not: from the starting size ``floor(d/σ0)`` to the budget."""
        adapter_name = self._adapter(adapter_name)
        config = self.peft_config[adapter_name]
        # a new adapter that starts within the budget (e.g. given adapter_widths) needs no pruning; physical
        # widths, not live ones, so that masks loaded from a mid-schedule checkpoint do not change the plan
        budget = self.budget(adapter_name)
        if config.rounds_done == 0 and total_params(*self._dims_and_widths(adapter_name, live=False),
                                                    **config.param_terms) <= budget:
            return 0
        return max(num_rounds(self.initial_params(adapter_name), budget, config.prune_ratio), config.rounds_done)

    def num_rounds(self, adapter_name: str | None = None) -> int:
        """Pruning rounds still to run: the rounds planned from the starting size ``floor(d/σ0)`` down to the
        budget, minus those already done. The plan is fixed before training, so a round that finds the budget
        already met (global selection may remove large neurons first) removes nothing but still counts."""
        adapter_name = self._adapter(adapter_name)
        config = self.peft_config[adapter_name]
        within_budget = self.live_params(adapter_name) <= self.budget(adapter_name)
        remaining = self.planned_rounds(adapter_name) - config.rounds_done
        if remaining <= 0:
            return 0 if within_budget else 1
        return remaining

    def _dims_and_widths(self, adapter_name: str, live: bool = True) -> tuple[list[int], list[int]]:
        """Feature sizes and widths (live, or physical with ``live=False``) of the adapters, in model order."""
        layers = [layer for _, layer in self._layers(adapter_name)]
        width = MiMiLayer.live_width if live else MiMiLayer.physical_width
        return [layer.feature_size for layer in layers], [width(layer, adapter_name) for layer in layers]

    def neuron_scores(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """``{module name: importance of each live neuron}`` with the configured score (float32, CPU), from this
        process's own weights and gradients: no collective call and nothing mutated, so any process of a distributed
        run may call it alone. :meth:`prune_round` ranks with the gradients of every process summed instead."""
        return self._neuron_scores(self._adapter(adapter_name), across_processes=False)

    def _neuron_scores(self, adapter_name: str, *, across_processes: bool) -> dict[str, torch.Tensor]:
        """What :meth:`neuron_scores` returns; with ``across_processes`` and ``score="gradient"``, the accumulated
        gradients are first summed over the processes of a distributed run (a collective: every process must call
        it), so that the ranking sees every process's batches."""
        config = self.peft_config[adapter_name]
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + config.rounds_done)
        layers = list(self._layers(adapter_name))
        gradients = [layer.gradient_scores(adapter_name) for _, layer in layers]
        if across_processes and config.score == "gradient":
            gradients = _summed_over_processes(gradients)
        return {name: layer.scores(adapter_name, generator=generator, grad_l1=grad)
                for (name, layer), grad in zip(layers, gradients)}

    # -------------------------------------------------------------------------------------- pruning
    @torch.no_grad()
    def prune_round(self, adapter_name: str | None = None, *, compact: bool = True) -> dict[str, int]:
        """One round of MiMi (Algorithm 1): score every live neuron, remove the lowest fraction ``prune_ratio``
        (ranked across all adapters for ``selection="global"``); the last planned round removes exactly what is
        needed to land on the budget. An adapter that loses all its neurons is removed.

        ``compact=True`` shrinks the tensors (rebuild the optimizer afterwards); ``compact=False`` only masks
        the neurons, keeping shapes so that a running optimizer (HF Trainer) is unaffected; call
        :meth:`compact` at the end. In a distributed run every process must call it: the ``"gradient"`` score sums
        every process's gradients, and every process applies rank 0's decision. Returns the new live widths.
        """
        adapter_name = self._adapter(adapter_name)
        config = self.peft_config[adapter_name]
        remaining = self.num_rounds(adapter_name)
        if remaining == 0:
            warnings.warn("All planned rounds are done and the adapters are within the budget; prune_round() "
                          "removes nothing.", stacklevel=2)
            return self.adapter_widths(adapter_name)
        layers = list(self._layers(adapter_name))
        scores = self._neuron_scores(adapter_name, across_processes=True)
        keep = select_neurons(
            [scores[name] for name, _ in layers],
            [layer.feature_size for _, layer in layers],
            ratio=config.prune_ratio,
            budget=self.budget(adapter_name),
            selection=config.selection,
            final=remaining == 1,
            **config.param_terms,
        )
        keep = _same_on_every_process(keep)
        for (_, layer), keep_live in zip(layers, keep):
            if compact:
                layer.keep_neurons(adapter_name, keep_live)
            else:
                layer.mask_neurons(adapter_name, keep_live)
            layer.reset_gradient_scores(adapter_name)
        config.rounds_done += 1
        self._record_widths(adapter_name)
        return self.adapter_widths(adapter_name)

    @torch.no_grad()
    def compact(self, adapter_name: str | None = None) -> dict[str, int]:
        """Physically shrink every adapter to its live neurons (drops masked ones; width 0 removes the adapter).
        Parameters are replaced: rebuild any optimizer afterwards. Returns the widths."""
        adapter_name = self._adapter(adapter_name)
        for _, layer in self._layers(adapter_name):
            layer.keep_neurons(adapter_name)
        self._record_widths(adapter_name)
        return self.adapter_widths(adapter_name)

    # ------------------------------------------------------------------------------ save and load
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # a mask with every neuron live carries no information: leave it out so a compact file has no masks
        return {
            key: value
            for key, value in to_return.items()
            if not (".mimi_mask." in key and bool(value.all()))
        }

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _fit_heads_to_checkpoint(model, adapter_name, state_dict)
        own = model.state_dict(keep_vars=True)
        for name, layer in model.named_modules():
            if not isinstance(layer, MiMiLayer) or adapter_name not in layer.mimi_width:
                continue
            name = _state_dict_name(name)
            module = name.removeprefix(_PEFT_PREFIX)
            width = layer.physical_width(adapter_name)
            keys = {f"mimi_{part}.{tensor}": f"{name}.mimi_{part}.{adapter_name}.{tensor}"
                    for part in ("down", "up") for tensor in ("weight", "bias")}
            keys["mimi_scale"] = f"{name}.mimi_scale.{adapter_name}"
            present = [k for k in keys.values() if k in state_dict]
            if width == 0:
                if present:
                    raise ValueError(
                        f"Damaged adapter: module {module!r} has width 0 in adapter_config.json but the weights "
                        f"file holds {present[0]!r} with shape {tuple(state_dict[present[0]].shape)}."
                    )
                # the (empty) mask of a removed adapter is never saved; supply it so PEFT does not report it missing
                state_dict[f"{name}.mimi_mask.{adapter_name}"] = torch.ones(0, dtype=torch.bool)
                continue
            for part, key in keys.items():
                expected = own.get(key)
                if expected is None:
                    continue
                if key not in state_dict:
                    raise ValueError(
                        f"Damaged adapter: the weights file has no tensor for module {module!r} ({key}), but "
                        f"adapter_config.json records width {width} there."
                    )
                got = tuple(state_dict[key].shape)
                if got != tuple(expected.shape):
                    raise ValueError(
                        f"Adapter mismatch in module {module!r}: {part} has shape {got} in the weights file but "
                        f"{tuple(expected.shape)} in the model built from adapter_config.json (width {width}, "
                        f"feature size {layer.feature_size}). The file is damaged, or belongs to another backbone or "
                        "another config."
                    )
            mask_key = f"{name}.mimi_mask.{adapter_name}"
            if mask_key not in state_dict:
                state_dict[mask_key] = torch.ones(width, dtype=torch.bool)
            elif tuple(state_dict[mask_key].shape) != (width,):
                raise ValueError(
                    f"Damaged adapter: module {module!r} has a neuron mask of shape "
                    f"{tuple(state_dict[mask_key].shape)} for width {width}."
                )
        return state_dict


def _pass_adapter_names(module: nn.Module, args, kwargs, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _pad_logits(module: nn.Module, args, output: torch.Tensor, width: int) -> torch.Tensor:
    return nn.functional.pad(output, (0, width - output.shape[-1]), value=float("-inf"))


def _route_heads(wrapper: ModulesToSaveWrapper, adapter_names: list[str]) -> list:
    """Hooks that make a ``modules_to_save`` wrapper (e.g. the classifier) run each image through its adapter's
    copy (the original module for ``"__base__"`` and for adapters without a copy here), with Linear heads of fewer
    classes padded with ``-inf`` to the widest head, so that PEFT's mixed-batch forward can stack the rows."""
    names = [name if name in wrapper.modules_to_save else BASE_ADAPTER_NAME for name in adapter_names]
    handles = [wrapper.register_forward_pre_hook(partial(_pass_adapter_names, adapter_names=names), with_kwargs=True)]
    heads = [wrapper.original_module, *wrapper.modules_to_save.values()]
    if all(isinstance(head, nn.Linear) for head in heads):
        width = max(head.out_features for head in heads)
        for head in heads:
            if head.out_features < width:
                handles.append(head.register_forward_hook(partial(_pad_logits, width=width)))
    return handles


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The number of images of a forward call: the length of its first tensor argument (``pixel_values``)."""
    first = kwargs.get("pixel_values")
    if first is None:
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return None if first is None else len(first)


def _fit_heads_to_checkpoint(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Rebuild this adapter's copy of each Linear head in ``modules_to_save`` with the number of classes of the
    saved head (the copy starts as the base model's head, which may classify other classes). Mutates ``model``."""
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
            continue
        head = wrapper.modules_to_save[adapter_name]
        name = _state_dict_name(name)
        saved = state_dict.get(f"{name}.modules_to_save.{adapter_name}.weight")
        if type(head) is not nn.Linear or saved is None or tuple(saved.shape) == tuple(head.weight.shape):
            continue
        if saved.ndim != 2 or saved.shape[1] != head.in_features:
            raise ValueError(
                f"Head mismatch in {name.removeprefix(_PEFT_PREFIX)!r}: the saved head has weight shape "
                f"{tuple(saved.shape)} but this backbone's head takes {head.in_features} features. The adapter "
                "belongs to another backbone; load it onto the one it was trained on."
            )
        new_head = nn.Linear(head.in_features, saved.shape[0], bias=head.bias is not None,
                             device=head.weight.device, dtype=head.weight.dtype)
        new_head.requires_grad_(head.weight.requires_grad)
        wrapper.modules_to_save[adapter_name] = new_head


def _summed_over_processes(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """New tensors: each of ``tensors`` summed over the processes of a distributed run, in one collective (every
    process must call it, with the same shapes and the same Nones). The arguments are not modified; outside a
    distributed run they are returned as they are."""
    present = [t for t in tensors if t is not None]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or not present:
        return tensors
    flat = torch.cat([t.detach().float().flatten() for t in present])  # a new tensor: the reduction happens here
    torch.distributed.all_reduce(flat)
    summed, start = [], 0
    for t in tensors:
        if t is None:
            summed.append(None)
            continue
        summed.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return summed


def _same_on_every_process(keep: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make every process apply rank 0's pruning decision (identical widths on all ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or not keep:
        return keep
    flat = torch.cat([k.to(torch.uint8) for k in keep])
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    torch.distributed.broadcast(flat, src=0)
    out, start = [], 0
    for k in keep:
        out.append(flat[start : start + len(k)].bool().cpu())
        start += len(k)
    return out


def _linear_name_suffixes(model: nn.Module) -> list[str]:
    """The distinct last-two-component names of the model's Linear layers, e.g. ['attention.o_proj', ...]."""
    suffixes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            suffix = ".".join(p for p in name.split(".")[-2:] if not p.isdigit())
            if suffix not in suffixes:
                suffixes.append(suffix)
    return suffixes


# The Linears that end the attention or MLP sub-layer of a transformer block: every family's default targets, and
# timm's attention projection (timm's MLP ends in `mlp.fc2`, a default already)
_BLOCK_OUTPUT_SUFFIXES = tuple(sorted({
    f".{name}" for names in (*TARGET_MODULES_BY_MODEL_TYPE.values(), ["attn.proj"]) for name in names
}))
# and those of them that end an attention sub-layer
_ATTENTION_OUTPUT_SUFFIXES = tuple(f".{name}" for name in (*ATTENTION_OUTPUTS, "attention.output.dense", "attn.proj"))


def _block_of(name: str) -> str | None:
    """The transformer block a module belongs to: its name up to the last numeric index (``vit.encoder.layer.3``
    for ``vit.encoder.layer.3.mlp.fc2``), None outside numbered blocks (e.g. a pooling head)."""
    parts = name.split(".")
    indices = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: indices[-1] + 1]) if indices else None


def _is_block_output(name: str, design: str) -> bool:
    """Whether module ``name`` ends a sub-layer that ``design`` adapts: an attention or MLP output (see
    ``_BLOCK_OUTPUT_SUFFIXES``) for "paper", an MLP output for "adapter_plus"."""
    if not name.endswith(_BLOCK_OUTPUT_SUFFIXES):
        return False
    return design == "paper" or not name.endswith(_ATTENTION_OUTPUT_SUFFIXES)


def _untargeted_block_outputs(model: nn.Module, adapted: set[str], design: str) -> list[str]:
    """Names of the Linears that end a sub-layer ``design`` adapts inside a block where a module of ``adapted``
    (module names) sits, but that are not in ``adapted`` themselves."""
    blocks = {_block_of(name) for name in adapted} - {None}
    return [
        name for name, module in model.named_modules()
        if name not in adapted and _is_block_output(name, design) and _block_of(name) in blocks
        and isinstance(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module, nn.Linear)
    ]


def _warn_untargeted_block_outputs(model: nn.Module, adapter_name: str, adapted: set[str], design: str) -> None:
    """One warning, names summarised per block position, when ``adapted`` covers only part of the blocks' outputs
    that ``design`` adapts."""
    untargeted = _untargeted_block_outputs(model, adapted, design)
    if not untargeted:
        return
    patterns: dict[str, int] = {}
    for name in untargeted:
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        patterns[pattern] = patterns.get(pattern, 0) + 1
    summary = ", ".join(f"{pattern} ({count} modules)" for pattern, count in patterns.items())
    warnings.warn(
        f"MiMi adapter {adapter_name!r} adapts {len({_block_of(name) for name in untargeted})} transformer block(s) "
        f"only in part: these block outputs get no adapter: {summary}. MiMi's design {design!r} adapts "
        + ("the attention output and the MLP output" if design == "paper" else "the MLP output")
        + " of every block; add these names to target_modules (or leave target_modules unset to use the defaults "
        "of a supported model type).",
        stacklevel=2,
    )
