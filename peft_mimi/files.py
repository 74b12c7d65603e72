"""Adapter files on disk: an adapter is checked against its weights file before PEFT creates or reads any tensor,
and saves are atomic.

Adapters come from the Hub and from colleagues, so the loader must not trust them. :func:`check_adapter_weights`
(run by ``MiMiModel`` before it injects an adapter read by ``MiMiConfig.from_pretrained``, i.e. by every
``PeftModel.from_pretrained`` / ``load_adapter`` of a local MiMi adapter) reads only the header of
``adapter_model.safetensors`` and refuses, naming the file, a truncated or damaged file, tensors of unexpected
names, dtypes or shapes, and an ``adapter_config.json`` whose recorded widths disagree with the tensors: PEFT builds
every adapter at its recorded width *before* it reads the weights, so a recorded width of 10^9 would otherwise be
allocated first and refused afterwards. What it returns lets :func:`check_adapter_fits_model` check the same file
against the model it is loaded into, before injection.
:func:`save_adapter` and :func:`publish_directory` write a whole new directory before the old one is replaced.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import default_target_modules, short_repr

# dtypes a MiMi weight may be saved in (safetensors names); the neuron mask is BOOL
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
# the names PEFT saves a MiMi adapter's tensors under (the adapter name is stripped on save)
_MIMI_TENSOR = re.compile(
    r"base_model\.model\.(?P<module>[^.]+(?:\.[^.]+)*)\.(?P<part>mimi_(?:down|up)\.(?:weight|bias)|mimi_mask|mimi_scale)"
)
_PEFT_PREFIX = "base_model.model."
_MISMATCH_FIX = (
    "The config and the weights do not belong together (the config was edited, or the two files come from different "
    "saves); nothing was loaded. Save the adapter again (peft_mimi.save_adapter) or download both files again."
)
_WRITER_FIX = (
    "The file was not written by peft_mimi or was edited; nothing was loaded. Save the adapter again "
    "(peft_mimi.save_adapter) or download it again."
)


@dataclass(frozen=True)
class AdapterWeights:
    """What the header of an adapter's weights file says, read before any tensor is created."""

    path: Path
    adapters: dict[str, tuple[int, int]]  # {module name: (width, feature size d)} of the MiMi adapters in the file


def check_adapter_weights(directory: str | os.PathLike) -> AdapterWeights | None:
    """Check the adapter saved in ``directory`` before anything is allocated for it; raise ``ValueError`` naming the
    file, the module, the recorded width, the tensor's shape and the fix when it cannot be loaded safely:

    - ``adapter_model.safetensors`` is a complete safetensors file (not truncated, header intact, no trailing
      bytes); its MiMi tensors have the names PEFT saves, floating dtypes (a BOOL mask), and shapes that agree:
      ``mimi_down.weight`` ``(width, d)``, ``mimi_up.weight`` ``(d, width)``, biases ``(width,)`` / ``(d,)``, mask
      ``(width,)``, channel scaling ``(d,)``;
    - ``adapter_config.json`` records a width for every adapter, each equal to its tensors' (0: no tensors),
      biases exactly when ``adapter_bias`` and a scaling exactly when ``channel_scaling``: so the loader allocates
      nothing the weights file does not hold.

    Only the header is read (safetensors caps it at 100 MB), never a tensor. Returns what the header says, for
    :func:`check_adapter_fits_model`. A directory without any weights file only warns and returns None (a config may
    be read on its own); PEFT's loader, which then tries the directory name as a Hub repository id, fails after the
    warning."""
    path = Path(directory) / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        if not (Path(directory) / WEIGHTS_NAME).is_file():
            warnings.warn(
                f"{Path(directory)} holds adapter_config.json but no {SAFETENSORS_WEIGHTS_NAME}: loading the adapter "
                "from it will fail. The save was interrupted or the weights were not copied; save the adapter again "
                "(peft_mimi.save_adapter) or put the weights file next to its config.",
                stacklevel=3,
            )
        return None
    tensors = _mimi_tensors(path)
    weights = AdapterWeights(path, {module: _adapter_shape(path, module, parts) for module, parts in tensors.items()})
    config_path = Path(directory) / CONFIG_NAME
    if config_path.is_file():  # first: a recorded width that disagrees explains the other shapes' disagreement
        _check_recorded_widths(config_path, _read_config(config_path), weights, tensors)
    for module, parts in sorted(tensors.items()):
        _check_shapes_agree(path, module, parts, weights.adapters[module])
    return weights


def _mimi_tensors(path: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """``{module: {part: (dtype, shape)}}`` of the MiMi tensors in the header of ``path`` (``part``:
    ``mimi_down.weight``, ``mimi_up.bias``, ``mimi_mask``, ...). Refuses a damaged file or an unexpected name."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            header = {key: weights.get_slice(key) for key in weights.keys()}
            specs = {key: (part.get_dtype(), tuple(part.get_shape())) for key, part in header.items()}
    except SafetensorError as error:
        raise ValueError(
            f"{path} ({path.stat().st_size:,} bytes) is damaged and was not loaded: {error}. It was probably cut "
            "short by an interrupted save or copy. Save the adapter again (peft_mimi.save_adapter writes "
            "atomically) or download it again."
        ) from None
    tensors: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, spec in specs.items():
        if "mimi_" not in key:
            continue  # a head in modules_to_save: its shape is checked by PEFT against the model
        match = _MIMI_TENSOR.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{path} holds a tensor named {key!r} (shape {spec[1]}), which is not a MiMi adapter tensor: they are "
                f"named '{_PEFT_PREFIX}<module>.mimi_down.weight', '...mimi_up.weight', '...mimi_down.bias', "
                f"'...mimi_up.bias', '...mimi_scale' and '...mimi_mask'. {_WRITER_FIX}"
            )
        tensors.setdefault(match["module"], {})[match["part"]] = spec
    return tensors


def _adapter_shape(path: Path, module: str, parts: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[int, int]:
    """``(width, d)`` of the adapter of ``module``: the shape of its ``mimi_down.weight``. Refuses wrong dtypes, a
    missing matrix, or a ``mimi_down.weight`` that is not 2-D (see :func:`_check_shapes_agree` for the others)."""
    for part, (dtype, shape) in sorted(parts.items()):
        allowed = ("BOOL",) if part == "mimi_mask" else FLOAT_DTYPES
        if dtype not in allowed:
            raise ValueError(
                f"{path} holds {part} of module {module!r} (shape {shape}) as {dtype}; MiMi weights are floating point "
                f"({', '.join(FLOAT_DTYPES)}) and the neuron mask is BOOL. {_WRITER_FIX}"
            )
    if "mimi_down.weight" not in parts or "mimi_up.weight" not in parts:
        raise ValueError(
            f"{path} holds {sorted(parts)} for module {module!r} but not both mimi_down.weight and mimi_up.weight: "
            f"an adapter has both or neither. {_WRITER_FIX}"
        )
    down = parts["mimi_down.weight"][1]
    if len(down) != 2 or min(down) < 1:
        raise ValueError(
            f"{path} holds mimi_down.weight of module {module!r} with shape {down}; it must be (width, feature size), "
            f"both >= 1 (a removed adapter has no tensors). {_WRITER_FIX}"
        )
    return down[0], down[1]


def _check_shapes_agree(path: Path, module: str, parts: dict[str, tuple[str, tuple[int, ...]]],
                        shape: tuple[int, int]) -> None:
    """Refuse tensors of ``module`` whose shapes disagree with its ``mimi_down.weight`` of ``shape`` ``(width, d)``."""
    width, d = shape
    expected = {"mimi_down.weight": (width, d), "mimi_up.weight": (d, width), "mimi_down.bias": (width,),
                "mimi_up.bias": (d,), "mimi_scale": (d,), "mimi_mask": (width,)}
    for part, (_, got) in sorted(parts.items()):
        if got != expected[part]:
            raise ValueError(
                f"{path} holds {part} of module {module!r} with shape {got}, but its mimi_down.weight {shape} (width "
                f"{width}, feature size {d}) implies {expected[part]}. {_WRITER_FIX}"
            )


def _read_config(config_path: Path) -> Any:
    try:
        return json.loads(config_path.read_bytes())
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{config_path} is not valid JSON ({error}). {_WRITER_FIX}") from None


def _check_recorded_widths(config_path: Path, config: Any, weights: AdapterWeights,
                           tensors: dict[str, dict[str, tuple[str, tuple[int, ...]]]]) -> None:
    """Refuse a config whose ``adapter_widths``, ``adapter_bias`` or ``channel_scaling`` disagree with the weights
    file's tensors."""
    path, adapters = weights.path, weights.adapters
    widths = config.get("adapter_widths") if isinstance(config, dict) else None
    if not isinstance(widths, dict) or not widths:
        raise ValueError(
            f"{config_path} records no adapter_widths (got {short_repr(widths)}), which every saved MiMi adapter has: "
            f"without them the loader would build every adapter at its initial width instead of the {len(adapters)} "
            f"adapter(s) {path} holds. {_MISMATCH_FIX}"
        )
    for module, width in widths.items():
        held = adapters.get(module)
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            problem = (f"{config_path} records an invalid width {short_repr(width)} for module {module!r} (widths are "
                       "ints >= 0, 0 = removed)")
        elif width > 0 and held is None:
            problem = (f"{path} holds no tensor for module {module!r}, but {config_path} records width {width} for "
                       f"it: the loader would allocate {width} neurons that nothing fills")
        elif width == 0 and held is not None:
            problem = (f"{config_path} records width 0 (removed) for module {module!r}, but {path} holds "
                       f"mimi_down.weight of shape {held} for it")
        elif held is not None and held[0] != width:
            problem = (f"{config_path} records width {width} for module {module!r}, which does not fit {path}: "
                       f"mimi_down.weight has shape {held} in the weights file but {(width, held[1])} at the recorded "
                       "width")
        else:
            continue
        raise ValueError(f"{problem}. {_MISMATCH_FIX}")
    unrecorded = sorted(set(adapters) - set(widths))
    if unrecorded:
        raise ValueError(
            f"{path} holds an adapter for module {unrecorded[0]!r} (mimi_down.weight of shape "
            f"{adapters[unrecorded[0]]}) but {config_path} records no width for it in adapter_widths "
            f"({len(unrecorded)} such module(s)). {_MISMATCH_FIX}"
        )
    bias = config.get("adapter_bias")
    if isinstance(bias, bool):
        for module, parts in sorted(tensors.items()):
            held = sorted(part for part in parts if part.endswith(".bias"))
            if held != (["mimi_down.bias", "mimi_up.bias"] if bias else []):
                raise ValueError(
                    f"{config_path} has adapter_bias={bias} but {path} holds {held or 'no biases'} for module "
                    f"{module!r} (mimi_down.weight of shape {adapters[module]}). {_MISMATCH_FIX}"
                )
    scaling = config.get("channel_scaling", False)  # files of earlier versions have no key: no scaling
    if isinstance(scaling, bool):
        for module, parts in sorted(tensors.items()):
            if ("mimi_scale" in parts) != scaling:
                raise ValueError(
                    f"{config_path} has channel_scaling={scaling} but {path} holds "
                    f"{'a' if 'mimi_scale' in parts else 'no'} mimi_scale for module {module!r} (mimi_down.weight "
                    f"of shape {adapters[module]}). {_MISMATCH_FIX}"
                )


def check_adapter_fits_model(model: nn.Module, config: Any, weights: AdapterWeights) -> None:
    """Raise ``ValueError`` before any adapter tensor is created when the adapter ``config`` (a ``MiMiConfig`` whose
    weights file said ``weights``, see :func:`check_adapter_weights`) cannot be loaded into ``model`` (the model
    about to get it): every module its ``adapter_widths`` names must exist; one with a width > 0 must be an
    ``nn.Linear`` with as many output features as the file's tensors (the loader allocates ``width x out_features``
    per matrix); and every Linear its ``target_modules`` match must have a recorded width (else the loader would
    create an adapter of initial width there, which the file does not fill)."""
    widths = config.adapter_widths or {}
    modules = dict(model.named_modules())
    model_name = type(model).__name__
    for module, width in widths.items():
        layer = modules.get(module)
        if isinstance(layer, BaseTunerLayer):
            layer = layer.get_base_layer()
        if layer is None:
            raise ValueError(
                f"The adapter in {weights.path.parent} records width {width} for module {module!r}, which this "
                f"{model_name} does not have (its Linear layers are e.g. {_linear_names(modules)[:3]}): the adapter "
                "was made for a different backbone (other depth or layout). Load it onto the backbone it was trained "
                "on; nothing was loaded."
            )
        held = weights.adapters.get(module)
        if width == 0 or held is None:  # check_adapter_weights refused a width that the file does not hold
            continue
        file_width, d = held
        if not isinstance(layer, nn.Linear) or layer.out_features != d:
            in_model = f"({width}, {layer.out_features}) in the model" if isinstance(layer, nn.Linear) else \
                f"this {model_name}'s {module} is a {type(layer).__name__}, not a Linear"
            raise ValueError(
                f"Adapter mismatch in module {module!r}: mimi_down.weight has shape ({file_width}, {d}) in the weights "
                f"file but {in_model} (recorded width {width}). The adapter in {weights.path.parent} belongs to a "
                f"different backbone (hidden size {d}); load it onto the backbone it was trained on. Nothing was "
                "loaded."
            )
    if config.target_modules is None:  # what MiMiModel._prepare_adapter_config fills in
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        config = copy.copy(config)
        config.target_modules = default_target_modules(model_type) or set()
    wrapped = tuple(f"{name}." for name, module in modules.items() if isinstance(module, BaseTunerLayer))
    for name, module in modules.items():
        if (
            name and name not in widths and not name.startswith(wrapped)
            and isinstance(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module, nn.Linear)
            and check_target_module_exists(config, name)
        ):
            raise ValueError(
                f"The adapter in {weights.path.parent} targets module {name!r} (its target_modules match it) but "
                "records no width for it in adapter_widths, so the loader would create a new adapter there that "
                f"{weights.path.name} does not fill: the adapter was made for a different backbone, or its config was "
                f"edited. {_MISMATCH_FIX}"
            )


def _linear_names(modules: dict[str, nn.Module]) -> list[str]:
    return [name for name, module in modules.items() if isinstance(module, nn.Linear)]


def save_adapter(model: Any, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)``, atomically: the whole adapter is written into a staging
    sibling directory, which then replaces ``save_directory`` (:func:`publish_directory`). A crash or a failed write
    (disk full, no permission) leaves the previous adapter whole, never a new ``adapter_config.json`` beside old
    weights. Files in ``save_directory`` that the save does not produce are carried over. Returns
    ``save_directory``."""
    target = Path(save_directory)
    recover_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, **kwargs)
        if target.is_dir():
            _carry_over(target, staging)
        publish_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _carry_over(old: Path, new: Path) -> None:
    """Put into ``new`` every file of ``old`` that ``new`` lacks (a hard link where possible, else a copy)."""
    for path in sorted(old.rglob("*")):
        destination = new / path.relative_to(old)
        if not path.is_file() or destination.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


# How a directory is replaced. POSIX renames a directory atomically but cannot rename one onto a non-empty
# directory; Linux can swap two in one step (renameat2 with RENAME_EXCHANGE, called through libc since Python's
# standard library lacks it), and then the target always holds the complete old or the complete new directory.
# Elsewhere (another system, a filesystem that refuses the swap) the old directory is renamed aside (`_aside`), the
# complete new one renamed in, and the aside copy deleted: the target is absent only between the two renames, while
# the complete old one sits under the aside name, and the next `publish_directory` or `save_adapter` (or
# `recover_directory`) on that target puts it back or, once the new one is in, deletes it. (A symlink swapped
# instead would turn the user's directory into a link, which copies and Hub uploads treat differently.)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing directories in one atomic step (Linux); False where this system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl < 1.2.?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))

def _aside(target: Path) -> Path:
    return target.with_name(f".old-{target.name}")


def recover_directory(target: str | os.PathLike) -> None:
    """Finish a :func:`publish_directory` of ``target`` that a crash interrupted: with ``target`` absent, the old
    directory left aside becomes ``target`` again; with ``target`` present (the new one was in place), the aside
    copy is deleted. Does nothing when there is no aside copy."""
    target = Path(target)
    aside = _aside(target)
    if not aside.exists():
        return
    if target.exists():
        shutil.rmtree(aside)
    else:
        os.replace(aside, target)
    fsync_dir(target.parent)


def publish_directory(staging: Path, target: Path) -> None:
    """Replace ``target`` by the complete directory ``staging`` (a sibling: same filesystem), fsynced first: a
    reader finds the complete old directory or the complete new one, never a mix, and on Linux never nothing (see
    the comment above for the other systems' instant between two renames, and how a crash there is recovered)."""
    staging, target = Path(staging), Path(target)
    recover_directory(target)
    fsync_tree(staging)
    if target.exists() and _exchange(staging, target):
        fsync_dir(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # it holds the old directory now
        return
    aside = _aside(target)
    if target.exists():
        os.replace(target, aside)
        fsync_dir(target.parent)
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (and ``root``) to disk, so that a rename that follows
    publishes complete files even after a power loss."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            fsync_dir(path)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
