"""The intensity options of the DataModules, checked once: how stored values become `[0, 1]`.

- `window`: `[hu_min, hu_max]` (after the file's rescale: Hounsfield units for CT) → `[0, 1]`, clipped;
- `percentile`: each image's lower and upper `percentiles` → `[0, 1]`, clipped (MR, any units);
- `minmax`: each image's minimum and maximum → `[0, 1]`;
- `none`: the values as stored, which must already lie in `[0, 1]` (`CheckUnitRange`).

A DataModule offers some of them (`check_intensity(..., allowed=...)`), checked when it is
built, and chains `scale_to_unit` into its transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monai.transforms import (
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Transform,
)

from memwatch.errors import InputError

INTENSITIES = ("window", "percentile", "minmax", "none")


@dataclass(frozen=True)
class Intensity:
    """One checked intensity option: `mode` (one of `INTENSITIES`), the window and the percentiles (in `[0, 100]`)."""

    mode: str
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    percentiles: tuple[float, float] = (0.5, 99.5)


def check_intensity(
    intensity: str,
    allowed: Sequence[str],
    hu_min: float = -1000.0,
    hu_max: float = 1000.0,
    percentiles: Sequence[float] = (0.5, 99.5),
) -> Intensity:
    """The option `intensity` with its window and percentiles, or `InputError` naming the bad value."""
    if intensity not in allowed:
        choices = " or ".join([", ".join(allowed[:-1]), allowed[-1]] if len(allowed) > 1 else allowed)
        raise InputError(f"intensity={intensity!r} must be {choices}")
    if not hu_min < hu_max:
        raise InputError(f"hu_min={hu_min} must be below hu_max={hu_max}")
    bounds = tuple(float(p) for p in percentiles)
    if len(bounds) != 2 or not 0.0 <= bounds[0] < bounds[1] <= 100.0:
        raise InputError(
            f"percentiles={list(bounds)} must be two numbers 0 <= lower < upper <= 100, e.g. [0.5, 99.5]"
        )
    return Intensity(intensity, float(hu_min), float(hu_max), (bounds[0], bounds[1]))


class CheckUnitRange:
    """Raise `InputError` unless every pixel already lies in `[0, 1]` (for `intensity: none`).

    Args:
        option: the argument that chose `intensity: none`, named in the error with its fix.
    """

    def __init__(self, option: str = "--data.init_args.intensity") -> None:
        self.option = option

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        low, high = float(record["image"].min()), float(record["image"].max())
        if low < 0.0 or high > 1.0:
            raise InputError(
                f"image {record['id']} ({record['image_path']}) has intensities in [{low:g}, {high:g}], not [0, 1], "
                f"and intensity is none: set {self.option} minmax or rescale the file"
            )
        return record


def scale_to_unit(intensity: Intensity, keys: str = "image") -> Transform | CheckUnitRange:
    """The transform that maps `record[keys]` `[C, *spatial]` to `[0, 1]` as `intensity` says (`none`: checks it)."""
    if intensity.mode == "window":
        return ScaleIntensityRanged(
            keys=keys, a_min=intensity.hu_min, a_max=intensity.hu_max, b_min=0.0, b_max=1.0, clip=True
        )
    if intensity.mode == "percentile":
        lower, upper = intensity.percentiles
        return ScaleIntensityRangePercentilesd(keys=keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True)
    if intensity.mode == "minmax":
        return ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)
    return CheckUnitRange()


def clip_to_unit(keys: str = "image") -> Transform:
    """Clip `record[keys]` to `[0, 1]`: after interpolation, whose rounding can step just outside."""
    return ScaleIntensityRanged(keys=keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
