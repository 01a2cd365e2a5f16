"""The paper's "variation" v: the small changes under which a synthetic image still counts as a copy.

The embedder is trained to map an image and its variation to the same point (they are
each other's positive pair), and tests build "copies" of training images with it. A
variation flips each spatial axis (p=0.5), rotates within ±5° per axis (p=0.5), changes
the contrast slightly and adds a little noise (Dar et al., arXiv 2402.01054, §Methods).
The self-check's positives are variations of training images (`variation_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandRotate,
    ScaleIntensityRange,
)
from monai.utils import convert_to_tensor

from memwatch.errors import InputError

ROTATION_DEGREES = 5.0  # the paper's augmentation and variation: ±5° per axis
CONTRAST_GAMMA = (0.85, 1.15)
NOISE_STD = 0.02


def rotation_ranges(spatial_dims: int, degrees: float = ROTATION_DEGREES) -> dict[str, float]:
    """MONAI `RandRotate` ranges for ±`degrees` about every axis of a 2D or 3D image."""
    radians = math.radians(degrees)
    return {"range_x": radians} if spatial_dims == 2 else {"range_x": radians, "range_y": radians, "range_z": radians}


def variation_transform(
    spatial_dims: int,
    *,
    rotation_degrees: float = ROTATION_DEGREES,
    contrast_gamma: tuple[float, float] = CONTRAST_GAMMA,
    noise_std: float = NOISE_STD,
) -> Compose:
    """Random variation of one channel-first image `[C, *spatial]` in `[0, 1]`, clipped back to `[0, 1]`.

    Args:
        spatial_dims: 2 for `[C, H, W]`, 3 for `[C, H, W, D]`.
        rotation_degrees: rotations lie within ±this about every axis (p=0.5).
        contrast_gamma: range of the gamma of the contrast change (p=0.5).
        noise_std: standard deviation of the added Gaussian noise (p=0.5).

    Returns:
        A MONAI `Compose`; call `set_random_state(seed)` on it for reproducible draws.
    """
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims={spatial_dims} must be 2 or 3")
    return Compose(
        [
            *(RandFlip(prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)),
            RandRotate(prob=0.5, padding_mode="zeros", **rotation_ranges(spatial_dims, rotation_degrees)),
            RandAdjustContrast(prob=0.5, gamma=contrast_gamma),
            RandGaussianNoise(prob=0.5, std=noise_std),
            ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    )


def vary(
    images: torch.Tensor, seed: int | None = None, transform: Compose | None = None, first_index: int = 0
) -> torch.Tensor:
    """A random variation of every image of a batch.

    Variation `i` depends only on `(seed, first_index + i)`, not on the batch size, so a batch
    and its halves (the second with `first_index` = its offset) give the same variations.

    Args:
        images: `[B, C, *spatial]`, intensities in `[0, 1]`.
        seed: seed of the draws; `None` draws one from torch's global generator, so that
            `lightning.seed_everything` makes training reproducible.
        transform: a per-image transform; defaults to `variation_transform(spatial_dims)`.

    Returns:
        `[B, C, *spatial]` with the dtype and device of `images`, in `[0, 1]`, without grad.
    """
    if images.ndim not in (4, 5):
        raise InputError(f"images of shape {list(images.shape)} must be [B, C, H, W] or [B, C, H, W, D]")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    transform = transform if transform is not None else variation_transform(images.ndim - 2)
    varied = []
    for index, image in enumerate(images.detach(), start=first_index):
        transform.set_random_state(seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        varied.append(convert_to_tensor(transform(image), track_meta=False))
    return torch.stack(varied).to(device=images.device, dtype=images.dtype)


def variation_batches(
    dataset: Sequence[dict], rows: Sequence[int], batch_size: int, seed: int, transform: Compose, first_index: int = 0
) -> Iterator[torch.Tensor]:
    """Batches `[b, C, *spatial]` of variations of `dataset[row]["image"]` for `rows`; variation `k` seeded by `(seed, first_index + k)`.

    The positives of the detector's self-check: new images close to training images.
    """
    for start in range(0, len(rows), batch_size):
        images = torch.stack([dataset[int(row)]["image"] for row in rows[start : start + batch_size]])
        yield vary(images, seed=seed, transform=transform, first_index=first_index + start)
