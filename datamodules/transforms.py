"""The paper's augmentation, the mitigation the `*_aug` configs train with.

Its rotation range is the variation's (`memwatch.memorization.variation`, re-exported here for
importers of this module).
"""

from __future__ import annotations

from monai.transforms import RandFlipd, RandRotated

from memwatch.memorization.variation import (
    CONTRAST_GAMMA,
    NOISE_STD,
    ROTATION_DEGREES,
    rotation_ranges,
    variation_batches,
    variation_transform,
    vary,
)

__all__ = [
    "CONTRAST_GAMMA",
    "NOISE_STD",
    "ROTATION_DEGREES",
    "augmentation_transforms",
    "rotation_ranges",
    "variation_batches",
    "variation_transform",
    "vary",
]


def augmentation_transforms(spatial_dims: int, keys: str = "image") -> list:
    """The paper's mitigation: flip (p=0.5) and rotate within ±5° (p=0.5) in every spatial axis."""
    flips = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    return [*flips, RandRotated(keys=keys, prob=0.5, padding_mode="zeros", **rotation_ranges(spatial_dims))]
