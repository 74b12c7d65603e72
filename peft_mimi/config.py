"""`MiMiConfig`: the configuration of a MiMi adapter (docs/method.md, sections 2, 4 and 6)."""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig

from ._peft_type import PeftType
from .pruning import SCORES, SELECTIONS

DEFAULT_TARGET_COMPRESSION = 32.0  # the budget of MiMiConfig(): what uniform adapters of width d/32 hold
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "identity")
INITS = ("houlsby",)  # init_weights besides True (W_up zero) and False (random)
# The adapter designs and what each sets for the adapter settings a config leaves unset (None). "adapter_plus" (the
# default): Adapter+'s adapter (Steitz & Roth, CVPR 2024) on the MLP output of every block; "paper": MiMi's paper,
# plain adapters on the attention and the MLP outputs. benchmarks/REPORT.md, "The structured suite", has the
# measurements that made "adapter_plus" the default.
DESIGNS: dict[str, dict[str, Any]] = {
    "adapter_plus": dict(adapter_bias=True, channel_scaling=True, init_weights="houlsby", drop_path=0.1),
    "paper": dict(adapter_bias=False, channel_scaling=False, init_weights=True, drop_path=0.0),
}
DEFAULT_DESIGN = "adapter_plus"

# Default target modules per transformers model type for the "paper" design: the attention output projection and
# the second MLP Linear of every block, as names that PEFT matches against the end of a module's name. transformers
# 5 names first, then the 4.x names where they differ (`output.dense` covers both `attention.output.dense` and the
# MLP's `output.dense`; `intermediate.dense` is not matched). A DINOv2 with SwiGLU MLPs (`use_swiglu_ffn=True`)
# ends its MLP in `mlp.down_proj` (5.x) or `mlp.weights_out` (4.x). The "adapter_plus" design targets the MLP
# outputs among them: all but `ATTENTION_OUTPUTS`, with `output.dense` only where it is not `attention.output.dense`.
_VIT_TARGETS = ("attention.o_proj", "mlp.fc2", "output.dense")
_CLIP_TARGETS = ("self_attn.out_proj", "mlp.fc2")
ATTENTION_OUTPUTS = ("attention.o_proj", "self_attn.out_proj")
TARGET_MODULES_BY_MODEL_TYPE: dict[str, list[str]] = {
    "vit": list(_VIT_TARGETS),
    "deit": list(_VIT_TARGETS),
    "dinov2": [*_VIT_TARGETS, "mlp.down_proj", "mlp.weights_out"],
    "swin": list(_VIT_TARGETS),
    "beit": list(_VIT_TARGETS),
    "data2vec-vision": list(_VIT_TARGETS),
    "vit_mae": list(_VIT_TARGETS),
    "vit_msn": list(_VIT_TARGETS),
    "dinov3_vit": ["attention.o_proj", "mlp.down_proj"],
    "clip_vision_model": list(_CLIP_TARGETS),
    "clip": list(_CLIP_TARGETS),
    "siglip_vision_model": list(_CLIP_TARGETS),
    "siglip": list(_CLIP_TARGETS),
}
# Model types whose default targets count only inside one submodule: the encoder of the vision tower, so that
# CLIPModel's and SiglipModel's text towers and SigLIP's attention-pooling head (no transformer block, and unused
# by SiglipForImageClassification) get no adapters.
TARGET_SCOPE_BY_MODEL_TYPE: dict[str, str] = {
    "clip": "vision_model.encoder",
    "siglip_vision_model": "encoder",
    "siglip": "vision_model.encoder",
}


def default_target_modules(model_type: Optional[str], design: str = DEFAULT_DESIGN) -> Union[set[str], str, None]:
    """PEFT's ``target_modules`` for a transformers ``model_type`` and a design of `DESIGNS` (None: no defaults).
    ``"paper"``: the set of names of `TARGET_MODULES_BY_MODEL_TYPE`, or, for a model type scoped by
    `TARGET_SCOPE_BY_MODEL_TYPE`, a regex that matches those names only below that submodule. ``"adapter_plus"``:
    a regex matching the MLP outputs among them (in that scope)."""
    names = TARGET_MODULES_BY_MODEL_TYPE.get(model_type)
    if names is None:
        return None
    scope = TARGET_SCOPE_BY_MODEL_TYPE.get(model_type)
    if design == "paper":
        if scope is None:
            return set(names)
        patterns = [re.escape(name) for name in names]
    else:  # the MLP outputs; ViT 4.x's MLP output `output.dense` is its attention's `attention.output.dense` too
        patterns = [r"(?<!attention\.)output\.dense" if name == "output.dense" else re.escape(name)
                    for name in names if name not in ATTENTION_OUTPUTS]
    prefix = rf"(?:.*\.)?{re.escape(scope)}\.(?:.*\.)?" if scope else r"(?:.*\.)?"
    return rf"{prefix}(?:{'|'.join(patterns)})"


# Settings that earlier versions saved in adapter_config.json and that no longer exist. Loading such a file keeps
# working when the setting was off (it changed nothing); an adapter made with it is refused, because loading it as
# if made without would misstate how it was made and change what further pruning does.
_REMOVED_SCORES = ("relative", "taylor", "contribution")


@dataclass
class MiMiConfig(PeftConfig):
    """
    Configuration of a MiMi adapter ([`MiMiModel`]): bottleneck adapters ``y + s ⊙ W_up·act(W_down·y)`` on the
    outputs of a ViT's blocks, trained large and pruned neuron by neuron, globally across layers, down to a parameter
    budget (docs/method.md). ``design`` chooses the adapter: Adapter+'s on the MLP outputs (the default) or the
    paper's on the attention and MLP outputs (``design="paper"``).

    Give at most one budget, ``target_compression`` or ``target_params``; without either, σt = 32
    (``MiMiConfig()`` works, as every PEFT config does; :attr:`effective_target_compression` says which σt applies).

    Args:
        design (`str`):
            ``"adapter_plus"`` (the default): Adapter+'s adapter (Steitz & Roth, CVPR 2024) on the MLP output of
            every block: biases, learned channel scaling, Houlsby start, stochastic depth 0.1. ``"paper"``: MiMi's
            paper, adapters without biases or scaling, ``W_up`` starting at zero, on the attention and the MLP
            outputs. The design sets ``adapter_bias``, ``channel_scaling``, ``init_weights``, ``drop_path`` and the
            default ``target_modules`` where they are not given. On the structured suite (σt = 64's budget,
            DINOv2-S, three seeds) MiMi with ``"adapter_plus"`` scored 1.6 points above ``"paper"`` at the same
            parameters; on small backbones it can score lower (benchmarks/REPORT.md).
        init_compression (`float`):
            σ0: every adapter starts with width ``max(1, floor(d / σ0))``, ``d`` the feature size of the layer it
            adapts. Defaults to 4 (the paper's).
        target_compression (`Optional[float]`):
            σt: prune until the adapters hold no more parameters than uniform adapters of width ``floor(d / σt)``
            on the same modules would (a design that adapts half the modules has half the budget at equal σt).
            Stays None when not given (the default σt = 32 then applies, without being written here).
        target_params (`Optional[int]`):
            An absolute budget instead: prune until the adapters hold at most this many parameters.
        prune_ratio (`float`):
            ρ: the fraction of the surviving neurons each pruning round removes (the last round removes exactly what
            is left to reach the budget). Defaults to 0.5.
        selection (`str`):
            ``"global"`` ranks the neurons of all adapters together (MiMi); ``"local"`` removes the same fraction
            from every adapter (the paper's ablation).
        score (`str`):
            The neuron importance score: ``"mimi"`` (the paper's eq. 3, the default) or one of the paper's
            ablations, ``"l1"`` (eq. 3 without the normalisation), ``"down_l1"`` (``W_down`` rows only),
            ``"gradient"`` (L1 norm of the accumulated gradients) and ``"random"``.
        budget_tolerance (`Optional[float]`):
            Budget search, in accuracy points: prune on down to the budget (then a floor), every round trained
            alike (``TrainingRecipe.epochs_per_round``), measure validation accuracy after each round, keep the
            smallest round within this many points of the best round, and finish it: its adapter trains again for
            the rest of the run (``TrainingRecipe.final_epochs``). None (the default): the adapter at the budget.
        init_weights (`Union[bool, str]`):
            True (PEFT's convention): ``W_up`` starts at zero, so the model starts equal to the base model (``W_down``
            keeps ``nn.Linear``'s Kaiming-uniform start); ``"houlsby"``: both matrices from a normal of std 0.01
            truncated at ±2 std (Houlsby et al. 2019, Adapter+), so the model starts next to the base model;
            False: random (tests). Default: the design's (``"houlsby"``; ``"paper"``: True).
        activation (`str`):
            The adapter's non-linearity: ``"gelu"`` (default), ``"relu"``, ``"silu"``, ``"tanh"`` or
            ``"identity"``.
        adapter_bias (`bool`):
            Give ``W_down`` and ``W_up`` biases; both count in the budget while their adapter has a neuron.
            Default: the design's (True; ``"paper"``: False).
        channel_scaling (`bool`):
            Multiply each adapter's output by a learned vector ``s`` of size ``d`` (ones at the start; Adapter+,
            Steitz & Roth 2024): ``A(y) = y + s ⊙ W_up·act(W_down·y)``. ``s`` counts in the budget while its
            adapter has a neuron and is folded into ``W_up`` for inference. Default: the design's (True;
            ``"paper"``: False).
        drop_path (`float`):
            Stochastic depth on the adapter's branch in training: with this probability an image's adapter output
            is dropped (the rest scaled by ``1/(1-p)``); inference is unchanged. Default: the design's (0.1;
            ``"paper"``: 0.0).
        target_modules (`Optional[Union[List[str], str]]`):
            The Linear modules to adapt: a list of names (exact or suffix match) or a regex. When not given, the
            design's defaults for the model type are used (the second MLP Linear of every block; ``"paper"``: and
            the attention output projection; see `default_target_modules`).
        exclude_modules (`Optional[Union[List[str], str]]`):
            Modules not to adapt: a list of names (exact or suffix match) or a regex.
        modules_to_save (`Optional[List[str]]`):
            Modules trained and saved in full besides the adapters, e.g. ``["classifier"]`` for a new task's head.
        adapter_widths (`Optional[Dict[str, int]]`):
            Recorded by MiMi as it prunes and saved with the adapter: ``{module name: width}``, 0 = removed. Given
            for a new adapter, these are its starting widths.
        rounds_done (`int`):
            Recorded by MiMi: the pruning rounds already applied.
        seed (`int`):
            Seed of the ``"random"`` score, so that every process ranks the same way.
    """

    design: str = field(
        default=DEFAULT_DESIGN,
        metadata={"help": f"The adapter, one of {tuple(DESIGNS)}: 'adapter_plus' is Adapter+'s on the MLP outputs "
                          "(biases, channel scaling, Houlsby start, stochastic depth 0.1); 'paper' is MiMi's paper's "
                          "plain adapters on the attention and MLP outputs. Sets the adapter options left unset."},
    )
    init_compression: float = field(
        default=4.0,
        metadata={"help": "σ0: every adapter starts with width max(1, floor(d / σ0)), d = the layer's size."},
    )
    target_compression: Optional[float] = field(
        default=None,
        metadata={"help": "σt: prune until the adapters hold no more than uniform adapters of width d/σt "
                          f"(default {DEFAULT_TARGET_COMPRESSION:g} when target_params is not given either)."},
    )
    target_params: Optional[int] = field(
        default=None,
        metadata={"help": "Absolute budget: prune until the adapters hold at most this many parameters."},
    )
    prune_ratio: float = field(
        default=0.5, metadata={"help": "ρ: fraction of the surviving neurons removed by each pruning round."}
    )
    selection: str = field(
        default="global",
        metadata={"help": "'global': rank neurons across all adapters (MiMi); 'local': same fraction per adapter."},
    )
    score: str = field(
        default="mimi",
        metadata={"help": f"Neuron importance score, one of {SCORES} ('mimi' is the paper's eq. 3, the others its "
                          "ablations)."},
    )
    budget_tolerance: Optional[float] = field(
        default=None,
        metadata={
            "help": "Budget search, in accuracy points: after each round (every round trained alike), measure "
            "accuracy on a validation split carved from the training images, prune on down to the budget "
            "(target_compression / target_params: the floor), keep the smallest round whose accuracy is within this "
            "many points of the best round (1.0: the smallest adapter that loses at most 1 point), then train it "
            "for the rest of the run. None: the adapter at the budget."
        },
    )
    init_weights: Union[bool, str, None] = field(
        default=None,
        metadata={"help": "True: W_up starts at zero so the model starts equal to the base model; 'houlsby': both "
                          "matrices from a normal of std 0.01 truncated at 2 std (Adapter+); False: random. "
                          "Default: the design's ('houlsby'; paper: True)."},
    )
    activation: str = field(default="gelu", metadata={"help": f"Adapter non-linearity, one of {ACTIVATIONS}."})
    adapter_bias: Optional[bool] = field(
        default=None, metadata={"help": "Give W_down and W_up biases. Default: the design's (True; paper: False)."}
    )
    channel_scaling: Optional[bool] = field(
        default=None,
        metadata={"help": "Scale each adapter's output by a learned vector of size d (Adapter+; counted in the "
                          "budget, folded into W_up for inference). Default: the design's (True; paper: False)."},
    )
    drop_path: Optional[float] = field(
        default=None, metadata={"help": "Stochastic depth on the adapter branch in training: drop probability. "
                                        "Default: the design's (0.1; paper: 0.0)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Linear modules to adapt: a list of names (exact or suffix match) or a regex. Default: the "
            f"design's, for the model types {sorted(TARGET_MODULES_BY_MODEL_TYPE)}."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules not to adapt: a list of names (exact or suffix match) or a regex."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained and saved in full besides the adapters, e.g. ['classifier']."},
    )
    adapter_widths: Optional[dict[str, int]] = field(
        default=None,
        metadata={
            "help": "Per-module adapter widths ({module name: width}, 0 = removed). Recorded by MiMi as it prunes "
            "and saved with the adapter; when given for a new adapter, those widths are the starting widths."
        },
    )
    rounds_done: int = field(default=0, metadata={"help": "Pruning rounds already applied (recorded by MiMi)."})
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' score, so that ranks agree."})

    @property
    def effective_target_compression(self) -> Optional[float]:
        """The σt the budget is computed from: ``target_compression``, or the default 32 when neither budget is
        given; None when the budget is ``target_params``."""
        if self.target_params is not None:
            return self.target_compression
        return DEFAULT_TARGET_COMPRESSION if self.target_compression is None else self.target_compression

    @property
    def param_terms(self) -> dict[str, bool]:
        """What an adapter's parameter count depends on besides ``d`` and its width, as the keyword arguments of
        `peft_mimi.pruning` (``adapter_params``, ``total_params``, ``select_neurons``, ...)."""
        return {"bias": self.adapter_bias, "scale": self.channel_scaling}

    def layer_options(self) -> dict[str, Any]:
        """The keyword arguments of `MiMiLayer.update_layer` that this config sets (all but the width)."""
        return dict(init_weights=self.init_weights, activation=self.activation, bias=self.adapter_bias,
                    score=self.score, scale=self.channel_scaling, drop_path=self.drop_path)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loader, with a message naming the file when ``adapter_config.json`` cannot be a MiMi config. Where
        it was read from is remembered (``_source_directory``, not saved) so that ``MiMiModel`` checks the weights
        file of a local adapter before it builds anything (see `peft_mimi.files.check_adapter_weights`)."""
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, RecursionError) as err:  # e.g. a key named like a loader argument, absurd nesting
            raise ValueError(
                f"{os.path.join(directory, 'adapter_config.json')} cannot be read as a MiMi adapter config "
                f"({type(err).__name__}: {str(err)[:200]}). The file is damaged or was not written by peft_mimi: "
                "save the adapter again with save_pretrained."
            ) from None
        config._source_directory = directory  # a local directory, or a Hub id's path on the Hub
        return config

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """PEFT's hook between reading ``adapter_config.json`` and building the config: settings of earlier versions
        that no longer exist load when they were off, and are refused, saying what to do, when they were on. A file
        without ``design`` was saved before designs existed, when every adapter was the paper's: it loads as
        ``design="paper"``, the settings it lacks at the paper's values."""
        if "design" not in kwargs:
            kwargs = {**DESIGNS["paper"], **kwargs, "design": "paper"}
        if "reconstruct" in kwargs:
            if kwargs["reconstruct"] is not False:
                raise ValueError(
                    f"This adapter_config.json records reconstruct={short_repr(kwargs['reconstruct'])}: the adapter "
                    "was made with the least-squares refit of W_up at each cut, which peft_mimi no longer has. Its "
                    'weights do not need it: delete the "reconstruct" key from adapter_config.json to load them '
                    "(pruning it further would then remove neurons without the refit)."
                )
            kwargs = {key: value for key, value in kwargs.items() if key != "reconstruct"}
        if kwargs.get("score") in _REMOVED_SCORES:
            raise ValueError(
                f"This adapter_config.json records score={kwargs['score']!r}, a neuron score peft_mimi no longer has "
                f"(it now has {SCORES}). The adapter's weights do not depend on it: set \"score\" to \"mimi\" in "
                "adapter_config.json to load them (pruning it further would then use the paper's score)."
            )
        return kwargs

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_module_names(self)
        self.peft_type = PeftType.MIMI
        if self.design not in DESIGNS:
            raise ValueError(f"MiMiConfig.design={short_repr(self.design)} is not known; choose one of "
                             f"{tuple(DESIGNS)} ('adapter_plus', the default, or 'paper' for the paper's adapters).")
        for name, value in DESIGNS[self.design].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        def positive_number(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"MiMiConfig.{name} must be a number > 0, got {value!r}.")

        positive_number("init_compression", self.init_compression)
        if self.target_compression is not None and self.target_params is not None:
            raise ValueError(
                "MiMiConfig takes one budget: target_compression (e.g. 32.0) or target_params (e.g. 400_000), not "
                f"both; got target_compression={self.target_compression!r}, target_params={self.target_params!r}."
            )
        if self.target_compression is not None:
            positive_number("target_compression", self.target_compression)
        sigma = self.effective_target_compression
        if sigma is not None and sigma < self.init_compression:
            warnings.warn(
                f"target_compression={sigma} is below init_compression={self.init_compression}: the budget is at or "
                "above the initial size, so MiMi will not prune.",
                stacklevel=3,
            )
        if self.target_params is not None and (
            isinstance(self.target_params, bool) or not isinstance(self.target_params, int) or self.target_params < 0
        ):
            raise ValueError(f"MiMiConfig.target_params must be an int >= 0, got {self.target_params!r}.")
        if isinstance(self.prune_ratio, bool) or not isinstance(self.prune_ratio, (int, float)) or not (
            0.0 < self.prune_ratio < 1.0
        ):
            raise ValueError(f"MiMiConfig.prune_ratio must be in (0, 1), got {self.prune_ratio!r}.")
        for name, value, allowed in (
            ("selection", self.selection, SELECTIONS),
            ("score", self.score, SCORES),
            ("activation", self.activation, ACTIVATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"MiMiConfig.{name}={value!r} is not known; choose one of {allowed}.")
        for name in ("adapter_bias", "channel_scaling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MiMiConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.init_weights, bool) and self.init_weights not in INITS:
            raise ValueError(f"MiMiConfig.init_weights must be True, False or one of {INITS}, got "
                             f"{short_repr(self.init_weights)}.")
        if isinstance(self.drop_path, bool) or not isinstance(self.drop_path, (int, float)) or not (
            0.0 <= self.drop_path < 1.0
        ):
            raise ValueError(f"MiMiConfig.drop_path is a probability in [0, 1) (e.g. 0.1), got {self.drop_path!r}.")
        if self.budget_tolerance is not None and (
            isinstance(self.budget_tolerance, bool) or not isinstance(self.budget_tolerance, (int, float))
            or not 0 <= self.budget_tolerance < math.inf
        ):
            raise ValueError(
                f"MiMiConfig.budget_tolerance is in accuracy points and must be a number >= 0 (e.g. 1.0: lose at most "
                f"1 point), or None to prune to the budget; got {self.budget_tolerance!r}."
            )
        if isinstance(self.rounds_done, bool) or not isinstance(self.rounds_done, int) or self.rounds_done < 0:
            raise ValueError(f"MiMiConfig.rounds_done must be an int >= 0, got {self.rounds_done!r}.")
        if self.adapter_widths is not None:
            if not isinstance(self.adapter_widths, dict):
                raise ValueError(
                    "MiMiConfig.adapter_widths must be a dict {module name: width}, got "
                    f"{type(self.adapter_widths).__name__}."
                )
            for module, width in self.adapter_widths.items():
                if isinstance(width, bool) or not isinstance(width, int) or width < 0:
                    raise ValueError(
                        f"MiMiConfig.adapter_widths[{module!r}] must be an int >= 0 (0 = removed), got {width!r}."
                    )


def _check_module_names(config: Any) -> None:
    """Raise ``ValueError`` unless ``config.target_modules`` and ``config.exclude_modules`` are None, a regex that
    compiles or a list of names, and ``config.modules_to_save`` None or a list of names: what PEFT's matching
    accepts. Run by ``MiMiConfig.__post_init__`` before the lists become sets: a hand-edited
    ``adapter_config.json`` then gets this message instead of a ``TypeError`` or ``re.error`` from deep inside PEFT."""
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, str) and name != "modules_to_save":
            try:
                re.compile(value)
            except (re.error, RecursionError, OverflowError) as error:
                raise ValueError(f"MiMiConfig.{name}={short_repr(value)} is not a valid regex ({error}).") from None
            continue
        if not isinstance(value, (list, tuple, set)) or not all(isinstance(item, str) and item for item in value):
            kind = ("a list of module names, e.g. ['classifier']" if name == "modules_to_save" else
                    "a list of module names or a regex, e.g. ['attention.o_proj', 'mlp.fc2']")
            raise ValueError(f"MiMiConfig.{name} must be {kind}; got {short_repr(value)}.")
        if name == "modules_to_save":  # PEFT puts each name into a regex, unescaped
            for item in value:
                try:
                    re.compile(rf"(^|.*\.){item}($|\..*)")
                except (re.error, RecursionError, OverflowError) as error:
                    raise ValueError(
                        f"MiMiConfig.modules_to_save has {short_repr(item)}, not a valid module name ({error})."
                    ) from None


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters (a value nested too deep to print is named by its type)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deep to print"
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"
