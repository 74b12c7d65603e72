"""The structured suite's generators (benchmarks/structured_tasks.py): labels agree with the drawn geometry, data
depend only on the seed, and load_task gives VTAB-1k's splits. Small counts throughout: no full task is generated."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import ModuleType

import datasets
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import structured_tasks as st  # noqa: E402


@pytest.fixture
def tiny_splits(monkeypatch, tmp_path):
    """A private cache and VTAB-1k's protocol at a tenth of a percent: 10 training images (the last 4 for
    validation) and 6 test images."""
    monkeypatch.setenv("PEFT_MIMI_CACHE", str(tmp_path))
    monkeypatch.setattr(st, "TRAIN_SIZE", 10)
    monkeypatch.setattr(st, "VALIDATION_SIZE", 4)
    monkeypatch.setattr(st, "TEST_SIZE", 6)
    return tmp_path


# ------------------------------------------------------------------------------------------------- dSprites
def _centroid(image: np.ndarray) -> tuple[float, float]:
    """The shape's pixel centroid in pixel coordinates (pixel j covers [j, j + 1))."""
    rows, cols = np.nonzero(image)
    return cols.mean() + 0.5, rows.mean() + 0.5


def test_dsprites_location_label_is_the_x_bin_the_shape_lies_in():
    images, factors = st.draw_dsprites(120, seed=3)
    assert images.shape == (120, 64, 64) and set(np.unique(images)) == {0, 255}
    step = st.DSPRITES_SPAN / (len(st.DSPRITES_POSITIONS) - 1)  # pixels between neighbouring positions
    for image, label in zip(images, factors["location"]):
        x, _ = _centroid(image)
        # the bin's two positions, with less than half a position's slack for rasterisation
        low = st.DSPRITES_MARGIN + 2 * label * step
        assert low - 0.45 * step <= x <= low + 1.45 * step
        assert round((x - st.DSPRITES_MARGIN) / step) // 2 == label


def test_dsprites_shapes_stay_inside_the_canvas_at_the_extremes():
    for shape in range(3):
        for orientation in range(0, 40, 3):
            for corner in (0, 31):
                image = st.render_dsprite(shape, 5, orientation, corner, corner)
                rows, cols = np.nonzero(image)
                assert rows.min() > 0 and cols.min() > 0 and rows.max() < 63 and cols.max() < 63


def test_dsprites_orientation_label_follows_the_drawn_angle():
    # the ellipse's long axis (from image moments) turns by 9 degrees per orientation index
    for orientation in (0, 3, 7, 12, 18):
        image = st.render_dsprite(1, 5, orientation, 15, 15)
        rows, cols = np.nonzero(image)
        x, y = cols - cols.mean(), -(rows - rows.mean())  # y up
        angle = math.degrees(0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())) % 180
        expected = 9.0 * orientation % 180
        assert min(abs(angle - expected), 180 - abs(angle - expected)) < 2.0
    # ten indices are 90 degrees, four of VTAB's 2.5-index bins
    assert st.dsprites_orientation_class(13) - st.dsprites_orientation_class(3) == 4
    assert [int(st.dsprites_orientation_class(i)) for i in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]


def test_a_square_turned_by_90_degrees_looks_the_same_but_is_labelled_apart():
    # the shapes keep their symmetries, as in dSprites: part of what makes orientation hard
    turned = st.render_dsprite(0, 5, 10, 15, 15)
    assert np.array_equal(st.render_dsprite(0, 5, 0, 15, 15), turned)
    assert st.dsprites_orientation_class(10) != st.dsprites_orientation_class(0)
    heart = st.render_dsprite(2, 5, 0, 15, 15)
    assert not np.array_equal(heart, st.render_dsprite(2, 5, 10, 15, 15))


# ---------------------------------------------------------------------------------------------------- CLEVR
def _depth_along_view(scene: st.ClevrScene, point: np.ndarray) -> float:
    """|P - C| cos(angle between P - C and the optical axis), the camera aimed at the origin."""
    to_point, axis = point - scene.camera.position, -scene.camera.position
    cosine = to_point @ axis / (np.linalg.norm(to_point) * np.linalg.norm(axis))
    return float(np.linalg.norm(to_point) * cosine)


def test_clevr_label_is_the_nearest_objects_depth_bin_and_that_object_is_visible():
    rng = np.random.default_rng(5)
    checked = 0
    while checked < 8:
        scene = st.sample_clevr_scene(rng)
        if not st.clevr_visible(scene):
            continue
        checked += 1
        depths = [_depth_along_view(scene, np.array([o.x, o.y, o.half_height])) for o in scene.objects]
        assert np.allclose(scene.depths(), depths)
        nearest = int(np.argmin(depths))
        assert st.clevr_distance_class(min(depths)) == sum(min(depths) > t for t in (8.0, 8.5, 9.0, 9.5, 10.0))
        index = st.cast(scene.camera.position, scene.camera.rays(st.CLEVR_SIZE), scene.primitives())[1]
        assert np.count_nonzero(index == nearest) >= st.CLEVR_MIN_PIXELS


def test_clevr_objects_rest_on_the_ground_without_overlapping():
    rng = np.random.default_rng(6)
    for _ in range(20):
        objects = st.sample_clevr_scene(rng).objects
        assert 3 <= len(objects) <= 10
        for i, a in enumerate(objects):
            assert a.centre[2] == pytest.approx(a.half_height)  # on z = 0
            for b in objects[i + 1:]:
                assert math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius + st.CLEVR_GAP


def test_clevr_images_and_every_distance_class():
    images, factors = st.draw_clevr(30, seed=8)
    assert images.shape == (30, st.CLEVR_SIZE, st.CLEVR_SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(factors["distance"], st.clevr_distance_class(factors["depth"]))
    assert set(factors["distance"]) == set(range(6))
    assert images.std(axis=(1, 2, 3)).min() > 5  # objects stand out from the ground


def test_the_ray_caster_sees_a_box_and_a_cylinder_where_they_are():
    box = st.Primitive("box", np.array([0.0, 0.0, 2.0]), np.array([1.0, 0.5, 0.5]), st.rotation_z(np.pi / 2))
    cylinder = st.Primitive("cylinder", np.array([0.0, 0.0, 5.0]), np.array([2.0, 2.0, 0.5]))
    rays = np.array([[0.0, 0.0, 1.0], [0.0, 0.6, 1.0], [0.4, 0.0, 1.0]])  # the box turned 90 deg: long along y
    t, index, normal = st.cast(np.zeros(3), rays / np.linalg.norm(rays, axis=1, keepdims=True), [box, cylinder])
    assert index.tolist() == [0, 0, 1]
    assert t[0] == pytest.approx(1.5) and np.allclose(normal[0], [0, 0, -1])
    assert t[2] == pytest.approx(math.hypot(0.4 * 4.5, 4.5)) and np.allclose(normal[2], [0, 0, -1])  # bottom cap


# ---------------------------------------------------------------------------------------------- smallNORB
def _object_mask(image: np.ndarray) -> np.ndarray:
    """The pixels that are not the plain background."""
    return image != round(st.NORB_BACKGROUND * 255)


def _marked_object() -> list[st.Primitive]:
    """A ball with a small ball on its +x side (the object's front)."""
    return [st.Primitive("ellipsoid", np.zeros(3), np.full(3, 0.5)),
            st.Primitive("ellipsoid", np.array([0.75, 0.0, 0.0]), np.full(3, 0.2), colour=np.full(3, 1.0))]


def test_norb_azimuth_is_the_turntable_angle():
    parts = _marked_object()
    # the camera circles the object anticlockwise seen from above: at 80 deg the object's front (+x) is on the
    # image's left, at 260 deg on its right
    columns = np.nonzero(_object_mask(st.render_norb(parts, 4, 0, 0)).any(0))[0]
    centre = (columns.min() + columns.max()) / 2
    assert np.nonzero(_object_mask(st.render_norb(parts[1:], 4, 0, 0)).any(0))[0].mean() < centre - 5
    assert np.nonzero(_object_mask(st.render_norb(parts[1:], 13, 0, 0)).any(0))[0].mean() > centre + 5
    # turning the object by -20 deg on the turntable looks like the next azimuth label
    car = st.norb_object("car", np.random.default_rng(0))
    for toy in (parts, car):
        turn = st.rotation_z(math.radians(-20))
        turned = [st.Primitive(p.kind, turn @ p.centre, p.half_size, turn @ p.rotation, p.colour) for p in toy]
        assert np.abs(st.render_norb(turned, 3, 2, 1).astype(int) - st.render_norb(toy, 4, 2, 1)).mean() < 0.1
    assert np.abs(st.render_norb(car, 3, 2, 1).astype(int) - st.render_norb(car, 4, 2, 1)).mean() > 1.0


def test_norb_elevation_is_the_cameras_angle_above_the_ground():
    for index, degrees in enumerate(st.NORB_ELEVATIONS):
        position = st.norb_camera(index).position
        assert math.degrees(math.asin(position[2] / np.linalg.norm(position))) == pytest.approx(degrees)
        assert np.linalg.norm(position) == pytest.approx(st.NORB_DISTANCE)
    # a flat disc looks taller the higher the camera: about sin(70) / sin(30)
    disc = [st.Primitive("cylinder", np.zeros(3), np.array([0.9, 0.9, 0.02]))]
    heights = []
    for index in (0, 8):
        rows = np.nonzero(_object_mask(st.render_norb(disc, 0, index, 2)).any(1))[0]
        heights.append(rows.max() - rows.min() + 1)
    assert 1.6 < heights[1] / heights[0] < 2.2


def test_norb_objects_fit_the_unit_sphere_and_are_not_turn_symmetric():
    rng = np.random.default_rng(1)
    for category in st.NORB_CATEGORIES:
        parts = st.norb_object(category, rng)
        assert np.linalg.norm(np.concatenate([p.corners() for p in parts]), axis=1).max() <= 1.0 + 1e-9
        front, back = st.render_norb(parts, 0, 4, 0), st.render_norb(parts, 9, 4, 0)  # 0 and 180 deg
        assert np.abs(front.astype(int) - back).mean() > 1.0
        assert np.abs(front.astype(int) - back[:, ::-1]).mean() > 1.0  # nor merely mirrored


def test_norb_draws_every_pose_with_images_in_range():
    images, factors = st.draw_norb(100, seed=2)
    assert images.shape == (100, st.NORB_SIZE, st.NORB_SIZE) and images.dtype == np.uint8
    assert set(factors["azimuth"]) == set(range(18)) and set(factors["elevation"]) == set(range(9))
    assert set(factors["category"]) == set(range(5)) and set(factors["lighting"]) == set(range(6))
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    assert (border == round(st.NORB_BACKGROUND * 255)).all()  # nothing clipped by the frame
    assert (images.reshape(100, -1).min(1) < 120).all()  # and every object shows


# ------------------------------------------------------------------------------------------ every generator
@pytest.mark.parametrize("generator", [st.draw_dsprites, st.draw_clevr, st.draw_norb])
def test_the_data_depend_only_on_the_seed(generator):
    first, factors = generator(3, 11)
    again, factors_again = generator(3, 11)
    other, _ = generator(3, 12)
    assert np.array_equal(first, again)
    assert all(np.array_equal(factors[k], factors_again[k]) for k in factors)
    assert not np.array_equal(first, other)


def test_dsprites_draws_every_class_of_both_tasks():
    _, factors = st.draw_dsprites(400, seed=4)
    assert set(factors["location"]) == set(range(16)) and set(factors["orientation_bin"]) == set(range(16))


# ---------------------------------------------------------------------------------------- load_task, cache
def test_load_task_gives_vtab_1k_splits_and_caches_them(tiny_splits):
    data = st.load_task("dsprites_location")
    assert set(data) == {"train", "test"} and (len(data["train"]), len(data["test"])) == (10, 6)
    assert data["train"].column_names == ["image", "label"]
    assert isinstance(data["train"].features["image"], datasets.Image)
    assert data["train"].features["label"].names == list(st.TASKS["dsprites_location"].class_names)
    assert data["train"][0]["image"].size == (64, 64)
    assert (tiny_splits / "structured" / f"dsprites-v{st.VERSION}" / "dataset_dict.json").exists()

    # the labels are VTAB's bins of factors drawn from the fixed data seed, the test set from another seed
    images, factors = st.draw_dsprites(10, st.TRAIN_SEED)
    assert data["train"]["label"] == factors["location"].tolist()
    assert np.array_equal(np.asarray(data["train"][3]["image"]), images[3])
    assert data["test"]["label"] == st.draw_dsprites(6, st.TEST_SEED)[1]["location"].tolist()

    # the validation split: the first 6 training images, then the last 4 as "test"
    tune = st.load_task("dsprites_location", validation=True)
    assert (len(tune["train"]), len(tune["test"])) == (6, 4)
    assert tune["test"]["label"] == data["train"]["label"][6:]

    # the orientation task shares the pool's images and labels them by angle
    orientation = st.load_task("dsprites_orientation")
    assert np.array_equal(np.asarray(orientation["train"][3]["image"]), images[3])
    assert orientation["train"]["label"] == factors["orientation_bin"].tolist()


def test_norb_tasks_share_images_and_label_them_apart(tiny_splits):
    azimuth, elevation = st.load_task("norb_azimuth"), st.load_task("norb_elevation")
    _, factors = st.draw_norb(10, st.TRAIN_SEED)
    assert azimuth["train"]["label"] == factors["azimuth"].tolist()
    assert elevation["train"]["label"] == factors["elevation"].tolist()
    assert np.array_equal(np.asarray(azimuth["test"][0]["image"]), np.asarray(elevation["test"][0]["image"]))
    assert azimuth["train"].features["label"].names[:3] == ["0deg", "20deg", "40deg"]


def test_a_new_version_regenerates(tiny_splits, monkeypatch):
    st.load_task("dsprites_location")
    monkeypatch.setattr(st, "VERSION", st.VERSION + 1)
    monkeypatch.setattr(st, "TRAIN_SIZE", 12)
    assert len(st.load_task("dsprites_location")["train"]) == 12


def test_a_pool_saved_meanwhile_by_another_process_is_kept(tiny_splits, monkeypatch):
    generate = st.generate_pool

    def generate_while_another_process_saves(pool):
        generate(pool).save_to_disk(str(st.cache_root() / f"{pool}-v{st.VERSION}"))  # it finished first
        return generate(pool)

    monkeypatch.setattr(st, "generate_pool", generate_while_another_process_saves)
    assert len(st.load_task("dsprites_location")["train"]) == 10
    assert [p.name for p in (tiny_splits / "structured").iterdir()] == [f"dsprites-v{st.VERSION}"]


def test_unknown_task_names_the_choices():
    with pytest.raises(KeyError, match="dsprites_location"):
        st.load_task("dsprites")


def test_every_task_is_described():
    assert list(st.TASKS) == ["dsprites_location", "dsprites_orientation", "clevr_distance", "norb_azimuth",
                              "norb_elevation", "elpv"]
    sizes = {"dsprites_location": 16, "dsprites_orientation": 16, "clevr_distance": 6, "norb_azimuth": 18,
             "norb_elevation": 9, "elpv": 4}
    for name, task in st.TASKS.items():
        assert len(task.class_names) == sizes[name] == len(set(task.class_names)) and task.description
    assert st.TASKS["dsprites_orientation"].class_names[:3] == ("0-18deg", "27-36deg", "45-63deg")


# ---------------------------------------------------------------------------------------------------- elpv
def test_stratified_take_is_exact_and_proportional():
    strata = np.repeat([0, 1, 2, 3], [1508, 295, 106, 715])
    taken = st.stratified_take(strata, 1000, np.random.default_rng(0))
    assert len(taken) == len(set(taken)) == 1000
    assert np.abs(np.bincount(strata[taken]) - np.bincount(strata) * 1000 / len(strata)).max() <= 1


def test_elpv_without_its_package_says_how_to_install_it(tiny_splits, monkeypatch):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    with pytest.raises(ImportError, match="pip install elpv-dataset"):
        st.load_task("elpv")


def _fake_elpv(monkeypatch, labels: np.ndarray, cell_types: np.ndarray) -> None:
    """An elpv_dataset package whose load_dataset returns distinct 4 x 4 images with the given defect classes
    (0..3) and cell types."""
    utils = ModuleType("elpv_dataset.utils")
    images = np.zeros((len(labels), 4, 4), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.divmod(np.arange(len(labels)), 256)  # image i shows i
    utils.load_dataset = lambda: (images, labels / 3, cell_types)
    monkeypatch.setitem(sys.modules, "elpv_dataset", ModuleType("elpv_dataset"))
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", utils)


def test_elpv_splits_are_stratified_by_defect_and_cell_type(tiny_splits, monkeypatch):
    # elpv's real class sizes (1508, 295, 106, 715 of 2,624), cells alternately mono and poly
    labels = np.repeat([0, 1, 2, 3], [1508, 295, 106, 715])
    _fake_elpv(monkeypatch, labels, np.where(np.arange(len(labels)) % 3 == 0, "mono", "poly"))
    monkeypatch.setattr(st, "TRAIN_SIZE", 1000)
    monkeypatch.setattr(st, "VALIDATION_SIZE", 200)
    data = st.load_task("elpv")
    assert (len(data["train"]), len(data["test"])) == (1000, 1624)
    train, test = np.bincount(data["train"]["label"]), np.bincount(data["test"]["label"])
    assert np.abs(train / 1000 - test / 1624).max() < 0.005
    tune = st.load_task("elpv", validation=True)
    assert (len(tune["train"]), len(tune["test"])) == (800, 200)
    assert np.abs(np.bincount(tune["test"]["label"], minlength=4) / 200 - train / 1000).max() < 0.01
    # no image is in two splits
    pixels = {np.asarray(image).tobytes() for split in data.values() for image in split["image"]}
    assert len(pixels) == 2624


def test_elpv_package_gives_what_the_task_reads(tmp_path):
    utils = pytest.importorskip("elpv_dataset.utils")
    data = Path(utils.__file__).parent / "data"
    lines = (data / "labels.csv").read_text().splitlines()
    assert len(lines) == 2624
    # the loader on every 100th cell (reading all 2,624 images takes seconds)
    (tmp_path / "labels.csv").write_text("\n".join(lines[::100]) + "\n")
    (tmp_path / "images").symlink_to(data / "images")
    images, probabilities, cell_types = utils.load_dataset(str(tmp_path / "labels.csv"))
    assert images.shape == (27, 300, 300) and images.dtype == np.uint8
    assert set(np.rint(probabilities * 3)) <= {0, 1, 2, 3} and set(cell_types) <= {"mono", "poly"}
    assert np.allclose(probabilities * 3, np.rint(probabilities * 3))
