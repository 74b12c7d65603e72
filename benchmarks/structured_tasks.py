"""A VTAB-1k-style "structured" suite: tasks whose labels are geometry (where, how far, which pose), generated
offline and deterministically, plus one real dataset (elpv).

    python benchmarks/structured_tasks.py --samples                    # -> results/structured/samples/<task>.png
    python benchmarks/structured_tasks.py --samples --tasks clevr_distance

VTAB-1k's structured group (dSprites location/orientation, CLEVR distance, smallNORB azimuth/elevation) is where
PEFT methods differ; its data cannot be downloaded here, so each task is an analog drawn from a seed, with VTAB's
label definition (results/structured/TASKS.md puts the two side by side):

- ``dsprites_location`` / ``dsprites_orientation``: dSprites re-implemented from its specification (3 shapes,
  6 scales, 40 orientations, 32 x 32 positions, 64 x 64 binary images); the label is the x position (32 values)
  in 16 bins, or the orientation (40 values) in 16 bins, binned as VTAB does (``floor(index / (n / 16))``).
  Both tasks share one pool of images, as VTAB's two dSprites tasks do.
- ``clevr_distance``: CLEVR-like scenes (3-10 spheres, cubes and cylinders, rubber or metal, 8 colours, 2 sizes)
  ray-cast in perspective; the label is the nearest object's depth along the camera axis in VTAB's 6 bins.
- ``norb_azimuth`` / ``norb_elevation``: smallNORB-like renders of 5 categories of toy objects built from
  primitives; the label is the camera's azimuth (18 values) or elevation (9 values). One shared pool of images.
- ``elpv``: real electroluminescence images of solar cells (``pip install elpv-dataset``; CC BY-NC-SA 4.0, fine
  for a benchmark, never shipped with peft_mimi), 4 defect-probability classes.

Protocol (VTAB-1k): 1,000 training images drawn from :data:`TRAIN_SEED` (the first 800 are the train part, the
last 200 the validation part) and :data:`TEST_SIZE` test images from :data:`TEST_SEED`. The data never depend on
the training seed. Generated pools are cached with ``datasets.save_to_disk`` under
``$PEFT_MIMI_CACHE/structured/<pool>-v<VERSION>`` (default ``~/.cache/peft_mimi``); bump :data:`VERSION` whenever
a generator changes.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

# the generated data; bump when any generator or the split sizes change (it names the cache folders)
VERSION = 3
TRAIN_SEED = 1000  # the 1,000 training images (800 train + 200 validation)
TEST_SEED = 2000  # the test images: another seed than the training images'
TRAIN_SIZE = 1000
VALIDATION_SIZE = 200  # the last 200 of the 1,000
TEST_SIZE = 2000
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "structured"

Factors = dict[str, np.ndarray]
# (count, seed) -> (images (N, H, W) or (N, H, W, 3) uint8, per-image factors, each (N,)); the labels are factors
Generator = Callable[[int, int], tuple[np.ndarray, Factors]]


def cache_root() -> Path:
    """Where generated pools are saved: ``$PEFT_MIMI_CACHE/structured``, by default under ``~/.cache/peft_mimi``."""
    base = os.environ.get("PEFT_MIMI_CACHE") or Path.home() / ".cache" / "peft_mimi"
    return Path(base) / "structured"


# ==========================================================================================================
# dSprites
# ==========================================================================================================
DSPRITES_SIZE = 64
DSPRITES_SHAPES = ("square", "ellipse", "heart")
DSPRITES_SCALES = np.linspace(0.5, 1.0, 6)
DSPRITES_ORIENTATIONS = np.arange(40) * (2 * np.pi / 40)  # radians, [0, 2 pi)
DSPRITES_POSITIONS = np.linspace(0.0, 1.0, 32)
DSPRITES_BINS = 16
# position 0..1 moves the shape's centre over the middle half of the canvas (16..48 px), so that the largest
# shape (radius < 15 px at scale 1) is never clipped
DSPRITES_MARGIN = 0.25 * DSPRITES_SIZE
DSPRITES_SPAN = 0.5 * DSPRITES_SIZE


def _centred_on_area(outline: np.ndarray) -> np.ndarray:
    """A closed polygon (K, 2) moved so that its area centroid is at the origin."""
    x, y = outline[:, 0], outline[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * area)
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
    return outline - [cx, cy]


def _unit_outlines() -> dict[str, np.ndarray]:
    """Each shape's outline at scale 1 and orientation 0, in pixels, x right and y up, area centroid at 0."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    heart = np.stack([16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)], 1)
    heart = _centred_on_area(heart)
    return {
        "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * 10.0,  # 20 px side
        "ellipse": np.stack([14.0 * np.cos(t), 7.0 * np.sin(t)], 1),
        "heart": heart * (14.0 / np.linalg.norm(heart, axis=1).max()),
    }


_DSPRITES_OUTLINES = _unit_outlines()


def dsprites_centre(x_index: int, y_index: int) -> tuple[float, float]:
    """The shape's centre in pixel coordinates (x right, y down; pixel ``j`` covers ``[j, j + 1)``)."""
    return (DSPRITES_MARGIN + DSPRITES_SPAN * DSPRITES_POSITIONS[x_index],
            DSPRITES_MARGIN + DSPRITES_SPAN * DSPRITES_POSITIONS[y_index])


def _fill_polygon(vertices: np.ndarray, size: int) -> np.ndarray:
    """Which pixel centres of a ``size`` x ``size`` canvas lie inside the polygon (K, 2) (x, y pixels): (size, size)
    bool, by the even-odd rule."""
    centres = np.arange(size) + 0.5
    px, py = centres[None, None, :], centres[None, :, None]
    x0, y0 = vertices[:, 0, None, None], vertices[:, 1, None, None]
    x1, y1 = np.roll(vertices[:, 0], -1)[:, None, None], np.roll(vertices[:, 1], -1)[:, None, None]
    spans = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    return (np.count_nonzero(spans & (px < crossing), axis=0) % 2).astype(bool)


def render_dsprite(shape: int, scale: int, orientation: int, x: int, y: int) -> np.ndarray:
    """One dSprites image (64, 64) uint8 in {0, 255} from the factors' indices: shape in 0..2
    (:data:`DSPRITES_SHAPES`), scale in 0..5, orientation in 0..39 (counter-clockwise on screen), x and y in
    0..31."""
    angle = DSPRITES_ORIENTATIONS[orientation]
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    outline = _DSPRITES_OUTLINES[DSPRITES_SHAPES[shape]] * DSPRITES_SCALES[scale] @ rotation.T
    cx, cy = dsprites_centre(x, y)
    pixels = np.stack([cx + outline[:, 0], cy - outline[:, 1]], 1)  # y up -> image rows down
    return _fill_polygon(pixels, DSPRITES_SIZE).astype(np.uint8) * 255


def dsprites_location_class(x: int | np.ndarray) -> np.ndarray:
    """VTAB's label: the x-position index (0..31) in 16 bins of two neighbouring positions, elementwise."""
    return np.asarray(x) * DSPRITES_BINS // len(DSPRITES_POSITIONS)


def dsprites_orientation_class(orientation: int | np.ndarray) -> np.ndarray:
    """VTAB's label: ``floor(index / 2.5)`` for the orientation index 0..39 (16 bins of 2 or 3 angles),
    elementwise."""
    return np.asarray(orientation) * DSPRITES_BINS // len(DSPRITES_ORIENTATIONS)


def draw_dsprites(count: int, seed: int) -> tuple[np.ndarray, Factors]:
    """``count`` dSprites images with every factor uniform at random from ``seed``; the factors are the
    indices plus the two VTAB labels ``location`` and ``orientation_bin``."""
    rng = np.random.default_rng(seed)
    factors = {
        "shape": rng.integers(0, len(DSPRITES_SHAPES), count),
        "scale": rng.integers(0, len(DSPRITES_SCALES), count),
        "orientation": rng.integers(0, len(DSPRITES_ORIENTATIONS), count),
        "x": rng.integers(0, len(DSPRITES_POSITIONS), count),
        "y": rng.integers(0, len(DSPRITES_POSITIONS), count),
    }
    images = np.stack([render_dsprite(*(int(factors[k][i]) for k in ("shape", "scale", "orientation", "x", "y")))
                       for i in range(count)])
    factors["location"] = dsprites_location_class(factors["x"])
    factors["orientation_bin"] = dsprites_orientation_class(factors["orientation"])
    return images, factors


# ==========================================================================================================
# A small ray-caster: unit primitives placed by an affine map, vectorised over rays
# ==========================================================================================================
@dataclass(frozen=True)
class Primitive:
    """A solid in world space: ``kind`` is ``ellipsoid`` (the unit sphere), ``box`` (the cube [-1, 1]^3),
    ``cylinder`` (radius 1 around the local z axis, |z| <= 1) or ``ground`` (the plane z = 0, seen from above),
    stretched by ``half_size`` along its local axes, turned by ``rotation`` (local -> world, 3 x 3) and moved to
    ``centre``. ``metal``: shiny (a specular highlight and a reflection) rather than matte."""

    kind: str
    centre: np.ndarray
    half_size: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    colour: np.ndarray = field(default_factory=lambda: np.full(3, 0.7))
    metal: bool = False

    @property
    def bounding_radius(self) -> float:
        scale = 1.0 if self.kind == "ellipsoid" else math.sqrt(2.0 if self.kind == "cylinder" else 3.0)
        return float(np.max(self.half_size)) * scale

    def corners(self) -> np.ndarray:
        """The corners of the primitive's bounding box in world space (8, 3)."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
        return self.centre + (signs * self.half_size) @ self.rotation.T


def rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotation_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


_EPS = 1e-4


def _near_root(b: np.ndarray, c: np.ndarray, a: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of ``a t^2 + 2 b t + c`` (``inf`` where there are none), nearest first."""
    disc = b * b - a * c
    root = np.sqrt(np.where(disc >= 0, disc, np.nan))
    with np.errstate(divide="ignore", invalid="ignore"):
        near, far = (-b - root) / a, (-b + root) / a
    return np.nan_to_num(near, nan=np.inf), np.nan_to_num(far, nan=np.inf)


def _first_positive(*candidates: np.ndarray) -> np.ndarray:
    """The smallest candidate above ``_EPS`` for each ray (``inf`` if none)."""
    best = np.full(candidates[0].shape, np.inf)
    for t in candidates:
        best = np.where((t > _EPS) & (t < best), t, best)
    return best


def _intersect_unit(kind: str, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays ``o + t d`` (P, 3) in the primitive's local frame against its unit solid: ``(t (P,), local normal
    (P, 3))``, ``t = inf`` on a miss."""
    if kind == "ellipsoid":
        a = _rowdot(d, d)
        near, far = _near_root(_rowdot(o, d), _rowdot(o, o) - 1.0, a)
        t = _first_positive(near, far)
        return t, o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    if kind == "box":
        safe = np.where(np.abs(d) < 1e-12, 1e-12, d)
        t1, t2 = (-1.0 - o) / safe, (1.0 - o) / safe
        t_in, t_out = np.minimum(t1, t2), np.maximum(t1, t2)
        enter, leave = t_in.max(1), t_out.min(1)
        hit = leave >= np.maximum(enter, _EPS)
        t = np.where(hit, np.where(enter > _EPS, enter, leave), np.inf)
        axis = np.where(enter > _EPS, t_in.argmax(1), t_out.argmin(1))
        normal = np.zeros_like(o)
        rows = np.arange(len(o))
        normal[rows, axis] = np.where(enter > _EPS, -np.sign(safe[rows, axis]), np.sign(safe[rows, axis]))
        return t, normal
    if kind == "cylinder":
        a = d[:, 0] ** 2 + d[:, 1] ** 2
        near, far = _near_root(o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1], o[:, 0] ** 2 + o[:, 1] ** 2 - 1.0,
                               np.maximum(a, 1e-12))
        side = [np.where(np.abs(o[:, 2] + t * d[:, 2]) <= 1.0, t, np.inf) for t in (near, far)]
        safe = np.where(np.abs(d[:, 2]) < 1e-12, 1e-12, d[:, 2])
        caps = []
        for z in (-1.0, 1.0):
            t = (z - o[:, 2]) / safe
            r2 = (o[:, 0] + t * d[:, 0]) ** 2 + (o[:, 1] + t * d[:, 1]) ** 2
            caps.append(np.where(r2 <= 1.0, t, np.inf))
        t = _first_positive(*side, *caps)
        point = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
        on_cap = np.abs(np.abs(point[:, 2]) - 1.0) < 1e-6
        normal = np.where(on_cap[:, None], np.stack([0 * a, 0 * a, np.sign(point[:, 2])], 1),
                          np.stack([point[:, 0], point[:, 1], 0 * a], 1))
        return t, normal
    raise ValueError(f"unknown primitive kind {kind!r}; use ellipsoid, box or cylinder (or ground, in cast)")


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """All dot products of the 3-vectors ``u`` (P, 3) with ``v`` (K, 3): (P, K). Spelled out, as numpy's matmul is
    slow for an inner size of 3."""
    return u[:, 0:1] * v[:, 0] + u[:, 1:2] * v[:, 1] + u[:, 2:3] * v[:, 2]


def _rowdot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-by-row dot products of (P, 3) arrays: (P,)."""
    return u[:, 0] * v[:, 0] + u[:, 1] * v[:, 1] + u[:, 2] * v[:, 2]


def cast(origins: np.ndarray, directions: np.ndarray, primitives: Sequence[Primitive]
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first hit of each ray ``origins + t directions``, for P rays from one eye (origins (3,), directions
    (P, 3)) or in one direction (origins (P, 3), directions (3,)): ``(t (P,), index of the primitive hit (P,),
    -1 for none, unit world normal (P, 3))``."""
    # which rays pass through which primitive's bounding sphere, all at once: (P, K)
    solids = [i for i, prim in enumerate(primitives) if prim.kind != "ground"]
    centres = np.array([primitives[i].centre for i in solids]).reshape(-1, 3)
    radii = np.array([primitives[i].bounding_radius for i in solids])
    if origins.ndim == 1:
        rel = origins - centres
        a = _rowdot(directions, directions)[:, None]
        b = _dots(directions, rel)
        c = (_rowdot(rel, rel) - radii ** 2)[None, :]
    else:
        a = directions @ directions
        b = (origins @ directions)[:, None] - centres @ directions
        c = _rowdot(origins, origins)[:, None] - 2 * _dots(origins, centres) + (_rowdot(centres, centres) - radii ** 2)
    candidates = (b * b - a * c >= 0) & ((c <= 0) | (b < 0))
    shape = np.broadcast_shapes(origins.shape, directions.shape)
    origins, directions = np.broadcast_to(origins, shape), np.broadcast_to(directions, shape)
    count = len(origins)
    best_t, best_index, best_normal = np.full(count, np.inf), np.full(count, -1), np.zeros((count, 3))
    for index, prim in enumerate(primitives):
        if prim.kind == "ground":  # z = 0 needs no change of frame
            with np.errstate(divide="ignore"):
                t = _first_positive(-origins[:, 2] / directions[:, 2])
            closer = t < best_t
            best_t[closer], best_index[closer], best_normal[closer] = t[closer], index, (0.0, 0.0, 1.0)
            continue
        rays = np.flatnonzero(candidates[:, solids.index(index)])
        if len(rays) == 0:
            continue
        local_o = _dots(origins[rays] - prim.centre, prim.rotation.T) / prim.half_size
        local_d = _dots(directions[rays], prim.rotation.T) / prim.half_size
        t, normal = _intersect_unit(prim.kind, local_o, local_d)
        closer = t < best_t[rays]
        if not closer.any():
            continue
        rays, t, normal = rays[closer], t[closer], normal[closer]
        world = _dots(normal / prim.half_size, prim.rotation)  # normals take the inverse transpose
        best_t[rays], best_index[rays] = t, index
        best_normal[rays] = world / np.linalg.norm(world, axis=1, keepdims=True)
    return best_t, best_index, best_normal


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at ``position`` looking at ``target`` (world z is up), square ``fov`` in degrees."""

    position: np.ndarray
    target: np.ndarray
    fov: float

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(forward, right, up)`` unit vectors."""
        forward = (self.target - self.position) / np.linalg.norm(self.target - self.position)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        return forward, right, np.cross(right, forward)

    def rays(self, size: int, pixels: np.ndarray | None = None, grid: int = 1) -> np.ndarray:
        """Unit ray directions into a ``size`` x ``size`` image: through every pixel's centre, row by row (P, 3);
        or ``grid`` x ``grid`` rays spread over each of ``pixels`` (flat indices), pixel by pixel."""
        forward, right, up = self.axes()
        rows, cols = divmod(np.arange(size * size) if pixels is None else np.asarray(pixels), size)
        offsets = (np.arange(grid) + 0.5) / grid
        y = (rows[:, None] + np.repeat(offsets, grid)).reshape(-1, 1)
        x = (cols[:, None] + np.tile(offsets, grid)).reshape(-1, 1)
        half = math.tan(math.radians(self.fov) / 2)
        directions = forward + (x / size * 2 - 1) * half * right - (y / size * 2 - 1) * half * up
        return directions / np.linalg.norm(directions, axis=1, keepdims=True)

    def depth(self, points: np.ndarray) -> np.ndarray:
        """Distance of world points (N, 3) along the viewing axis (CLEVR's ``pixel_coords[2]``)."""
        return (np.asarray(points) - self.position) @ self.axes()[0]


@dataclass(frozen=True)
class Light:
    """A directional light: ``direction`` (unit) points towards the light."""

    direction: np.ndarray
    intensity: float


def _direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])


def shade(camera_position: np.ndarray, directions: np.ndarray, hit: tuple[np.ndarray, np.ndarray, np.ndarray],
          primitives: Sequence[Primitive], lights: Sequence[Light], ambient: float, background: np.ndarray
          ) -> np.ndarray:
    """Colours (P, 3) in [0, 1] of the camera rays' hits ``hit`` (as :func:`cast` returns them): Lambert plus a
    Blinn-Phong highlight per light, shadows cast by every primitive, and for metal a tinted reflection of a
    sky-to-ground gradient."""
    t, index, normal = hit
    colours = np.tile(np.asarray(background, dtype=float), (len(t), 1))
    rays = np.flatnonzero(index >= 0)
    if len(rays) == 0:
        return colours
    d, n = directions[rays], normal[rays]
    points = camera_position + t[rays, None] * d + n * 1e-3
    albedo = np.array([prim.colour for prim in primitives])[index[rays]]
    metal = np.array([prim.metal for prim in primitives])[index[rays]]
    diffuse, specular = np.full(len(rays), ambient), np.zeros(len(rays))
    for light in lights:
        facing = np.clip(n @ light.direction, 0, None)
        front = np.flatnonzero(facing > 0)
        lit = np.zeros(len(rays))
        lit[front] = ~np.isfinite(cast(points[front], light.direction, primitives)[0])
        diffuse += light.intensity * lit * facing
        half = light.direction - d
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        gloss = np.where(metal, 80.0, 12.0)
        specular += light.intensity * lit * np.clip(_rowdot(n, half), 0, None) ** gloss
    reflected = d - 2 * _rowdot(d, n)[:, None] * n
    sky = 0.35 + 0.35 * np.clip(reflected[:, 2], -1, 1)
    matte = albedo * diffuse[:, None] + 0.06 * specular[:, None]
    shiny = albedo * (0.35 * diffuse + 0.55 * sky)[:, None] + 0.9 * specular[:, None]
    colours[rays] = np.where(metal[:, None], shiny, matte)
    return np.clip(colours, 0.0, 1.0)


def render(camera: Camera, primitives: Sequence[Primitive], lights: Sequence[Light], ambient: float,
           background: np.ndarray, size: int, hit: tuple[np.ndarray, ...] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(image (size, size, 3) uint8, index of the primitive seen at each pixel's centre (size, size), -1 for
    none)``. Pixels on an outline (whose neighbour sees another primitive) are antialiased with 2 x 2 rays.
    ``hit``: the camera rays' hits, if already cast (``cast(camera.position, camera.rays(size), primitives)``)."""
    directions = camera.rays(size)
    hit = cast(camera.position, directions, primitives) if hit is None else hit
    colours = shade(camera.position, directions, hit, primitives, lights, ambient, background)
    index = hit[1].reshape(size, size)
    outline = np.zeros((size, size), dtype=bool)
    outline[1:] |= index[1:] != index[:-1]
    outline[:-1] |= index[1:] != index[:-1]
    outline[:, 1:] |= index[:, 1:] != index[:, :-1]
    outline[:, :-1] |= index[:, 1:] != index[:, :-1]
    pixels = np.flatnonzero(outline)
    if len(pixels):
        sub = camera.rays(size, pixels, grid=2)
        sub_colours = shade(camera.position, sub, cast(camera.position, sub, primitives), primitives, lights, ambient,
                            background)
        colours[pixels] = sub_colours.reshape(len(pixels), 4, 3).mean(1)
    image = np.clip(np.rint(colours.reshape(size, size, 3) * 255), 0, 255).astype(np.uint8)
    return image, index


# ==========================================================================================================
# CLEVR-like scenes: closest-object distance
# ==========================================================================================================
CLEVR_SIZE = 128
CLEVR_SHAPES = ("sphere", "cube", "cylinder")
CLEVR_MATERIALS = ("rubber", "metal")
CLEVR_COLOURS = {  # CLEVR's eight colours (sRGB)
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
CLEVR_SIZES = {"small": 0.35, "large": 0.7}  # CLEVR's radii, scene units
CLEVR_DISTANCE_THRESHOLDS = (8.0, 8.5, 9.0, 9.5, 10.0)  # VTAB's bin edges of the nearest object's depth
CLEVR_DISTANCE_CLASSES = ("<8", "8-8.5", "8.5-9", "9-9.5", "9.5-10", ">10")
CLEVR_CAMERA = np.array([7.48, -6.51, 5.34])  # CLEVR's camera position, jittered by +-0.5 per axis
CLEVR_FOV = 42.0
CLEVR_AREA = 3.0  # objects' centres in [-3, 3]^2, as CLEVR
CLEVR_GAP = 0.25  # the least gap between two objects' footprints, as CLEVR's min_dist
CLEVR_MIN_PIXELS = 20  # each object shows at least this many pixels (CLEVR: 200 of 480 x 320)
CLEVR_GROUND = np.array([0.52, 0.52, 0.5])
CLEVR_SKY = np.array([0.6, 0.6, 0.62])


@dataclass(frozen=True)
class ClevrObject:
    """One object: ``shape`` in :data:`CLEVR_SHAPES`, ``radius`` (half its width), ground position ``x, y`` and a
    turn ``angle`` (radians) about the vertical."""

    shape: str
    material: str
    colour: str
    radius: float
    x: float
    y: float
    angle: float

    @property
    def half_height(self) -> float:
        # CLEVR's cubes have half-side r / sqrt(2) (their footprint's corners stay within r)
        return self.radius / math.sqrt(2) if self.shape == "cube" else self.radius

    @property
    def centre(self) -> np.ndarray:
        return np.array([self.x, self.y, self.half_height])

    def primitive(self) -> Primitive:
        kind = {"sphere": "ellipsoid", "cube": "box", "cylinder": "cylinder"}[self.shape]
        half = self.half_height if self.shape == "cube" else self.radius
        return Primitive(kind, self.centre, np.full(3, half), rotation_z(self.angle),
                         np.array(CLEVR_COLOURS[self.colour]) / 255.0, self.material == "metal")


@dataclass(frozen=True)
class ClevrScene:
    """A scene: its objects, the camera and the key light."""

    objects: tuple[ClevrObject, ...]
    camera: Camera
    light: Light

    def primitives(self) -> list[Primitive]:
        """The objects, in order, then the ground."""
        ground = Primitive("ground", np.zeros(3), np.ones(3), colour=CLEVR_GROUND)
        return [obj.primitive() for obj in self.objects] + [ground]

    def depths(self) -> np.ndarray:
        """Each object's centre depth along the camera axis (N,)."""
        return self.camera.depth(np.stack([obj.centre for obj in self.objects]))


def clevr_distance_class(depth: float | np.ndarray) -> np.ndarray:
    """VTAB's label: how many of the thresholds 8, 8.5, 9, 9.5, 10 lie below ``depth`` (0..5), elementwise."""
    return np.searchsorted(CLEVR_DISTANCE_THRESHOLDS, depth, side="left")


def sample_clevr_scene(rng: np.random.Generator) -> ClevrScene:
    """3-10 objects placed without overlap (footprints at least :data:`CLEVR_GAP` apart), a jittered camera aimed
    at the origin and a jittered key light. Visibility is not checked here (see :func:`draw_clevr`)."""
    objects: list[ClevrObject] = []
    count, attempts = int(rng.integers(3, 11)), 0
    while len(objects) < count:
        attempts += 1
        if attempts > 200:  # crowded: start the placement again, as CLEVR does
            objects, attempts = [], 0
        obj = ClevrObject(
            shape=CLEVR_SHAPES[rng.integers(len(CLEVR_SHAPES))],
            material=CLEVR_MATERIALS[rng.integers(len(CLEVR_MATERIALS))],
            colour=list(CLEVR_COLOURS)[rng.integers(len(CLEVR_COLOURS))],
            radius=list(CLEVR_SIZES.values())[rng.integers(len(CLEVR_SIZES))],
            x=float(rng.uniform(-CLEVR_AREA, CLEVR_AREA)), y=float(rng.uniform(-CLEVR_AREA, CLEVR_AREA)),
            angle=float(rng.uniform(0, 2 * np.pi)),
        )
        if all(math.hypot(obj.x - o.x, obj.y - o.y) >= obj.radius + o.radius + CLEVR_GAP for o in objects):
            objects.append(obj)
    camera = Camera(CLEVR_CAMERA + rng.uniform(-0.5, 0.5, 3), np.zeros(3), CLEVR_FOV)
    light = Light(_direction(rng.uniform(-80, -20), rng.uniform(35, 65)), 0.85)
    return ClevrScene(tuple(objects), camera, light)


def clevr_visible(scene: ClevrScene, hit: tuple[np.ndarray, ...] | None = None, size: int = CLEVR_SIZE) -> bool:
    """Whether every object shows at least :data:`CLEVR_MIN_PIXELS` pixels and none touches the image's border.
    ``hit``: the camera rays' hits, if already cast."""
    if hit is None:
        hit = cast(scene.camera.position, scene.camera.rays(size), scene.primitives())
    index = hit[1].reshape(size, size)
    count = len(scene.objects)
    pixels = np.bincount(index[index >= 0], minlength=count + 1)[:count]
    border = np.concatenate([index[0], index[-1], index[:, 0], index[:, -1]])
    return bool(pixels.min() >= CLEVR_MIN_PIXELS and not ((border >= 0) & (border < count)).any())


def render_clevr(scene: ClevrScene, hit: tuple[np.ndarray, ...] | None = None, size: int = CLEVR_SIZE
                 ) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 image. ``hit``: the camera rays' hits, if already cast."""
    return render(scene.camera, scene.primitives(), [scene.light], 0.3, CLEVR_SKY, size, hit)[0]


def draw_clevr(count: int, seed: int) -> tuple[np.ndarray, Factors]:
    """``count`` CLEVR-like images from ``seed``; a scene that fails :func:`clevr_visible` is drawn again (as CLEVR
    redraws scenes with hidden objects). Factors: ``distance`` (the label), ``depth`` (the nearest object's
    depth) and ``objects`` (how many)."""
    rng = np.random.default_rng(seed)
    images, depth, objects = [], [], []
    while len(images) < count:
        scene = sample_clevr_scene(rng)
        hit = cast(scene.camera.position, scene.camera.rays(CLEVR_SIZE), scene.primitives())
        if not clevr_visible(scene, hit):
            continue
        images.append(render_clevr(scene, hit))
        depth.append(scene.depths().min())
        objects.append(len(scene.objects))
    depth = np.array(depth)
    return np.stack(images), {"distance": clevr_distance_class(depth), "depth": depth, "objects": np.array(objects)}


# ==========================================================================================================
# smallNORB-like toys: camera azimuth and elevation
# ==========================================================================================================
NORB_SIZE = 96
NORB_CATEGORIES = ("animal", "human", "airplane", "truck", "car")
NORB_AZIMUTHS = np.arange(0, 360, 20)  # degrees, 18 values
NORB_ELEVATIONS = np.arange(30, 75, 5)  # degrees, 9 values
NORB_DISTANCE = 5.0  # camera distance from the object's centre; every object fits in the unit sphere
NORB_FOV = 27.0
NORB_BACKGROUND = 0.78
# six lighting conditions, as smallNORB's: (lights as (azimuth, elevation, intensity) in the room, ambient).
# The room is fixed to the camera's azimuth: smallNORB turns the object on a turntable, the lights stay.
NORB_LIGHTING = (
    (((30, 50, 0.85),), 0.25),
    (((-50, 35, 0.8),), 0.25),
    (((0, 80, 0.9),), 0.2),
    (((90, 40, 0.6), (-90, 40, 0.35)), 0.25),
    (((150, 45, 0.7),), 0.35),
    (((-20, 20, 0.5), (60, 60, 0.5)), 0.2),
)


def _box(centre, half, rotation=None, grey=0.7) -> Primitive:
    return Primitive("box", np.asarray(centre, float), np.asarray(half, float),
                     np.eye(3) if rotation is None else rotation, np.full(3, grey))


def _ellipsoid(centre, semi_axes, rotation=None, grey=0.7) -> Primitive:
    return Primitive("ellipsoid", np.asarray(centre, float), np.asarray(semi_axes, float),
                     np.eye(3) if rotation is None else rotation, np.full(3, grey))


def _rod(start, end, radius, grey=0.7) -> Primitive:
    """A cylinder from ``start`` to ``end`` (3-vectors)."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    length = np.linalg.norm(axis)
    z = axis / length
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    rotation = np.stack([x, np.cross(z, x), z], 1)
    return Primitive("cylinder", (start + end) / 2, np.array([radius, radius, length / 2]), rotation,
                     np.full(3, grey))


def _wheel(x, y, radius, width, grey=0.35) -> Primitive:
    return Primitive("cylinder", np.array([x, y, radius]), np.array([radius, radius, width]), rotation_x(np.pi / 2),
                     np.full(3, grey))


def _animal(rng: np.random.Generator) -> list[Primitive]:
    length, width, height = rng.uniform(0.8, 1.2), rng.uniform(0.28, 0.4), rng.uniform(0.28, 0.38)
    leg, leg_r = rng.uniform(0.45, 0.8), rng.uniform(0.07, 0.11)
    grey = rng.uniform(0.55, 0.85)
    body_z = leg + 0.7 * height
    parts = [_ellipsoid([0, 0, body_z], [length, width, height], grey=grey)]
    for sx in (-0.65, 0.65):
        for sy in (-0.55, 0.55):
            parts.append(_rod([sx * length, sy * width, 0], [sx * length, sy * width, body_z], leg_r, grey))
    neck_top = [length * rng.uniform(1.0, 1.25), 0, body_z + rng.uniform(0.35, 0.7)]
    parts.append(_rod([0.75 * length, 0, body_z], neck_top, 0.12, grey))
    head = rng.uniform(0.22, 0.32)
    parts.append(_ellipsoid([neck_top[0] + 0.6 * head, 0, neck_top[2]], [head, 0.55 * head, 0.55 * head],
                            rotation_y(0.3), grey))
    for sy in (-1, 1):  # ears
        parts.append(_ellipsoid([neck_top[0], sy * 0.1, neck_top[2] + 0.6 * head], [0.05, 0.04, 0.1], grey=grey))
    tail_end = [-length * 1.5, 0, body_z - rng.uniform(-0.1, 0.4)]
    parts.append(_rod([-0.95 * length, 0, body_z + 0.2 * height], tail_end, 0.04, grey))
    return parts


def _human(rng: np.random.Generator) -> list[Primitive]:
    leg, torso, shoulders = rng.uniform(0.75, 0.95), rng.uniform(0.55, 0.7), rng.uniform(0.2, 0.28)
    grey = rng.uniform(0.55, 0.85)
    hip = leg + 0.05
    parts = []
    for sy in (-1, 1):
        parts.append(_rod([0, sy * 0.1, 0.05], [0, sy * 0.1, hip], 0.07, grey))
        parts.append(_box([0.08, sy * 0.1, 0.04], [0.13, 0.06, 0.04], grey=grey))  # feet point forward (+x)
    top = hip + torso
    parts.append(_box([0, 0, hip + torso / 2], [0.12, shoulders, torso / 2], grey=grey))
    parts.append(_ellipsoid([0, 0, top + 0.2], [0.14, 0.13, 0.17], grey=grey))
    parts.append(_ellipsoid([0.14, 0, top + 0.18], [0.05, 0.03, 0.04], grey=grey))  # nose
    # one arm hangs, the other reaches forward: the figure is not symmetric front to back
    reach = rng.uniform(0.5, 1.3)
    parts.append(_rod([0, shoulders + 0.06, top - 0.05], [0.05, shoulders + 0.1, top - 0.65], 0.06, grey))
    parts.append(_rod([0, -shoulders - 0.06, top - 0.05],
                      [0.6 * math.sin(reach), -shoulders - 0.1, top - 0.05 - 0.6 * math.cos(reach)], 0.06, grey))
    return parts


def _airplane(rng: np.random.Generator) -> list[Primitive]:
    length, span, sweep = rng.uniform(1.1, 1.5), rng.uniform(0.8, 1.2), rng.uniform(0.1, 0.6)
    grey = rng.uniform(0.6, 0.9)
    z = 0.35
    parts = [_ellipsoid([0, 0, z], [length, 0.15, 0.15], grey=grey)]
    for side in (-1, 1):
        parts.append(_box([-0.1 - 0.4 * sweep * span / 2, side * span / 2, z - 0.03], [0.22, span / 2, 0.025],
                          rotation_z(-side * sweep * 0.5), grey))
        parts.append(_box([-0.9 * length, side * 0.25, z + 0.02], [0.1, 0.25, 0.02], grey=grey))
        parts.append(_rod([0.15, side * span * 0.35, z - 0.12], [-0.2, side * span * 0.35, z - 0.12], 0.06, grey))
    parts.append(_box([-0.88 * length, 0, z + 0.22], [0.14, 0.02, 0.2], rotation_y(0.35), grey))  # fin
    return parts


def _truck(rng: np.random.Generator) -> list[Primitive]:
    length, width, cab = rng.uniform(1.1, 1.5), rng.uniform(0.38, 0.48), rng.uniform(0.25, 0.4)
    wheel = rng.uniform(0.14, 0.2)
    grey = rng.uniform(0.55, 0.85)
    deck = 2 * wheel + 0.05
    cargo = length * 2 - cab * 2 - 0.1
    parts = [
        _box([0, 0, deck - 0.03], [length, width * 0.9, 0.04], grey=0.4),
        _box([length - cab, 0, deck + 0.3], [cab, width, 0.3], grey=grey),  # cab at the front (+x)
        _box([length - 0.2 * cab, 0, deck + 0.1], [0.2 * cab, width * 0.95, 0.1], grey=grey),  # bonnet
        _box([-length + cargo / 2, 0, deck + rng.uniform(0.35, 0.5)], [cargo / 2, width, rng.uniform(0.35, 0.5)],
             grey=grey * 0.85),
    ]
    for x in (length - cab, -length + 0.3, -length + 0.3 + 2.2 * wheel):
        for side in (-1, 1):
            parts.append(_wheel(x, side * width, wheel, 0.06))
    return parts


def _car(rng: np.random.Generator) -> list[Primitive]:
    length, width, wheel = rng.uniform(0.9, 1.2), rng.uniform(0.38, 0.48), rng.uniform(0.13, 0.17)
    grey = rng.uniform(0.55, 0.85)
    body = wheel + 0.12
    cabin = rng.uniform(0.4, 0.55)
    parts = [
        _box([0, 0, body], [length, width, 0.13], grey=grey),
        # the cabin sits behind the middle and leans back: the car has a long bonnet and a short boot
        _box([-0.25 * length, 0, body + 0.25], [cabin, width * 0.85, 0.13], rotation_y(-0.12), grey),
        _box([length + 0.02, 0, body - 0.06], [0.03, width, 0.05], grey=0.4),  # bumper
    ]
    for x in (0.65 * length, -0.65 * length):
        for side in (-1, 1):
            parts.append(_wheel(x, side * width, wheel, 0.06))
    return parts


_NORB_BUILDERS = {"animal": _animal, "human": _human, "airplane": _airplane, "truck": _truck, "car": _car}


def norb_object(category: str, rng: np.random.Generator) -> list[Primitive]:
    """One instance of ``category``, its front along +x and up along +z, moved and scaled so that its bounding
    box is centred on the origin and fits in the unit sphere."""
    parts = _NORB_BUILDERS[category](rng)
    corners = np.concatenate([p.corners() for p in parts])
    centre = (corners.min(0) + corners.max(0)) / 2
    scale = 1.0 / np.linalg.norm(corners - centre, axis=1).max()
    return [Primitive(p.kind, (p.centre - centre) * scale, p.half_size * scale, p.rotation, p.colour, p.metal)
            for p in parts]


def norb_camera(elevation: int) -> Camera:
    """The camera at elevation index ``elevation`` (0..8): fixed in azimuth, at :data:`NORB_DISTANCE`."""
    return Camera(NORB_DISTANCE * _direction(0.0, float(NORB_ELEVATIONS[elevation])), np.zeros(3), NORB_FOV)


def render_norb(parts: Sequence[Primitive], azimuth: int, elevation: int, lighting: int, size: int = NORB_SIZE
                ) -> np.ndarray:
    """The object ``parts`` seen from azimuth index ``azimuth`` (0..17; the turntable turns the object by
    ``-NORB_AZIMUTHS[azimuth]``, so the camera sees it from that azimuth) and elevation index ``elevation``
    (0..8) under lighting condition ``lighting`` (0..5): (size, size) uint8."""
    turn = rotation_z(-math.radians(float(NORB_AZIMUTHS[azimuth])))
    turned = [Primitive(p.kind, turn @ p.centre, p.half_size, turn @ p.rotation, p.colour, p.metal) for p in parts]
    lights, ambient = NORB_LIGHTING[lighting]
    image, _ = render(norb_camera(elevation), turned, [Light(_direction(a, e), i) for a, e, i in lights], ambient,
                      np.full(3, NORB_BACKGROUND), size)
    return image[..., 0]


def draw_norb(count: int, seed: int) -> tuple[np.ndarray, Factors]:
    """``count`` smallNORB-like images from ``seed``: a fresh instance of a random category per image, with
    azimuth, elevation and lighting uniform at random. Factors: ``azimuth`` and ``elevation`` (the labels, as
    indices), ``category`` and ``lighting``."""
    rng = np.random.default_rng(seed)
    factors = {
        "category": rng.integers(0, len(NORB_CATEGORIES), count),
        "azimuth": rng.integers(0, len(NORB_AZIMUTHS), count),
        "elevation": rng.integers(0, len(NORB_ELEVATIONS), count),
        "lighting": rng.integers(0, len(NORB_LIGHTING), count),
    }
    images = []
    for i in range(count):
        parts = norb_object(NORB_CATEGORIES[factors["category"][i]], rng)
        images.append(render_norb(parts, int(factors["azimuth"][i]), int(factors["elevation"][i]),
                                  int(factors["lighting"][i])))
    return np.stack(images), factors


# ==========================================================================================================
# The tasks, their cache and the VTAB-1k splits
# ==========================================================================================================
@dataclass(frozen=True)
class StructuredTask:
    """One task of the suite. ``pool`` names the images it is drawn from (tasks with the same pool share images
    and differ in ``label``, the factor they predict); ``generator`` draws them, ``None`` for real data (elpv)."""

    name: str
    description: str
    class_names: tuple[str, ...]
    image_size: int
    pool: str
    label: str
    generator: Generator | None


TASKS: dict[str, StructuredTask] = {
    task.name: task
    for task in (
        StructuredTask("dsprites_location", "dSprites x position (32 values) in 16 bins", tuple(
            f"x{2 * b}-{2 * b + 1}" for b in range(DSPRITES_BINS)), DSPRITES_SIZE, "dsprites", "location",
            draw_dsprites),
        StructuredTask("dsprites_orientation", "dSprites orientation (40 angles over 360 deg) in 16 bins", tuple(
            f"{360 * math.ceil(b * 2.5) / 40:g}-{360 * (math.ceil((b + 1) * 2.5) - 1) / 40:g}deg"
            for b in range(DSPRITES_BINS)), DSPRITES_SIZE, "dsprites", "orientation_bin", draw_dsprites),
        StructuredTask("clevr_distance", "CLEVR-like scenes: depth of the nearest object in 6 bins",
                       CLEVR_DISTANCE_CLASSES, CLEVR_SIZE, "clevr", "distance", draw_clevr),
        StructuredTask("norb_azimuth", "smallNORB-like toys: camera azimuth (18 values, 20 deg apart)",
                       tuple(f"{a}deg" for a in NORB_AZIMUTHS), NORB_SIZE, "norb", "azimuth", draw_norb),
        StructuredTask("norb_elevation", "smallNORB-like toys: camera elevation (9 values, 30-70 deg)",
                       tuple(f"{e}deg" for e in NORB_ELEVATIONS), NORB_SIZE, "norb", "elevation", draw_norb),
        StructuredTask("elpv", "real electroluminescence images of solar cells: defect probability in 4 classes",
                       ("0", "1/3", "2/3", "1"), 300, "elpv", "defect", None),
    )
}

ELPV_INSTALL = "pip install elpv-dataset"
ELPV_SPLIT_SEED = 0


def _encode(images: np.ndarray) -> list[dict]:
    """uint8 images as PNG bytes for a ``datasets.Image`` column (grey (N, H, W) or RGB (N, H, W, 3))."""
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    return encoded


def _pool_split(images: np.ndarray, factors: Factors, labels: dict[str, Sequence[str]]) -> datasets.Dataset:
    """A dataset with ``image``, every label factor in ``labels`` as a ``ClassLabel`` and the other factors as
    numbers."""
    features = {"image": datasets.Image()}
    for key, values in factors.items():
        features[key] = (datasets.ClassLabel(names=list(labels[key])) if key in labels
                         else datasets.Value("float64" if np.issubdtype(values.dtype, np.floating) else "int64"))
    columns = {"image": _encode(images), **{key: values.tolist() for key, values in factors.items()}}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _pool_labels(pool: str) -> dict[str, tuple[str, ...]]:
    return {task.label: task.class_names for task in TASKS.values() if task.pool == pool}


def generate_pool(pool: str) -> datasets.DatasetDict:
    """Draw a generated pool afresh: ``"train"`` (:data:`TRAIN_SIZE` images from :data:`TRAIN_SEED`, the last
    :data:`VALIDATION_SIZE` of them the validation part) and ``"test"`` (:data:`TEST_SIZE` from
    :data:`TEST_SEED`)."""
    generator = next(task.generator for task in TASKS.values() if task.pool == pool)
    labels = _pool_labels(pool)
    return datasets.DatasetDict({
        "train": _pool_split(*generator(TRAIN_SIZE, TRAIN_SEED), labels),
        "test": _pool_split(*generator(TEST_SIZE, TEST_SEED), labels),
    })


def stratified_take(strata: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``count`` indices of ``strata`` (N,), each stratum represented in proportion (largest remainders
    round), drawn at random; sorted. (`peft_mimi.data.stratified_split_indices` rounds each class on its own, so its
    total can miss ``count`` by one or two.)"""
    values, sizes = np.unique(strata, return_counts=True)
    exact = sizes * count / len(strata)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact, kind="stable")[: count - quota.sum()]] += 1
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(strata == v), q, replace=False)
                                   for v, q in zip(values, quota)]))


def _elpv_pool() -> datasets.DatasetDict:
    """elpv's 2,624 images: 1,000 for training (800 then 200 for validation), the other 1,624 as the test set,
    every part stratified by defect class and cell type (mono- or polycrystalline)."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as err:
        raise ImportError(f"the 'elpv' task needs the elpv dataset, which is not installed: {ELPV_INSTALL} "
                          "(CC BY-NC-SA 4.0: for benchmarking, not shipped with peft_mimi)") from err
    images, probabilities, cell_types = load_dataset()
    factors = {"defect": np.rint(np.asarray(probabilities) * 3).astype(np.int64),
               "monocrystalline": (np.asarray(cell_types) == "mono").astype(np.int64)}
    strata = factors["defect"] * 2 + factors["monocrystalline"]
    rng = np.random.default_rng(ELPV_SPLIT_SEED)
    train = stratified_take(strata, TRAIN_SIZE, rng)
    validation = train[stratified_take(strata[train], VALIDATION_SIZE, rng)]
    train = np.concatenate([np.setdiff1d(train, validation), validation])
    test = np.setdiff1d(np.arange(len(strata)), train)
    labels = _pool_labels("elpv")

    def split(indices: np.ndarray) -> datasets.Dataset:
        return _pool_split(np.asarray(images)[indices], {k: v[indices] for k, v in factors.items()}, labels)

    return datasets.DatasetDict({"train": split(train), "test": split(test)})


def load_pool(pool: str) -> datasets.DatasetDict:
    """A pool's images and factors from the cache, generating (or, for elpv, reading) and saving it the first
    time."""
    path = cache_root() / f"{pool}-v{VERSION}"
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    data = _elpv_pool() if pool == "elpv" else generate_pool(pool)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    data.save_to_disk(str(temporary))
    try:
        temporary.rename(path)
    except OSError:  # another process saved the same pool first: keep its copy
        shutil.rmtree(temporary)
    return datasets.load_from_disk(str(path))


def load_task(name: str, *, validation: bool = False) -> datasets.DatasetDict:
    """Task ``name`` of :data:`TASKS` as ``"train"`` / ``"test"`` splits with columns ``image`` and ``label``.

    ``validation=False``: the 1,000 training images and the test set. ``validation=True``: the first 800 of the
    training images and the other 200 as ``"test"``, to choose hyperparameters on.
    """
    if name not in TASKS:
        raise KeyError(f"unknown structured task {name!r}; choose one of {', '.join(TASKS)}")
    task = TASKS[name]
    pool = load_pool(task.pool)
    train, test = pool["train"], pool["test"]
    if validation:
        fit = len(train) - VALIDATION_SIZE
        train, test = train.select(range(fit)), train.select(range(fit, len(train)))

    def only_label(split: datasets.Dataset) -> datasets.Dataset:
        return split.select_columns(["image", task.label]).rename_column(task.label, "label")

    return datasets.DatasetDict({"train": only_label(train), "test": only_label(test)})


# ==========================================================================================================
# Sample grids
# ==========================================================================================================
def write_samples(name: str, out_dir: Path, rows: int = 4, cols: int = 8) -> Path:
    """A ``rows`` x ``cols`` grid of the first training images of task ``name`` with their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = TASKS[name]
    train = load_task(name)["train"]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25))
    for i, ax in enumerate(axes.flat):
        example = train[i]
        ax.imshow(example["image"], cmap="gray", vmin=0, vmax=255)
        ax.set_title(task.class_names[example["label"]], fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{name}: {task.description}", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    grid = Image.open(buffer).convert("RGB")
    channels = np.asarray(grid)
    if (channels == channels[..., :1]).all():  # grey tasks: one channel, a third of the bytes
        grid = grid.convert("L")
    grid.save(path, optimize=True)
    return path


def class_counts(name: str) -> dict[str, list[int]]:
    """Examples per class of each split of task ``name``."""
    data = load_task(name)
    classes = len(TASKS[name].class_names)
    return {split: np.bincount(data[split]["label"], minlength=classes).tolist() for split in data}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--samples", action="store_true", help="write a sample grid per task")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "samples")
    args = parser.parse_args(argv)
    for name in args.tasks:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            counts = class_counts(name)  # generates and caches the pool the first time
        except ImportError as err:
            print(f"{name}: skipped ({err})", file=sys.stderr)
            continue
        print(f"{name} ({time.perf_counter() - wall:.1f} s, {time.process_time() - cpu:.1f} s CPU): " + "; ".join(
            f"{split} {sum(c)}: {c}" for split, c in counts.items()))
        if args.samples:
            print(f"  -> {write_samples(name, args.out)}")


if __name__ == "__main__":
    main()
