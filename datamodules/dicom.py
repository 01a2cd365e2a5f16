"""Folders of DICOM files, one per patient: a CT/MR series per patient (3D) or radiographs (2D), in `[0, 1]`.

Layout: one folder per patient directly under `root`; every DICOM file below it (in any
subfolders, named `.dcm` or without extension: files are recognised by their content) is
that patient's. The patient is the files' `PatientID` tag, the folder's name only where
the tag is empty; folders with the same `PatientID` are one patient, kept on one side of
the split::

    data/dicom/
        case_001/                   3D: one series   id case_001          patient <PatientID>
            IM0001 IM0002 ...
        case_002/study/series/      (any depth)      id case_002          patient <PatientID>
            1.2.840...1.dcm ...
        case_003/                   2D: each file one image
            pa.dcm                                   id case_003/pa       patient <PatientID>
            visit_2/lateral.dcm                      id case_003/visit_2/lateral

`spatial_size` decides which of the two a root holds:

- **3D** (`(X, Y, Z)`): each patient folder holds exactly one CT or MR series (one
  `SeriesInstanceUID`), one image per patient, id = the folder's name. Slices are ordered by
  `ImagePositionPatient` projected on the slice normal (the cross product of the two
  `ImageOrientationPatient` direction cosines), never by file name or `InstanceNumber`, and
  must be evenly spaced. `RescaleSlope`/`RescaleIntercept` are applied (Hounsfield units for
  CT). The volume is reoriented to RAS as `NiftiDataModule` does (the first array axis runs
  to the patient's Right, the second Anterior, the third Superior), so a series and its
  NIfTI conversion give the same patch; scaled to `[0, 1]` (CT window or percentiles) and
  centre-cropped/zero-padded to `spatial_size` without resampling.
- **2D** (`(H, W)`): every file is one single-frame image (radiographs: DX, CR, MG; or single
  CT/MR slices), id = its path in `root` without `.dcm`/`.dicom`. Rows come first (as the
  image is displayed); rescale is applied, `MONOCHROME1` is inverted so that bright means dense
  as in `MONOCHROME2`; each image is scaled to `[0, 1]` (its own minimum and maximum, or
  percentiles, or a window) and resized to `spatial_size` (bilinear, anti-aliased).

Hidden files and folders (names starting with `.`) and the file named by `split_file` are
ignored. Anything else that is no DICOM image is an error, never skipped: a non-DICOM file,
a file without pixel data (a DICOMDIR, a structured report), a segmentation, a colour image,
a damaged header or truncated pixel data, compressed pixel data that no installed decoder
decodes, a file directly in `root`; in 3D also two series in one folder, a projection
radiograph among (or instead of) a series, a multi-frame file, missing slices and uneven
slice spacing; in 2D a multi-frame (3D) file. Files are read and judged by
`datamodules.readers.dicom` (see there what setup costs) and stacked into series by
`datamodules.readers.dicom_series`; this module lists the records and builds the transforms.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from monai.transforms import Orientationd, Resized, ResizeWithPadOrCropd
from pydicom.dataset import Dataset

from memwatch.datamodules.base import MedicalImageDataModule
from memwatch.datamodules.intensity import check_intensity, clip_to_unit, scale_to_unit
from memwatch.datamodules.readers.dicom import LoadDicom, frame_count, is_dicom_file, read_header
from memwatch.datamodules.readers.dicom_series import patient_of, series_geometry, why_2d
from memwatch.datamodules.readers.folders import visible_files
from memwatch.datamodules.readers.nifti import RAS_LABELS
from memwatch.errors import InputError

LAYOUT = "root/<patient>/<DICOM files, any subfolders> (one folder per patient)"
DICOM_SUFFIXES = (".dcm", ".dicom")  # stripped from a 2D image's id; any other name is kept whole


class DicomDataModule(MedicalImageDataModule):
    """DICOM files in one folder per patient (see the module docstring for the layout and the 2D/3D modes).

    Every file is judged when the module is set up (at CLI start-up; `readers.dicom.read_header`:
    its header, and the first frame of compressed pixel data), so that every image loads
    later: a missing or empty `root`, a non-DICOM file, a file without pixel data, a
    segmentation, a colour image, a damaged header, truncated pixel data, compressed pixel
    data that no installed decoder decodes, two patients or (3D) two series in one folder,
    mixed 2D and 3D files, missing slices and uneven slice spacing each raise one
    `InputError` naming the file or folder. Pixels are read when the datasets are built
    (`cache: memory` decodes every image once, at set-up).

    Args:
        root: folder of patient folders (only the training patients when `val_root` is given).
        spatial_size: `(X, Y, Z)` of every volume in RAS voxels (3D: one series per patient)
            or `(H, W)` of every image (2D: every file one image).
        intensity: `window` maps `[hu_min, hu_max]` (after rescale: Hounsfield units for CT)
            to `[0, 1]` and clips; `percentile` maps each image's `percentiles` to `[0, 1]` and
            clips (MR, any units); `minmax` maps each image's minimum and maximum to `[0, 1]`.
            Default: `window` for 3D, `minmax` for 2D.
        hu_min, hu_max: the window (`window` only), in the rescaled units.
        percentiles: lower and upper percentile, in `[0, 100]` (`percentile` only).
        val_root: optional folder of the held-out patients; then the folders are the split
            (as in `FolderDataModule`), `val_fraction` and `split_seed` are unused, and no
            patient may be in both; `split_file`, if given, decides the side of every patient
            of both folders.
        batch_size, num_workers, n_train, val_fraction, split_seed, split_file, augment,
            cache, cache_dir: see `MedicalImageDataModule`; the split is by patient
            (`PatientID`), from `split_file` (`patient,split`) if given, else seeded.
    """

    split_options = (*MedicalImageDataModule.split_options, "val_root")

    def __init__(
        self,
        root: str = "data/dicom",
        spatial_size: Sequence[int] = (64, 64, 64),
        intensity: Literal["window", "percentile", "minmax"] | None = None,
        hu_min: float = -1000.0,
        hu_max: float = 1000.0,
        percentiles: Sequence[float] = (0.5, 99.5),
        val_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_size=spatial_size, **kwargs)
        if intensity is None:
            intensity = "window" if self.spatial_dims == 3 else "minmax"
        self.scaling = check_intensity(intensity, ("window", "percentile", "minmax"), hu_min, hu_max, percentiles)
        self.root = Path(root)
        self.val_root = Path(val_root) if val_root is not None else None
        self.intensity = intensity

    # --- headers ------------------------------------------------------------------------

    def _dicom_files(self, folder: Path, option: str) -> list[Path]:
        named = {Path(self.split_file).resolve()} if self.split_file is not None else set()
        found = []
        for path in visible_files(folder, option):
            if path.resolve() in named:
                continue
            if not is_dicom_file(path):
                raise InputError(
                    f"{path} is not a DICOM file: move it out of {option} (DicomDataModule reads DICOM only; "
                    "NIfTI: NiftiDataModule, PNG: FolderDataModule)"
                )
            found.append(path)
        return found

    def _series_record(
        self, root: Path, folder: Path, patient: str, headers: list[tuple[Path, Dataset]]
    ) -> dict[str, Any]:
        reasons = [(path, why_2d(header)) for path, header in headers]
        projections = [(path, why) for path, why in reasons if why is not None]
        if projections:
            path, why = projections[0]
            among = (
                f", mixed with {len(headers) - len(projections)} slice(s) of a series"
                if len(projections) < len(headers) else ""
            )  # fmt: skip
            raise InputError(
                f"{path} is {why}{among}, but spatial_size {list(self.spatial_size)} is 3D and patient folder {folder} "
                "must hold one CT/MR series: move 2D images to a root of their own and read it with a 2D spatial_size"
            )
        for path, header in headers:
            if frame_count(header) > 1:
                raise InputError(
                    f"{path} is a multi-frame file ({frame_count(header)} frames): DicomDataModule reads a series of "
                    "single-frame slices; convert it (e.g. dcm2niix, then NiftiDataModule) or move it out of the patient folder"
                )
        first: dict[str, Path] = {}
        for path, header in headers:
            first.setdefault(str(header.get("SeriesInstanceUID", "")), path)
        if len(first) > 1:
            (a, path_a), (b, path_b) = list(first.items())[:2]
            raise InputError(
                f"patient folder {folder} holds two series (SeriesInstanceUID {a} in {path_a}, {b} in {path_b}): keep "
                "one series per patient folder and move the other (a scout, another reconstruction) elsewhere"
            )
        if len(headers) < 2:
            raise InputError(
                f"patient folder {folder} holds a single slice ({headers[0][0]}), not a series: add the series' other "
                "slices, or read single images with a 2D spatial_size"
            )
        slices, affine = series_geometry(folder, headers)
        stats = [
            (os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in slices
        ]  # the disk cache re-reads edits
        return {
            "id": folder.relative_to(root).as_posix(), "patient": patient, "image_path": str(folder),
            "kind": "series", "slices": slices, "affine": affine.tolist(), "file_stats": stats,
        }  # fmt: skip

    def _image_records(
        self, root: Path, patient: str, headers: list[tuple[Path, Dataset]]
    ) -> list[dict[str, Any]]:
        records, seen = [], {}
        for path, header in headers:
            if frame_count(header) > 1:
                raise InputError(
                    f"{path} holds {frame_count(header)} frames (a 3D image), but spatial_size "
                    f"{list(self.spatial_size)} is 2D and every file must be one 2D image: move 3D data to a root of "
                    "its own and read it with a 3D spatial_size"
                )
            relative = path.relative_to(root)
            if relative.suffix.lower() in DICOM_SUFFIXES:
                relative = relative.with_suffix("")
            image_id = relative.as_posix()
            if image_id in seen:
                raise InputError(
                    f"{path} and {seen[image_id]} have the same id {image_id!r}: rename one of them"
                )
            seen[image_id] = path
            records.append({"id": image_id, "patient": patient, "image_path": str(path), "kind": "image"})
        return records

    def _patient_records(self, root: Path, option: str) -> list[dict[str, Any]]:
        if not root.is_dir():
            raise InputError(
                f"{option}={root} is not a folder: set {option} to a folder of DICOM files laid out as {LAYOUT}"
            )
        named = {Path(self.split_file).resolve()} if self.split_file is not None else set()
        records = []
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(".") or entry.resolve() in named:
                continue
            if not entry.is_dir():
                raise InputError(
                    f"{entry} lies directly in {option}={root}: put each patient's DICOM files in a folder of their "
                    f"own, {LAYOUT}"
                )
            files = self._dicom_files(entry, option)
            if not files:
                raise InputError(
                    f"patient folder {entry} holds no DICOM files: add the patient's files or remove it"
                )
            headers = [(path, read_header(path)) for path in files]
            patient = patient_of(entry, headers)
            if self.spatial_dims == 3:
                records.append(self._series_record(root, entry, patient, headers))
            else:
                records.extend(self._image_records(root, patient, headers))
        if not records:
            raise InputError(f"{option}={root} holds no patient folders: add DICOM files as {LAYOUT}")
        return records

    # --- MedicalImageDataModule ---------------------------------------------------------

    def list_records(self) -> list[dict[str, Any]]:
        train = self._patient_records(self.root, "--data.init_args.root")
        if self.val_root is None:
            return train
        val = self._patient_records(self.val_root, "--data.init_args.val_root")
        return self.records_of_two_roots(train, val, ("root", "val_root"), kind="roots", what="files")

    def load_transforms(self) -> list[Callable]:
        keys = "image"
        scale = scale_to_unit(self.scaling, keys)
        # Scaled before reshaping, so that zero padding is the lowest intensity and percentiles describe the whole image.
        if self.spatial_dims == 3:
            orient = Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS)
            return [
                LoadDicom(),
                orient,
                scale,
                ResizeWithPadOrCropd(keys=keys, spatial_size=self.spatial_size, mode="constant"),
            ]
        resize = Resized(keys=keys, spatial_size=self.spatial_size, mode="bilinear", anti_aliasing=True)
        # After resizing: minmax spans [0, 1] again; the others are clipped against interpolation's rounding.
        again = scale if self.intensity == "minmax" else clip_to_unit(keys)
        return [LoadDicom(), scale, resize, again]
