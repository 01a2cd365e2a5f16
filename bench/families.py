"""Procedural image families beyond the phantoms, and planted-copy audit sets made from them.

Each family is a pure function `render_<family>(patient_id, spatial_size) -> [1, *spatial]`
float32 in `[0, 1]` (2D, or 3D for `knee` and `brain`: `family_spatial_dims`), seeded by the
family and the id: same id → identical image, two ids → visibly different images of one
family. None is made of ellipses like the phantoms:

- `vessels`: an angiogram-like tree of branching, tapering curves over a smooth background.
- `radiograph`: a chest-radiograph-like thorax: body, two lung fields crossed by curved ribs,
  spine, heart shadow and clavicles.
- `tissue`: a histology-like patch: a filtered-noise stroma with clusters of small nuclei.
- `knee` (3D): a knee-MRI-like sagittal stack: femur, tibia, fibula and patella with marrow
  and cortex, cartilage, menisci, tendons and ligaments, fat, muscle and joint fluid.
- `brain` (3D): a brain-MRI-like head: scalp, skull, folded cortex, white matter, ventricles,
  cerebellum, sometimes lesions.

`write_planted_copy_set` writes `train/`, `val/` and `synthetic/` folders (8-bit PNG in 2D,
float32 `.npy` volumes in 3D; one file per patient, or a folder of follow-up scans per patient,
as `FolderDataModule` and `cli.py audit` read them) where some synthetic images are varied
copies of training images and the rest are novel (new patients, or blends of two training
patients), and a `planted.json` that says which is which. `bench/detector_quality.py` scores
an embedder on it.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import AdjustContrast, Flip, Rotate, ShiftIntensity
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as scipy_shift
from scipy.special import expit

from memwatch.errors import InputError


def _rng(family: str, patient_id: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{family}/{patient_id}".encode()))


def _grid(spatial_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates in `[-1, 1]`, `[H, W]` each."""
    height, width = (int(s) for s in spatial_size)
    return np.meshgrid(np.linspace(-1.0, 1.0, height), np.linspace(-1.0, 1.0, width), indexing="ij")


def _smooth_noise(rng: np.random.Generator, spatial_size: Sequence[int], sigma_fraction: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to `[-1, 1]`, correlation length `sigma_fraction` of the image."""
    noise = gaussian_filter(rng.normal(size=tuple(spatial_size)), sigma=[sigma_fraction * s for s in spatial_size])
    return noise / (np.abs(noise).max() + 1e-8)


def _check_size(spatial_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(s) for s in spatial_size)
    if len(size) != 2 or min(size) < 8:
        raise InputError(f"spatial_size={list(size)} must be 2 sizes of at least 8: the families are 2D")
    return size  # type: ignore[return-value]


def _stroke(rows: np.ndarray, cols: np.ndarray, points: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Soft tube along a polyline: max over its points of exp(−d² / 2w²), `[H, W]` in `[0, 1]`.

    Each point touches only the pixels within 3 widths of it (the rest is below 1.2%).
    """
    row_axis, col_axis = rows[:, 0], cols[0]
    intensity = np.zeros(rows.shape)
    for (row, col), w in zip(points, widths, strict=True):
        r0, r1 = np.searchsorted(row_axis, [row - 3 * w, row + 3 * w])
        c0, c1 = np.searchsorted(col_axis, [col - 3 * w, col + 3 * w])
        if r0 >= r1 or c0 >= c1:
            continue
        squared = (row_axis[r0:r1, None] - row) ** 2 + (col_axis[None, c0:c1] - col) ** 2
        window = intensity[r0:r1, c0:c1]
        np.maximum(window, np.exp(-squared / (2 * w**2)), out=window)
    return intensity


def render_vessels(patient_id: str, spatial_size: Sequence[int]) -> np.ndarray:
    """An angiogram-like vessel tree, `[1, H, W]` float32 in `[0, 1]`; a pure function of its arguments.

    One to three roots enter from the border and grow as curves whose direction drifts
    smoothly; each segment tapers and splits into two at a patient-specific rate.
    """
    size = _check_size(spatial_size)
    rng = _rng("vessels", patient_id)
    rows, cols = _grid(size)
    step = 1.0 / max(size)
    points: list[np.ndarray] = []
    widths: list[float] = []
    split_rate = rng.uniform(0.04, 0.09)
    curl = rng.uniform(0.05, 0.18)

    def grow(position: np.ndarray, angle: float, width: float, depth: int) -> None:
        turn = rng.normal(0.0, curl)
        for _ in range(int(rng.uniform(20, 60) / (1 + 0.3 * depth))):
            turn = 0.8 * turn + rng.normal(0.0, curl)
            angle += turn * 0.5
            position = position + 2.5 * step * np.array([math.sin(angle), math.cos(angle)])
            if np.abs(position).max() > 1.1:
                return
            width *= 0.992
            points.append(position)
            widths.append(width)
            if depth < 5 and rng.random() < split_rate:
                spread = rng.uniform(0.35, 0.9)
                grow(position, angle + spread, width * 0.75, depth + 1)
                angle -= spread * rng.uniform(0.3, 0.8)
                width *= 0.85

    for _ in range(int(rng.integers(1, 4))):
        side = rng.uniform(0, 2 * math.pi)
        start = 0.95 * np.array([math.sin(side), math.cos(side)])
        grow(start, side + math.pi + rng.normal(0, 0.4), rng.uniform(0.03, 0.06), 0)
    background = 0.12 + 0.08 * _smooth_noise(rng, size, 0.25) + 0.1 * (rows * rng.uniform(-1, 1) + cols * rng.uniform(-1, 1))
    tree = _stroke(rows, cols, np.array(points), np.array(widths)) if points else np.zeros(size)
    image = background + rng.uniform(0.55, 0.8) * tree
    return np.clip(image, 0.0, 1.0).astype(np.float32)[None]


def render_radiograph(patient_id: str, spatial_size: Sequence[int]) -> np.ndarray:
    """A chest-radiograph-like thorax, `[1, H, W]` float32 in `[0, 1]`; a pure function of its arguments.

    Bright body with two dark lung fields (superellipse-like, bulging at the base), ribs as
    curved bright bands of patient-specific spacing, tilt and curvature, a spine, a heart
    shadow and two clavicles; a mottled lung texture.
    """
    size = _check_size(spatial_size)
    rng = _rng("radiograph", patient_id)
    rows, cols = _grid(size)
    body_width = rng.uniform(0.75, 0.95)
    body = expit((1 - np.abs(cols) ** 2.5 / body_width**2.5) * 12)
    image = 0.15 + 0.45 * body
    lungs = np.zeros(size)
    for side in (-1, 1):
        centre_col = side * rng.uniform(0.3, 0.45)
        half_width = rng.uniform(0.2, 0.3) * (1 + 0.35 * (rows + 1) / 2)
        top, bottom = rng.uniform(-0.85, -0.6), rng.uniform(0.5, 0.8)
        inside = (np.abs(cols - centre_col) / half_width) ** 3 + (np.abs(rows - (top + bottom) / 2) / ((bottom - top) / 2)) ** 4
        lungs = np.maximum(lungs, expit((1 - inside) * 8))
    texture = _smooth_noise(rng, size, 0.03)
    image = image - lungs * (rng.uniform(0.25, 0.35) + 0.06 * texture)
    spacing = rng.uniform(0.17, 0.24)
    tilt, curvature, thickness = rng.uniform(0.1, 0.45), rng.uniform(0.3, 0.8), rng.uniform(0.025, 0.045)
    first = rng.uniform(-0.85, -0.7)
    for k in range(10):
        level = first + k * spacing + rng.normal(0, 0.015)
        centre = level + tilt * np.abs(cols) + curvature * (np.abs(cols) - 0.5) ** 2
        image = image + rng.uniform(0.1, 0.18) * lungs * np.exp(-((rows - centre) ** 2) / (2 * thickness**2))
    spine_width = rng.uniform(0.06, 0.1)
    image = image + 0.22 * np.exp(-(cols**2) / (2 * spine_width**2)) * body
    heart_col, heart_row = rng.uniform(0.05, 0.2), rng.uniform(0.2, 0.45)
    heart = np.exp(-(((cols - heart_col) / rng.uniform(0.22, 0.32)) ** 2 + ((rows - heart_row) / rng.uniform(0.2, 0.3)) ** 2) ** 1.5)
    image = image + rng.uniform(0.2, 0.3) * heart * lungs.clip(0.3, 1.0)
    for side in (-1, 1):
        slope = rng.uniform(0.15, 0.35)
        line = rng.uniform(-0.8, -0.65) + slope * np.abs(cols) * side * np.sign(cols + 1e-9)
        clavicle = np.exp(-((rows - line) ** 2) / (2 * 0.03**2)) * (np.abs(cols) < rng.uniform(0.5, 0.7)) * (side * cols > 0)
        image = image + 0.15 * clavicle
    return np.clip(image, 0.0, 1.0).astype(np.float32)[None]


def render_tissue(patient_id: str, spatial_size: Sequence[int]) -> np.ndarray:
    """A histology-like tissue patch, `[1, H, W]` float32 in `[0, 1]`; a pure function of its arguments.

    A stroma of oriented filtered noise, darker gland lumina, and nuclei (small dark soft
    dots) clustered around patient-specific centres.
    """
    size = _check_size(spatial_size)
    rng = _rng("tissue", patient_id)
    rows, cols = _grid(size)
    height, width = size
    fibres = gaussian_filter(rng.normal(size=size), sigma=(rng.uniform(0.5, 1.5), rng.uniform(2.0, 4.0)) * np.array([height, width]) / 64)
    fibres = np.rot90(fibres, k=int(rng.integers(0, 4))) if height == width else fibres
    fibres /= np.abs(fibres).max() + 1e-8
    image = 0.7 + 0.12 * fibres + 0.08 * _smooth_noise(rng, size, 0.2)
    lumen_field = _smooth_noise(rng, size, rng.uniform(0.08, 0.14))
    image = np.where(lumen_field > rng.uniform(0.45, 0.65), 0.92, image)
    nuclei = np.zeros(size)
    for _ in range(int(rng.integers(3, 7))):
        centre, spread = rng.uniform(-0.8, 0.8, 2), rng.uniform(0.1, 0.35)
        for point in centre + rng.normal(0, spread, (int(rng.integers(10, 30)), 2)):
            radius = rng.uniform(0.025, 0.05)
            nuclei = np.maximum(nuclei, np.exp(-((rows - point[0]) ** 2 + (cols - point[1]) ** 2) / (2 * radius**2)))
    image = image - rng.uniform(0.45, 0.6) * nuclei
    return np.clip(image, 0.0, 1.0).astype(np.float32)[None]



def _check_size_3d(spatial_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(s) for s in spatial_size)
    if len(size) != 3 or min(size) < 8:
        raise InputError(f"spatial_size={list(size)} must be 3 sizes of at least 8: the family is 3D")
    return size  # type: ignore[return-value]


def _grid_3d(spatial_size: Sequence[int]) -> list[np.ndarray]:
    """Row, column and slice coordinates in `[-1, 1]`, shaped `[H, 1, 1]`, `[1, W, 1]`, `[1, 1, D]`."""
    return np.meshgrid(*(np.linspace(-1.0, 1.0, int(s)) for s in spatial_size), indexing="ij", sparse=True)


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    return u * math.cos(angle) - v * math.sin(angle), u * math.sin(angle) + v * math.cos(angle)


def _inside(distance: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of `distance < 0`, rising over about `edge`."""
    return expit(-distance / edge)


def _blend(image: np.ndarray, value: np.ndarray | float, weight: np.ndarray) -> np.ndarray:
    """`image` moved towards `value` by `weight` in `[0, 1]` (painting one tissue over the others)."""
    return image + (value - image) * weight


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union of two signed distances with a fillet of size `k` (polynomial smooth minimum)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1 - h)


def _ellipsoid(
    coords: Sequence[np.ndarray],
    centre: Sequence[float],
    radii: Sequence[float],
    powers: Sequence[float] = (2, 2, 2),
) -> np.ndarray:
    """Approximate signed distance to a superellipsoid (< 0 inside); a power above 2 flattens that axis."""
    q = sum((np.abs(x - x0) / a) ** p for x, x0, a, p in zip(coords, centre, radii, powers, strict=True))
    return (np.sqrt(q) - 1) * min(radii)


def _tube(coords: Sequence[np.ndarray], points: Sequence[Sequence[float]], radius: float) -> np.ndarray:
    """Signed distance to a tube of `radius` around a polyline of 3D points."""
    distance = None
    for start, end in zip(points[:-1], points[1:], strict=True):
        axis = np.subtract(end, start)
        offsets = [x - x0 for x, x0 in zip(coords, start, strict=True)]
        t = np.clip(sum(o * a for o, a in zip(offsets, axis, strict=True)) / float(axis @ axis), 0.0, 1.0)
        segment = np.sqrt(sum((o - t * a) ** 2 for o, a in zip(offsets, axis, strict=True)))
        distance = segment if distance is None else np.minimum(distance, segment)
    return distance - radius


def render_knee(patient_id: str, spatial_size: Sequence[int]) -> np.ndarray:
    """A knee-MRI-like sagittal stack, `[1, H, W, D]` float32 in `[0, 1]`; a pure function of its arguments.

    Rows run superior to inferior, columns anterior to posterior, slices medial to lateral (as
    MRNet's sagittal series). Proton-density-like contrast: femur with two rounded condyles and
    an intercondylar notch, tibia with a sloped plateau, fibula (lateral slices), patella, all
    with a dark cortex around bright textured marrow; cartilage bands on the joint surfaces,
    dark menisci, patellar and quadriceps tendons, cruciate and collateral ligaments as oblique
    dark bands, subcutaneous and Hoffa fat, striated muscle, joint fluid and a suprapatellar
    effusion. Flexion, tilt, bone sizes, slopes, thicknesses and textures are per patient; every
    structure is a 3D shape, so the slices change smoothly along D.
    """
    size = _check_size_3d(spatial_size)
    rng = _rng("knee", patient_id)
    r, c, s = _grid_3d(size)
    coords = (r, c, s)
    edge = 1.0 / max(size)
    joint = (rng.uniform(-0.05, 0.1), rng.uniform(-0.12, 0.06))
    tilt, flex = math.radians(rng.uniform(-8, 8)), math.radians(rng.uniform(-6, 18))
    tr, tc = _rotate(r - joint[0], c - joint[1], tilt)  # tibia frame, origin at the joint
    fr, fc = _rotate(tr, tc, flex)  # femur frame

    def image_point(u: float, v: float, w: float, femur: bool) -> tuple[float, float, float]:
        u, v = _rotate(u, v, -flex) if femur else (u, v)
        u, v = _rotate(u, v, -tilt)
        return u + joint[0], v + joint[1], w

    mid, gap = rng.uniform(-0.1, 0.1), rng.uniform(0.05, 0.09)
    irregular = 0.02 * _smooth_noise(rng, size, 0.12)
    # Femur: medial and lateral condyles (round in the sagittal plane), a distal block joining them in front
    # of the notch, a shaft widening into the metaphysis.
    radius_m, radius_l = rng.uniform(0.32, 0.4), rng.uniform(0.29, 0.36)
    slice_m, slice_l, half = (
        mid - rng.uniform(0.35, 0.5),
        mid + rng.uniform(0.3, 0.45),
        rng.uniform(0.22, 0.3),
    )
    back = rng.uniform(0.02, 0.12)
    width_s = (slice_l - slice_m) / 2 + half
    condyle_m = _ellipsoid(
        (fr, fc, s), (-gap / 2 - radius_m, back, slice_m), (radius_m, radius_m, half), (2, 2, 4)
    )
    condyle_l = _ellipsoid(
        (fr, fc, s), (-gap / 2 - radius_l, back, slice_l), (radius_l, radius_l, half), (2, 2, 4)
    )
    block = _ellipsoid(
        (fr, fc, s),
        (-gap / 2 - radius_m - 0.08, back - 0.12, mid),
        (radius_m, 0.8 * radius_m, width_s),
        (2, 2, 6),
    )
    flare = expit(
        (fr + gap / 2 + radius_m * rng.uniform(1.6, 2.2)) / 0.15
    )  # the metaphysis widens towards the condyles
    shaft_width = rng.uniform(0.19, 0.25) + rng.uniform(0.06, 0.14) * flare
    shaft_depth = 1.4 * shaft_width + (width_s - 1.4 * shaft_width) * flare
    shaft = np.maximum(
        (np.sqrt((fc / shaft_width) ** 2 + ((s - mid) / shaft_depth) ** 2) - 1) * shaft_width,
        fr + gap / 2 + radius_m,
    )
    femur = (
        _smooth_min(_smooth_min(condyle_m, condyle_l, 0.06), _smooth_min(block, shaft, 0.12), 0.06)
        + irregular
    )
    # Tibia: a flat-topped head under a sloped plateau, tuberosity, spines, a shaft; the fibula laterally.
    slope, head_half, head_height = rng.uniform(0.05, 0.2), rng.uniform(0.36, 0.46), rng.uniform(0.22, 0.3)
    centre_t = rng.uniform(-0.02, 0.08)
    plateau = gap / 2 + slope * (tc - centre_t)
    head = _ellipsoid(
        (tr - plateau, tc, s),
        (head_height, centre_t, mid),
        (head_height, head_half, 1.15 * width_s),
        (4, 4, 6),
    )
    tibial_shaft = np.maximum(
        (np.sqrt(((tc - centre_t - 0.04) / 0.19) ** 2 + ((s - mid) / 0.32) ** 2) - 1) * 0.19,
        gap / 2 + head_height - tr,
    )
    tuberosity = _ellipsoid(
        (tr, tc, s), (gap / 2 + 1.3 * head_height, centre_t - head_half + 0.05, mid), (0.12, 0.07, 0.25)
    )
    spines = _ellipsoid((tr, tc, s), (gap / 2, centre_t - 0.03, mid + 0.02), (0.06, 0.07, 0.15))
    tibia = (
        _smooth_min(_smooth_min(head, tibial_shaft, 0.1), np.minimum(tuberosity, spines), 0.05) + irregular
    )
    slice_f = min(slice_l + rng.uniform(0.15, 0.3), 0.85)
    col_f, top_f = centre_t + 0.8 * head_half, gap / 2 + rng.uniform(0.15, 0.25)
    fibula = _smooth_min(
        _ellipsoid((tr, tc, s), (top_f + 0.08, col_f, slice_f), (0.09, 0.09, 0.12)),
        np.maximum(np.sqrt((tc - col_f - 0.02) ** 2 + (s - slice_f) ** 2) - 0.05, top_f - tr),
        0.04,
    )
    # Patella: a pointed oval in front of the trochlea, higher or lower per patient.
    p_half, p_width = rng.uniform(0.2, 0.28), rng.uniform(0.09, 0.13)
    p_row, p_col = (
        -gap / 2 - radius_m - rng.uniform(0.0, 0.2),
        back - 0.12 - 0.8 * radius_m - p_width - rng.uniform(0.02, 0.06),
    )
    taper = 1 - 0.35 * np.clip((fr - p_row) / p_half, 0, 1)
    patella = (
        _ellipsoid((fr, fc / taper, s), (p_row, p_col / taper, mid), (p_half, p_width, 0.35), (2, 2, 4))
        + irregular
    )
    # Soft tissue: the leg, subcutaneous fat, fat in front of the knee and behind it, striated muscle.
    leg_col, leg_half = rng.uniform(0.0, 0.12), rng.uniform(0.75, 0.88) - 0.1 * tr
    leg = (
        np.sqrt(((tc - leg_col) / leg_half) ** 2 + ((s - mid) / rng.uniform(1.05, 1.35)) ** 2) - 1
    ) * leg_half
    leg = leg + 0.04 * _smooth_noise(rng, size, 0.2)
    fat_depth = rng.uniform(0.04, 0.14)
    fibres = gaussian_filter(rng.normal(size=size), sigma=(0.12 * size[0], 0.012 * size[1], 0.04 * size[2]))
    image = np.full(size, 0.02)
    muscle = rng.uniform(0.26, 0.36) + 0.06 * fibres / (np.abs(fibres).max() + 1e-8)
    image = image + _inside(leg + fat_depth, edge) * muscle
    fat_level = rng.uniform(0.75, 0.88)
    fat = _inside(leg, edge) - _inside(leg + fat_depth, edge)
    below_patella = _inside(p_row - p_half - fr, 0.05) * _inside(tr - gap / 2 - 1.3 * head_height, 0.05)
    front = below_patella * _inside(tc - (centre_t - 0.45 * head_half), 0.04) * _inside(leg, edge)
    popliteal = _inside(
        _ellipsoid((tr, tc, s), (0.0, centre_t + head_half + 0.15, mid), (0.3, 0.12, 0.5)) + irregular, edge
    )
    image = _blend(image, fat_level, np.clip(fat + front + 0.85 * popliteal, 0, 1))
    # Fluid: a thin film in the joint space, a suprapatellar pouch of per-patient size.
    effusion = rng.uniform(0, 1) ** 2
    pouch = _ellipsoid(
        (fr, fc, s),
        (p_row - p_half - 0.1, p_col + p_width + 0.03, mid),
        (0.1 + 0.2 * effusion, 0.02 + 0.04 * effusion, 0.35),
    )
    film = np.maximum(femur, tibia) < gap + 0.02
    image = _blend(
        image,
        0.95,
        np.clip(_inside(pouch, edge) + 0.8 * film * _inside(np.abs(tc - centre_t) - head_half, edge), 0, 1),
    )
    # Bones: bright marrow of per-patient texture inside a dark cortex; cartilage bands on the joint surfaces.
    grain = _smooth_noise(rng, size, rng.uniform(0.015, 0.035))
    marrow = rng.uniform(0.7, 0.82) + rng.uniform(0.06, 0.14) * grain
    cortex, cartilage_depth = rng.uniform(0.015, 0.035), rng.uniform(0.025, 0.045)
    cartilage = np.zeros(size)
    for bone, joint_side in (
        (femur, expit((fr + gap / 2 + radius_m + 0.1) / 0.04)),
        (tibia, expit((plateau + 0.05 - tr) / 0.03)),
        (patella, expit((fc - p_col) / 0.02)),
    ):
        cartilage = np.maximum(
            cartilage, (_inside(bone - cartilage_depth, edge) - _inside(bone, edge)) * joint_side
        )
    image = _blend(image, rng.uniform(0.5, 0.6), cartilage)
    for bone in (femur, tibia, fibula, patella):
        image = _blend(image, 0.08, _inside(bone, edge))
        image = _blend(image, marrow, _inside(bone + cortex, edge))
    # Dark bands: menisci at the horns of both compartments, tendons and ligaments.
    dark = np.zeros(size)
    for compartment in (slice_m, slice_l):
        for side in (-1, 1):
            horn = (gap / 2 - 0.01, centre_t + side * 0.7 * head_half, compartment)
            dark = np.maximum(dark, _inside(_ellipsoid((tr, tc, s), horn, (0.035, 0.1, half)), edge))
    tendon = rng.uniform(0.025, 0.04)
    bands = [
        (
            [
                image_point(p_row + 0.85 * p_half, p_col, mid, True),
                image_point(gap / 2 + 1.3 * head_height, centre_t - head_half, mid, False),
            ],
            tendon,
        ),
        (
            [
                image_point(p_row - 0.9 * p_half, p_col + 0.02, mid, True),
                image_point(p_row - 1.2, p_col + 0.1, mid, True),
            ],
            tendon + 0.01,
        ),
        (
            [
                image_point(-gap / 2 - 0.25, back + 0.2, mid + 0.1, True),
                image_point(gap / 2, centre_t - 0.1, mid + 0.03, False),
            ],
            0.03,
        ),
        (
            [
                image_point(-gap / 2 - 0.3, back - 0.05, mid - 0.08, True),
                image_point(-gap / 2 - 0.05, back + 0.12, mid - 0.06, True),
                image_point(gap / 2 + 0.14, centre_t + 0.8 * head_half, mid - 0.04, False),
            ],
            0.04,
        ),
        (
            [
                image_point(-gap / 2 - 0.3, back, slice_m - half, True),
                image_point(gap / 2 + 0.35, centre_t, slice_m - half, False),
            ],
            0.03,
        ),
        (
            [
                image_point(-gap / 2 - 0.2, back + 0.05, slice_l + half, True),
                image_point(top_f + 0.08, col_f, slice_f, False),
            ],
            0.03,
        ),
    ]
    for points, radius in bands:
        dark = np.maximum(dark, _inside(_tube(coords, points, radius), edge))
    image = _blend(image, 0.06, dark)
    coil = 1 + 0.12 * _smooth_noise(rng, size, 0.3) - 0.1 * tc
    return np.clip(image * coil, 0.0, 1.0).astype(np.float32)[None]


def render_brain(patient_id: str, spatial_size: Sequence[int]) -> np.ndarray:
    """A brain-MRI-like head, `[1, H, W, D]` float32 in `[0, 1]`; a pure function of its arguments.

    Axial slices along D (inferior to superior), rows anterior to posterior, columns right to
    left; T1-like contrast. Scalp, skull with diploë, a CSF rim, a cortical ribbon folded into
    gyri and sulci (the folds are the level sets of smooth noise), white matter reaching into
    the gyri, an interhemispheric fissure, lateral ventricles of per-patient size, curvature and
    asymmetry, a third ventricle, deep grey nuclei, a foliated cerebellum, and in some patients
    dark white-matter lesions of irregular outline.
    """
    size = _check_size_3d(spatial_size)
    rng = _rng("brain", patient_id)
    r, c, s = _grid_3d(size)
    edge = 1.0 / max(size)
    pitch, yaw = math.radians(rng.uniform(-8, 8)), math.radians(rng.uniform(-6, 6))
    centre = (rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04), rng.uniform(-0.2, -0.05))
    r, s = _rotate(r - centre[0], s - centre[2], pitch)
    r, c = _rotate(r, c - centre[1], yaw)  # head frame, origin at the head's centre
    coords = (r, c, s)
    radii = (rng.uniform(0.8, 0.92), rng.uniform(0.66, 0.8), rng.uniform(1.0, 1.15))
    head = (
        _ellipsoid(coords, (0, 0, 0), radii)
        + 0.03 * _smooth_noise(rng, size, 0.3)
        - 0.04 * np.clip(r, 0, None)
    )
    scalp, skull, csf = rng.uniform(0.04, 0.07), rng.uniform(0.04, 0.07), rng.uniform(0.015, 0.03)
    depth = -(head + scalp + skull + csf)  # depth below the brain's surface, positive inside
    image = 0.6 * _inside(head, edge) + 0.2 * _inside(head + 0.015, edge)
    image = _blend(image, 0.05, _inside(head + scalp, edge))
    image = _blend(
        image, 0.25, _inside(head + scalp + 0.4 * skull, edge) - _inside(head + scalp + 0.6 * skull, edge)
    )
    fluid = rng.uniform(0.1, 0.15)
    image = _blend(image, fluid, _inside(head + scalp + skull, edge))
    grey, white = rng.uniform(0.42, 0.52), rng.uniform(0.68, 0.78)
    folds = _smooth_noise(rng, size, rng.uniform(0.025, 0.035))
    folds = np.abs(folds) / (folds.std() + 1e-8)  # sulci run along the zero level set, gyri between them
    sulcus_depth, ribbon = rng.uniform(0.15, 0.22), rng.uniform(0.03, 0.05)
    sulcus_width, grey_width = rng.uniform(0.15, 0.25), rng.uniform(0.35, 0.55)
    sulci = expit((sulcus_width - folds) / 0.05) * _inside(depth - sulcus_depth, 2 * edge)
    grey_matter = np.maximum(
        expit((sulcus_width + grey_width - folds) / 0.05) * _inside(depth - sulcus_depth - ribbon, 2 * edge),
        _inside(depth - ribbon, edge),
    )
    white_matter = 1 - grey_matter
    tissue = grey + (white - grey) * white_matter + 0.02 * _smooth_noise(rng, size, 0.05)
    image = _blend(_blend(image, tissue, _inside(-depth, edge)), fluid, sulci * _inside(-depth, edge))
    midline = 0.03 * np.sin(3 * r + rng.uniform(0, 2 * math.pi))
    fissure = (np.abs(c - midline) < 0.02) & ((s > 0.35) | (np.abs(r) > 0.45)) & (depth > 0)
    image = np.where(fissure, fluid, image)
    # Ventricles: two curved horns diverging backwards, sized per patient (atrophy), a midline slit below.
    scale, level, bend = math.exp(rng.uniform(-0.5, 0.6)), rng.uniform(0.15, 0.3), rng.uniform(0.3, 0.8)
    ventricles = _ellipsoid(coords, (0.05, 0, level - 0.25), (0.14, 0.02 * scale, 0.08))
    for side in (-1, 1):
        spread = 0.06 * scale + 0.15 * np.clip(r, 0, None)
        horn = _ellipsoid(
            (r, c - side * spread, s - level + bend * r**2),
            (rng.uniform(-0.05, 0.05), 0, 0),
            (rng.uniform(0.35, 0.45), 0.045 * scale * rng.uniform(0.85, 1.15), 0.06 * scale),
            (4, 2, 2),
        )
        ventricles = np.minimum(ventricles, horn)
        nuclei = _ellipsoid(coords, (0.02, side * 0.2, level - 0.2), (0.16, 0.08, 0.12))
        image = _blend(image, grey + 0.05, _inside(nuclei, 2 * edge) * (depth > 0))
    image = _blend(image, 0.12, _inside(ventricles + 0.01 * _smooth_noise(rng, size, 0.1), edge))
    # Cerebellum: below and behind, folia as thin layers; separated by the dark tentorium.
    cerebellum = _ellipsoid(coords, (0.45, 0, -0.62), (0.32, 0.55, 0.3))
    folia = 0.5 + 0.5 * np.sin(
        70 * cerebellum + 3 * _smooth_noise(rng, size, 0.08)
    )  # layers parallel to its surface
    image = _blend(
        image, grey + (white - grey) * 0.6 * folia, _inside(cerebellum, edge) * _inside(-depth, edge)
    )
    image = _blend(image, 0.1, _inside(np.abs(cerebellum) - 0.01, edge) * (depth > 0))
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.6 else 0):
        spot = (
            rng.uniform(-0.35, 0.35),
            rng.choice([-1, 1]) * rng.uniform(0.12, 0.3),
            level + rng.uniform(-0.05, 0.25),
        )
        lesion = _ellipsoid(coords, spot, rng.uniform(0.04, 0.1, 3)) + 0.03 * _smooth_noise(rng, size, 0.04)
        image = _blend(image, rng.uniform(0.25, 0.4), _inside(lesion, edge) * white_matter)
    bias = 1 + 0.12 * _smooth_noise(rng, size, 0.35)
    return np.clip(image * bias, 0.0, 1.0).astype(np.float32)[None]


FAMILIES: dict[str, Callable[[str, Sequence[int]], np.ndarray]] = {
    "vessels": render_vessels,
    "radiograph": render_radiograph,
    "tissue": render_tissue,
    "knee": render_knee,
    "brain": render_brain,
}
SPATIAL_DIMS = {"vessels": 2, "radiograph": 2, "tissue": 2, "knee": 3, "brain": 3}
DEFAULT_SIZE = {2: (64, 64), 3: (64, 64, 32)}
NOVEL_KINDS = ("new", "blend")


def family_spatial_dims(family: str) -> int:
    """2 or 3: the number of spatial axes of `family`'s images; `InputError` for an unknown family."""
    if family not in FAMILIES:
        raise InputError(f"family={family!r} is not one of {sorted(FAMILIES)}: pick one of them")
    return SPATIAL_DIMS[family]


def render(family: str, patient_id: str, spatial_size: Sequence[int]) -> np.ndarray:
    """`render_<family>(patient_id, spatial_size)`; `InputError`: an unknown family, a size of other dims."""
    dims = family_spatial_dims(family)
    if len(spatial_size) != dims:
        axes = "(H, W)" if dims == 2 else "(H, W, D)"
        raise InputError(
            f"spatial_size={[int(s) for s in spatial_size]} has {len(spatial_size)} sizes, but family "
            f"{family!r} is {dims}D: give {dims} sizes {axes}"
        )
    return FAMILIES[family](patient_id, spatial_size)


PLANES = ((0, 1), (0, 2), (1, 2))  # rotation planes of a volume, as pairs of spatial axes


def _rotation(
    image: torch.Tensor, degrees: float, plane: tuple[int, int] | None, padding: str = "zeros"
) -> torch.Tensor:
    """`image` rotated by `degrees` (2D), or in `plane` of a volume (MONAI's angle k turns the others)."""
    if plane is None:
        return Rotate(angle=math.radians(degrees), padding_mode=padding)(image)
    angle = [0.0, 0.0, 0.0]
    angle[3 - sum(plane)] = math.radians(degrees)
    return Rotate(angle=tuple(angle), padding_mode=padding)(image)


def planted_variation(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    rotation_degrees: float = 5.0,
    contrast_gamma: tuple[float, float] = (0.8, 1.25),
    brightness: float = 0.08,
    noise_std: float = 0.02,
) -> tuple[np.ndarray, dict[str, float | list[int]]]:
    """A copy of `image` `[1, H, W]` or `[1, H, W, D]`: flipped, rotated, another contrast, noised.

    Flip along a random spatial axis; rotation uniform in ±`rotation_degrees` (of a volume: in a
    random one of its three axis planes, `rotation_plane`), gamma log-uniform in
    `contrast_gamma`, brightness offset uniform in ±`brightness`, Gaussian noise of std
    `noise_std`; clipped to `[0, 1]`. Returns the copy and the drawn parameters. A 2D image
    draws exactly as before volumes were supported.
    """
    dims = image.ndim - 1
    drawn: dict[str, float | list[int]] = {
        "flip_axis": int(rng.integers(0, dims)),
        "rotation_degrees": float(rng.uniform(-rotation_degrees, rotation_degrees)),
    }
    plane = PLANES[int(rng.integers(0, 3))] if dims == 3 else None
    if plane is not None:
        drawn["rotation_plane"] = list(plane)
    drawn["gamma"] = float(np.exp(rng.uniform(*np.log(contrast_gamma))))
    drawn["brightness"] = float(rng.uniform(-brightness, brightness))
    copy = Flip(spatial_axis=drawn["flip_axis"])(torch.from_numpy(image))
    copy = _rotation(copy, drawn["rotation_degrees"], plane)
    copy = AdjustContrast(gamma=drawn["gamma"])(copy)
    copy = ShiftIntensity(offset=drawn["brightness"])(copy)
    copy = np.asarray(copy, dtype=np.float64) + rng.normal(0.0, noise_std, image.shape)
    return np.clip(copy, 0.0, 1.0).astype(np.float32), drawn


def follow_up(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    shift: float = 0.03,
    rotation_degrees: float = 3.0,
    contrast_gamma: tuple[float, float] = (0.9, 1.1),
    brightness: float = 0.03,
    noise_std: float = 0.015,
) -> np.ndarray:
    """A repeat scan of the patient of `image` `[1, *spatial]`: moved, slightly other contrast, new noise.

    Translation uniform in ±`shift` of the size along each axis, rotation uniform in
    ±`rotation_degrees` (of a volume: in a random axis plane), gamma log-uniform in
    `contrast_gamma`, brightness offset uniform in ±`brightness`, Gaussian noise of std
    `noise_std`; no flip; clipped to `[0, 1]`.
    """
    spatial = image.shape[1:]
    offsets = [rng.uniform(-shift, shift) * n for n in spatial]
    degrees = rng.uniform(-rotation_degrees, rotation_degrees)
    plane = PLANES[int(rng.integers(0, 3))] if len(spatial) == 3 else None
    gamma = float(np.exp(rng.uniform(*np.log(contrast_gamma))))
    # What enters the field of view is the border continued (a scanner sees more of the body), not black.
    scan = scipy_shift(image, [0.0, *offsets], order=1, mode="nearest")
    scan = _rotation(torch.from_numpy(scan.astype(np.float32)), degrees, plane, padding="border")
    scan = AdjustContrast(gamma=gamma)(scan)
    scan = ShiftIntensity(offset=rng.uniform(-brightness, brightness))(scan)
    scan = np.asarray(scan, dtype=np.float64) + rng.normal(0.0, noise_std, image.shape)
    return np.clip(scan, 0.0, 1.0).astype(np.float32)


def save_png(path: Path, image: np.ndarray) -> None:
    """An image `[1, H, W]` in `[0, 1]` as an 8-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8)).save(path)


def save_image(path: Path, image: np.ndarray) -> Path:
    """`image` `[1, *spatial]` at `path` + extension: 2D as 8-bit PNG, 3D as float32 `.npy` `[H, W, D]`."""
    if image.ndim == 3:
        save_png(path.with_name(path.name + ".png"), image)
        return path.with_name(path.name + ".png")
    path = path.with_name(path.name + ".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, image[0].astype(np.float32))
    return path


def write_planted_copy_set(
    root: str | Path,
    family: str,
    *,
    n_train: int = 256,
    n_val: int = 128,
    n_copies: int = 64,
    n_novel: int = 128,
    spatial_size: Sequence[int] | None = None,
    seed: int = 0,
    images_per_patient: int | tuple[int, int] = 1,
    novel: str = "new",
) -> dict:
    """Write `root/{train,val,synthetic}/` images and `root/planted.json`; returns what `planted.json` holds.

    `train/` holds `n_train` patients, `val/` `n_val` others; `synthetic/` holds `n_copies`
    copies (`planted_variation`) of one image each of training patients drawn without
    replacement, and `n_novel` novel images, each given a variation too, so that a copy cannot
    be told apart by its processing alone. `novel="new"`: each is one image of a novel patient
    of the family; `"blend"`: each is the pixel mean of the first images of two different
    training patients, near both and a copy of neither. Synthetic files are named `syn_NNNN` in
    shuffled order. 2D images are 8-bit PNGs, 3D ones float32 `.npy` `[H, W, D]`;
    `spatial_size` defaults to `DEFAULT_SIZE` of the family's dimensionality.

    `images_per_patient` (a number, or an inclusive range drawn per patient): with one, each
    patient is a file `<split>/<patient>.<ext>`; otherwise each patient is a folder
    `<split>/<patient>/visit_<k>.<ext>` (k from 1) whose first visit is the rendered image and
    whose others are its `follow_up`s. The image ids are as `FolderDataModule` names them.

    `planted.json`: `{family, seed, spatial_size, copies: {synthetic_id: train_image_id},
    novel: [synthetic_id, ...], variations: {synthetic_id: drawn}, copy_patients:
    {synthetic_id: patient}, images_per_patient, novel_kind, spatial_dims}`, plus
    `blend_sources: {synthetic_id: [patient_a, patient_b]}` for blends.
    """
    root = Path(root)
    dims = family_spatial_dims(family)
    spatial_size = [int(s) for s in (spatial_size if spatial_size is not None else DEFAULT_SIZE[dims])]
    render(
        family, "size-check", spatial_size
    )  # a size of other dimensionality fails before anything is written
    for name, value, least in (
        ("n_train", n_train, 2),
        ("n_val", n_val, 2),
        ("n_copies", n_copies, 1),
        ("n_novel", n_novel, 1),
    ):
        if value < least:
            raise InputError(f"{name}={value} must be at least {least}")
    if n_copies > n_train:
        raise InputError(
            f"n_copies={n_copies} must be at most n_train={n_train} (one copy per training patient)"
        )
    if novel not in NOVEL_KINDS:
        raise InputError(f"novel={novel!r} must be one of {list(NOVEL_KINDS)}")
    fewest, most = (
        (images_per_patient, images_per_patient)
        if isinstance(images_per_patient, int)
        else images_per_patient
    )
    if not 1 <= fewest <= most:
        raise InputError(
            f"images_per_patient={images_per_patient!r} must be a number of at least 1 or a range "
            "(fewest, most) with 1 <= fewest <= most"
        )
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} is not empty: pass a new folder for the planted-copy set")
    # `rng` draws exactly what it drew before there were visits and blends (which draw from `extra`), so
    # one-image sets stay byte for byte as they were.
    rng, extra = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    train_ids = [f"{family}-{seed}-{i:05d}" for i in range(n_train)]
    val_ids = [f"{family}-{seed}-{i:05d}" for i in range(n_train, n_train + n_val)]
    novel_ids = [f"{family}-{seed}-{i:05d}" for i in range(n_train + n_val, n_train + n_val + n_novel)]
    visits = {patient: int(extra.integers(fewest, most + 1)) for patient in train_ids + val_ids}
    sources = [train_ids[i] for i in rng.choice(n_train, size=n_copies, replace=False)]
    order = rng.permutation(n_copies + n_novel)
    copied_visit = {patient: int(extra.integers(0, visits[patient])) for patient in sources}
    blends = (
        [[train_ids[i] for i in extra.choice(n_train, size=2, replace=False)] for _ in novel_ids]
        if novel == "blend"
        else []
    )
    needed = {(patient, copied_visit[patient]) for patient in sources} | {
        (patient, 0) for pair in blends for patient in pair
    }

    def image_id(patient: str, visit: int) -> str:
        return patient if most == 1 else f"{patient}/visit_{visit + 1}"

    kept = {}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for patient in ids:
            first = render(family, patient, spatial_size)
            for visit in range(visits[patient]):
                image = first if visit == 0 else follow_up(first, extra)
                if (patient, visit) in needed:
                    kept[patient, visit] = image
                save_image(root / split / image_id(patient, visit), image)
    copies, copy_patients, blend_sources, novel_synthetic, variations = {}, {}, {}, [], {}
    originals = [(patient, copied_visit[patient]) for patient in sources] + [
        (patient, None) for patient in novel_ids
    ]
    for k, (slot, (patient, visit)) in enumerate(zip(order, originals, strict=True)):
        synthetic_id = f"syn_{int(slot):04d}"
        if visit is not None:
            original = kept[patient, visit]
            copies[synthetic_id], copy_patients[synthetic_id] = image_id(patient, visit), patient
        elif novel == "blend":
            pair = blends[k - n_copies]
            original = (kept[pair[0], 0] + kept[pair[1], 0]) / 2
            blend_sources[synthetic_id] = pair
            novel_synthetic.append(synthetic_id)
        else:
            original = render(family, patient, spatial_size)
            novel_synthetic.append(synthetic_id)
        image, variations[synthetic_id] = planted_variation(original, rng)
        save_image(root / "synthetic" / synthetic_id, image)
    planted = {
        "family": family,
        "seed": seed,
        "spatial_size": spatial_size,
        "copies": dict(sorted(copies.items())),
        "novel": sorted(novel_synthetic),
        "variations": dict(sorted(variations.items())),
        "copy_patients": dict(sorted(copy_patients.items())),
        "images_per_patient": images_per_patient if isinstance(images_per_patient, int) else [fewest, most],
        "novel_kind": novel,
        "spatial_dims": dims,
    }
    if novel == "blend":
        planted["blend_sources"] = dict(sorted(blend_sources.items()))
    (root / "planted.json").write_text(json.dumps(planted, indent=1))
    return planted
