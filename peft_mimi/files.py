"""Adapter files on disk: damaged weights are refused before PEFT reads them, and saves are atomic.

PEFT's ``save_pretrained`` writes straight into the target directory, so a crash or a full disk mid-write leaves
a truncated ``adapter_model.safetensors``; PEFT's loader then fails with safetensors' bare message, which names no
file. :func:`check_adapter_weights` (run by ``MiMiConfig.from_pretrained``, i.e. by every
``PeftModel.from_pretrained`` / ``load_adapter`` of a local MiMi adapter) refuses such a file by name, and
:func:`save_adapter` writes a whole new set of files before any old one is replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open


def check_adapter_weights(directory: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming the file when ``directory``'s adapter weights are not a complete safetensors
    file (truncated, header damaged, trailing bytes). Checks the header against the file size: cheap, no tensor is
    read. A directory without any weights file only warns (a config may be read on its own); PEFT's loader, which
    then tries the directory name as a Hub repository id, fails after the warning."""
    path = Path(directory) / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        if not (Path(directory) / WEIGHTS_NAME).is_file():
            warnings.warn(
                f"{Path(directory)} holds adapter_config.json but no {SAFETENSORS_WEIGHTS_NAME}: loading the adapter "
                "from it will fail. The save was interrupted or the weights were not copied; save the adapter again "
                "(peft_mimi.save_adapter) or put the weights file next to its config.",
                stacklevel=3,
            )
        return
    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except SafetensorError as error:
        raise ValueError(
            f"{path} ({path.stat().st_size:,} bytes) is damaged and was not loaded: {error}. It was probably cut "
            "short by an interrupted save or copy. Save the adapter again (peft_mimi.save_adapter writes "
            "atomically) or download it again."
        ) from None


def save_adapter(model: Any, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)``, atomically per file: everything is written and fsynced
    in a temporary sibling directory first, then each file replaces its old version with ``os.replace``. A crash
    or a failed write (disk full, no permission) leaves every previous file whole; files in ``save_directory``
    that the save does not produce are kept. Returns ``save_directory``."""
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, **kwargs)
        fsync_tree(staging)
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            destination = target / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
        fsync_dir(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def publish_directory(staging: Path, target: Path) -> None:
    """Replace ``target`` by the complete directory ``staging`` (fsynced first): a reader sees the old directory or
    the new one, never a mix. An existing ``target`` is moved aside and deleted after the rename."""
    fsync_tree(staging)
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


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
