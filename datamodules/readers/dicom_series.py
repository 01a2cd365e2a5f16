"""Patients and series of DICOM headers: who a folder's files belong to, and how slices stack into a volume.

A series is stacked by `ImagePositionPatient` projected on the slice normal (the cross
product of the two `ImageOrientationPatient` direction cosines), never by file name or
`InstanceNumber`, and must be evenly spaced; its affine maps array indices `(row, column,
slice)` to RAS millimetres, so that MONAI's `Orientationd` reorients it as it does a NIfTI
volume. Every failure is one `InputError` naming the files and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from memwatch.errors import InputError

PROJECTION_MODALITIES = ("DX", "CR", "MG")  # radiographs: 2D by nature
GAP_FACTOR = 1.5  # a step this many times the usual slice spacing means missing slices
SPACING_TOLERANCE = 0.01  # relative: DICOM decimal strings round positions far below this
SAME_POSITION_MM = 1e-3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def why_2d(header: Dataset) -> str | None:
    """Why a file is a 2D image that cannot be a slice of a series, or `None` for a slice."""
    modality = str(header.get("Modality", "")).strip()
    if modality in PROJECTION_MODALITIES:
        return f"a {modality} radiograph"
    if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
        return f"a {modality or 'DICOM'} image without ImagePositionPatient/ImageOrientationPatient"
    return None


def patient_of(folder: Path, headers: list[tuple[Path, Dataset]]) -> str:
    """The one `PatientID` of a patient folder's files; the folder's name where the tag is empty."""
    first: dict[str, Path] = {}
    for path, header in headers:
        patient = str(header.get("PatientID", "") or "").strip()
        if patient and patient not in first:
            first[patient] = path
    if len(first) > 1:
        (a, path_a), (b, path_b) = list(first.items())[:2]
        raise InputError(
            f"patient folder {folder} holds files of two patients (PatientID {a!r} in {path_a}, {b!r} in {path_b}): "
            "give each patient a folder of their own"
        )
    return next(iter(first), folder.name)


def numbers(path: Path, header: Dataset, keyword: str, count: int) -> np.ndarray:
    """`header.<keyword>` as `count` finite floats `[count]`, or `InputError` naming the file and the value."""
    value = header.get(keyword)
    try:
        parsed = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        parsed = np.array([])
    if parsed.shape != (count,) or not np.isfinite(parsed).all():
        raise InputError(
            f"{path} has {keyword} {value!r}, not {count} numbers: its header is damaged; replace or remove the file"
        )
    return parsed


def series_geometry(folder: Path, headers: list[tuple[Path, Dataset]]) -> tuple[list[str], np.ndarray]:
    """The slice files of one series in `ImagePositionPatient` order along the slice normal, and the RAS affine `[4, 4]`.

    `InputError` for slices of different size or orientation, two slices at one position,
    missing slices (a step over `GAP_FACTOR` × the usual spacing), uneven spacing, or a
    position, orientation or pixel spacing that is not numbers.
    """
    path0, header0 = headers[0]
    orientation = numbers(path0, header0, "ImageOrientationPatient", 6)
    size = (int(header0.Rows), int(header0.Columns))
    for path, header in headers[1:]:
        if (int(header.Rows), int(header.Columns)) != size:
            raise InputError(
                f"{path} has {header.Rows}×{header.Columns} pixels but {path0} has {size[0]}×{size[1]}: one series' "
                f"slices share one size; remove the odd file from {folder}"
            )
        if not np.allclose(numbers(path, header, "ImageOrientationPatient", 6), orientation, atol=1e-4):
            raise InputError(
                f"{path} and {path0} have different ImageOrientationPatient: the slices of {folder} do not form one "
                "volume; remove the odd files"
            )
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    positions = np.array([numbers(path, header, "ImagePositionPatient", 3) for path, header in headers])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    paths = [headers[i][0] for i in order]
    steps = np.diff(depth[order])
    same = int(np.argmin(steps))
    if steps[same] < SAME_POSITION_MM:
        raise InputError(
            f"{paths[same]} and {paths[same + 1]} lie at the same slice position ({depth[order][same]:g} mm along "
            f"the normal): {folder} holds a duplicate slice or two series with one SeriesInstanceUID; remove one"
        )
    usual = float(np.median(steps)) if len(steps) >= 3 else float(steps.min())
    gap = int(np.argmax(steps))
    if steps[gap] > GAP_FACTOR * usual:
        raise InputError(
            f"{folder} has a gap of {steps[gap]:g} mm between the slices {paths[gap]} and {paths[gap + 1]}, whose other "
            f"slices are {usual:g} mm apart: slices are missing; add the missing files or remove the series"
        )
    uneven = int(np.argmax(np.abs(steps - usual)))
    if abs(steps[uneven] - usual) > SPACING_TOLERANCE * usual:
        raise InputError(
            f"{folder} has uneven slice spacing ({steps.min():g} to {steps.max():g} mm; {steps[uneven]:g} mm between "
            f"{paths[uneven]} and {paths[uneven + 1]}, {usual:g} mm elsewhere): resample the series to even spacing "
            "(e.g. dcm2niix, then NiftiDataModule) or remove it"
        )
    spacing = numbers(path0, header0, "PixelSpacing", 2) if header0.get("PixelSpacing") else np.ones(2)
    row_spacing, column_spacing = (float(v) for v in spacing)
    # By hand: MONAI's PydicomReader builds one only for a series it stacks itself (ordered by InstanceNumber).
    affine = np.eye(4)
    affine[:3, 0] = column_direction * row_spacing  # array axis 0: the rows, down the image
    affine[:3, 1] = row_direction * column_spacing  # array axis 1: the columns, across it
    affine[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    affine[:3, 3] = positions[order[0]]
    return [str(p) for p in paths], LPS_TO_RAS @ affine
