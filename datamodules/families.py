"""Procedural image families beyond the phantoms, and planted-copy audit sets made from them.

Each family is a pure function `render_<family>(patient_id, spatial_size) -> [1, *spatial]`
float32 in `[0, 1]` (2D), seeded by the id: same id → identical image, two ids → visibly
different images of one family. None is made of ellipses like the phantoms:

- `vessels`: an angiogram-like tree of branching, tapering curves over a smooth background.
- `radiograph`: a chest-radiograph-like thorax: body, two lung fields crossed by curved ribs,
  spine, heart shadow and clavicles.
- `tissue`: a histology-like patch: a filtered-noise stroma with clusters of small nuclei.

`write_planted_copy_set` writes `train/`, `val/` and `synthetic/` folders (8-bit PNG, one
file per patient, as `FolderDataModule` and `cli.py audit` read them) where some synthetic
images are varied copies of training patients and the rest are novel patients, and a
`planted.json` that says which is which. `bench/detector_quality.py` scores an embedder on it.
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
from scipy.special import expit

from errors import InputError


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


FAMILIES: dict[str, Callable[[str, Sequence[int]], np.ndarray]] = {
    "vessels": render_vessels,
    "radiograph": render_radiograph,
    "tissue": render_tissue,
}


def render(family: str, patient_id: str, spatial_size: Sequence[int]) -> np.ndarray:
    """`render_<family>(patient_id, spatial_size)`; `InputError` for an unknown family."""
    if family not in FAMILIES:
        raise InputError(f"family={family!r} is not one of {sorted(FAMILIES)}: pick one of them")
    return FAMILIES[family](patient_id, spatial_size)


def planted_variation(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    rotation_degrees: float = 5.0,
    contrast_gamma: tuple[float, float] = (0.8, 1.25),
    brightness: float = 0.08,
    noise_std: float = 0.02,
) -> tuple[np.ndarray, dict[str, float]]:
    """A copy of `image` `[1, H, W]`: always flipped (a random axis), rotated, contrast- and brightness-changed, noised.

    Rotation uniform in ±`rotation_degrees`, gamma log-uniform in `contrast_gamma`, brightness
    offset uniform in ±`brightness`, Gaussian noise of std `noise_std`; clipped to `[0, 1]`.
    Returns the copy and the drawn parameters.
    """
    drawn = {
        "flip_axis": int(rng.integers(0, 2)),
        "rotation_degrees": float(rng.uniform(-rotation_degrees, rotation_degrees)),
        "gamma": float(np.exp(rng.uniform(*np.log(contrast_gamma)))),
        "brightness": float(rng.uniform(-brightness, brightness)),
    }
    copy = Flip(spatial_axis=drawn["flip_axis"])(torch.from_numpy(image))
    copy = Rotate(angle=math.radians(drawn["rotation_degrees"]), padding_mode="zeros")(copy)
    copy = AdjustContrast(gamma=drawn["gamma"])(copy)
    copy = ShiftIntensity(offset=drawn["brightness"])(copy)
    copy = np.asarray(copy, dtype=np.float64) + rng.normal(0.0, noise_std, image.shape)
    return np.clip(copy, 0.0, 1.0).astype(np.float32), drawn


def save_png(path: Path, image: np.ndarray) -> None:
    """An image `[1, H, W]` in `[0, 1]` as an 8-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8)).save(path)


def write_planted_copy_set(
    root: str | Path,
    family: str,
    *,
    n_train: int = 256,
    n_val: int = 128,
    n_copies: int = 64,
    n_novel: int = 128,
    spatial_size: Sequence[int] = (64, 64),
    seed: int = 0,
) -> dict:
    """Write `root/{train,val,synthetic}/*.png` and `root/planted.json`; returns what `planted.json` holds.

    `train/` holds `n_train` patients, `val/` `n_val` others; `synthetic/` holds `n_copies`
    copies (`planted_variation`) of training patients drawn without replacement, and
    `n_novel` novel patients of the same family (rendered like the others, then given a
    variation too, so that a copy cannot be told apart by its processing alone). Synthetic
    files are named `syn_NNNN` in shuffled order. `planted.json`: `{family, seed, spatial_size,
    copies: {synthetic_id: train_id}, novel: [synthetic_id, ...], variations: {synthetic_id: drawn}}`.
    """
    root = Path(root)
    for name, value, least in (("n_train", n_train, 2), ("n_val", n_val, 2), ("n_copies", n_copies, 1), ("n_novel", n_novel, 1)):
        if value < least:
            raise InputError(f"{name}={value} must be at least {least}")
    if n_copies > n_train:
        raise InputError(f"n_copies={n_copies} must be at most n_train={n_train} (one copy per training patient)")
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} is not empty: pass a new folder for the planted-copy set")
    rng = np.random.default_rng(seed)
    train_ids = [f"{family}-{seed}-{i:05d}" for i in range(n_train)]
    val_ids = [f"{family}-{seed}-{i:05d}" for i in range(n_train, n_train + n_val)]
    novel_ids = [f"{family}-{seed}-{i:05d}" for i in range(n_train + n_val, n_train + n_val + n_novel)]
    train_images = {}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for patient in ids:
            image = render(family, patient, spatial_size)
            if split == "train":
                train_images[patient] = image
            save_png(root / split / f"{patient}.png", image)
    sources = [train_ids[i] for i in rng.choice(n_train, size=n_copies, replace=False)]
    order = rng.permutation(n_copies + n_novel)
    copies, novel, variations = {}, [], {}
    for slot, source in zip(order, sources + novel_ids, strict=True):
        synthetic_id = f"syn_{int(slot):04d}"
        original = train_images[source] if source in train_images else render(family, source, spatial_size)
        image, variations[synthetic_id] = planted_variation(original, rng)
        save_png(root / "synthetic" / f"{synthetic_id}.png", image)
        if source in train_images:
            copies[synthetic_id] = source
        else:
            novel.append(synthetic_id)
    planted = {
        "family": family,
        "seed": seed,
        "spatial_size": [int(s) for s in spatial_size],
        "copies": dict(sorted(copies.items())),
        "novel": sorted(novel),
        "variations": dict(sorted(variations.items())),
    }
    (root / "planted.json").write_text(json.dumps(planted, indent=1))
    return planted
