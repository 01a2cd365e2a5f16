"""Procedural "patients": the built-in dataset of the demo and the tests.

Each patient id deterministically yields its own anatomy: a body outline, several inner
structures with patient-specific shape, position, orientation, intensity and texture,
and a small patient-specific marker (like the side letters burnt into X-rays). Same id →
identical image; two ids → visibly different images. Rendered in continuous coordinates,
so one patient looks the same at any `spatial_size`, in 2D (a slice) or 3D (a volume).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from memwatch.datamodules.base import MedicalImageDataModule
from memwatch.errors import InputError


def _rotation(rng: np.random.Generator, spatial_dims: int) -> np.ndarray:
    if spatial_dims == 2:
        angle = rng.uniform(0, np.pi)
        return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def render_phantom(patient_id: str, spatial_size: Sequence[int], n_structures: int = 5) -> np.ndarray:
    """One patient's image, `[1, *spatial_size]` float32 in `[0, 1]`; a pure function of its arguments."""
    spatial_size = tuple(int(s) for s in spatial_size)
    dims = len(spatial_size)
    rng = np.random.default_rng(zlib.crc32(patient_id.encode()))
    axes = [np.linspace(-1.0, 1.0, s, dtype=np.float64) for s in spatial_size]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # [*spatial, dims]

    def ellipsoid(centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        local = (grid - centre) @ rotation
        return (np.sum((local / radii) ** 2, axis=-1) <= 1.0).astype(np.float64)

    image = np.zeros(spatial_size, dtype=np.float64)
    body_radii = rng.uniform(0.65, 0.9, size=dims)
    body = ellipsoid(rng.uniform(-0.05, 0.05, size=dims), body_radii, _rotation(rng, dims) if dims == 3 else np.eye(2))
    image += rng.uniform(0.15, 0.3) * body

    texture_sigma = [rng.uniform(0.03, 0.08) * s for s in spatial_size]
    for _ in range(n_structures):
        centre = rng.uniform(-0.5, 0.5, size=dims) * body_radii
        radii = rng.uniform(0.08, 0.35, size=dims)
        texture = gaussian_filter(rng.normal(size=spatial_size), sigma=texture_sigma)
        texture /= np.abs(texture).max() + 1e-8
        structure = ellipsoid(centre, radii, _rotation(rng, dims)) * body
        image = np.where(structure > 0, rng.uniform(0.35, 0.85) + 0.12 * texture, image)

    # Patient-specific marker: a 3×3 (×3) binary glyph in one corner, near full intensity.
    glyph = rng.random((3,) * dims) < 0.5
    glyph.flat[0] = True
    corner = rng.integers(0, 2, size=dims)
    cell = [max(1, round(0.05 * s)) for s in spatial_size]
    for index in zip(*np.nonzero(glyph), strict=True):
        lo = [
            (round(0.04 * s) + i * c) if k == 0 else (s - round(0.04 * s) - (3 - i) * c)
            for s, i, c, k in zip(spatial_size, index, cell, corner, strict=True)
        ]
        image[tuple(slice(a, a + c) for a, c in zip(lo, cell, strict=True))] = 0.95
    return np.clip(image, 0.0, 1.0).astype(np.float32)[None]


class PhantomDataModule(MedicalImageDataModule):
    """Procedural patients `phantom-0000`, `phantom-0001`, ... (one image per patient).

    Args:
        n_patients: number of patients; `val_fraction` of them are held out.
        n_structures: inner structures per patient.
        cache: phantoms are rendered once and kept in memory by default.
        spatial_size, batch_size, n_train, augment, ...: see `MedicalImageDataModule`.
    """

    def __init__(
        self,
        spatial_size: Sequence[int] = (32, 32),
        n_patients: int = 80,
        n_structures: int = 5,
        cache: Literal["none", "memory", "disk"] = "memory",
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_size=spatial_size, cache=cache, **kwargs)
        if n_patients < 2:
            raise InputError(f"n_patients={n_patients} must be at least 2 (one for training, one for validation)")
        self.n_patients = n_patients
        self.n_structures = n_structures

    def list_records(self) -> list[dict[str, Any]]:
        ids = [f"phantom-{i:04d}" for i in range(self.n_patients)]
        return [{"id": pid, "patient": pid} for pid in ids]

    def load_transforms(self) -> list[Callable]:
        def render(record: dict[str, Any]) -> dict[str, Any]:
            return {**record, "image": render_phantom(record["id"], self.spatial_size, self.n_structures)}

        return [render]
