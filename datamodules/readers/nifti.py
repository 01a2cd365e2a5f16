"""NIfTI volume headers (`.nii`, `.nii.gz`): one 3D volume per file, and its shape once reoriented to RAS.

Pixels are read by `image_files.LoadImageFile` (MONAI `NibabelReader`) and reoriented by
MONAI `Orientationd(axcodes="RAS", labels=RAS_LABELS)`: the first array axis runs to the
patient's Right, the second Anterior, the third Superior, whatever the file's affine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import nibabel
import numpy as np

from memwatch.errors import InputError, one_line

# nibabel's world axes, given explicitly: MONAI warns that its default will change.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def ras_shape(path: Path, shape: Sequence[int], affine: np.ndarray) -> tuple[int, ...]:
    """The shape of a volume `shape` with `affine` `[4, 4]` once reoriented to RAS (the axis permutation MONAI applies)."""
    orientation = nibabel.orientations.io_orientation(affine)
    oriented = [0, 0, 0]
    for axis, (target, _) in enumerate(orientation):
        if math.isnan(target):
            raise InputError(
                f"{path} has an affine without a direction for voxel axis {axis}: fix the file's header"
            )
        oriented[int(target)] = int(shape[axis])
    return tuple(oriented)


def check_volume_file(path: Path) -> tuple[int, ...]:
    """Read only the header of one NIfTI file; its RAS shape, or `InputError` if unreadable or not one 3D volume."""
    try:
        image = nibabel.load(path)
        shape, affine = tuple(int(s) for s in image.shape), image.affine
    except Exception as error:  # nibabel raises many types for a damaged file
        raise InputError(
            f"{path} cannot be read as NIfTI ({one_line(error)}): replace or remove the file"
        ) from error
    if len(shape) == 4 and shape[3] == 1:  # a 3D volume stored with one time point
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(
            f"{path} has shape {shape}, not one 3D volume (X, Y, Z): NiftiDataModule takes 3D volumes only; "
            "save each volume (or each channel/time point) as its own file, or remove it"
        )
    return ras_shape(path, shape, affine)
