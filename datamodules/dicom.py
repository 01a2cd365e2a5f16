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
a file without pixel data (a DICOMDIR, a structured report), compressed pixel data without
an installed decoder, a colour image, a file directly in `root`; in 3D also two series in
one folder, a projection radiograph among (or instead of) a series, a multi-frame file,
missing slices and uneven slice spacing; in 2D a multi-frame (3D) file.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor, PydicomReader
from monai.transforms import (
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Transform,
)
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from datamodules.base import MedicalImageDataModule
from datamodules.folder import image_format, one_line
from datamodules.nifti import RAS_LABELS
from errors import InputError

LAYOUT = "root/<patient>/<DICOM files, any subfolders> (one folder per patient)"
DICOM_SUFFIXES = (".dcm", ".dicom")  # stripped from a 2D image's id; any other name is kept whole
PROJECTION_MODALITIES = ("DX", "CR", "MG")  # radiographs: 2D by nature
PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
GAP_FACTOR = 1.5  # a step this many times the usual slice spacing means missing slices
SPACING_TOLERANCE = 0.01  # relative: DICOM decimal strings round positions far below this
SAME_POSITION_MM = 1e-3
DECODER_FIX = (
    "install a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or pip install "
    "python-gdcm) or decompress the files (gdcmconv --raw IN OUT)"
)
ENCODINGS = {  # (implicit VR, little endian) → transfer syntax
    (True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian, (False, False): ExplicitVRBigEndian,
}  # fmt: skip
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: str | Path) -> bool:
    """Whether `path` is a DICOM file, by content: `DICM` at byte 128 (after the preamble), or a dataset pydicom reads."""
    try:
        with open(path, "rb") as handle:
            if handle.read(132)[128:] == b"DICM":
                return True
        if image_format(Path(path)) is not None:  # .png, .npy, .nii: another format, no need to parse
            return False
        # Files without the preamble (written by older software) are still DICOM if pydicom finds a SOP
        # class; parsing anything else makes pydicom warn and log, which must not reach the user.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logger, level = logging.getLogger("pydicom"), logging.getLogger("pydicom").level
            logger.setLevel(logging.CRITICAL)
            try:
                return "SOPClassUID" in pydicom.dcmread(path, force=True, stop_before_pixels=True)
            finally:
                logger.setLevel(level)
    except Exception:  # pydicom raises many types for a file that is not DICOM
        return False


def is_dicom_folder(path: str | Path) -> bool:
    """Whether the first non-hidden file found under `path` (sorted, subfolders searched) is DICOM."""
    if not Path(path).is_dir():
        return False
    for folder, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        visible = sorted(f for f in files if not f.startswith("."))
        if visible:
            return is_dicom_file(Path(folder) / visible[0])
    return False


def compressed_syntax(header: Dataset) -> UID | None:
    """The transfer syntax of a file's header if its pixel data are compressed, else `None`."""
    syntax = header.file_meta.get("TransferSyntaxUID") if hasattr(header, "file_meta") else None
    return syntax if syntax is not None and syntax.is_compressed else None


def read_header(path: Path) -> Dataset:
    """The header of one DICOM file; `InputError` if it cannot be read or holds no grayscale image pydicom can decode."""
    try:
        # defer_size, not stop_before_pixels: the check must see whether pixel data exists; deferred values are never read.
        header = pydicom.dcmread(path, force=True, defer_size=256)
    except Exception as error:  # a damaged file
        raise InputError(
            f"{path} cannot be read as DICOM ({one_line(error)}): replace or remove the file"
        ) from error
    if not any(tag in header for tag in PIXEL_DATA_TAGS):
        kind = getattr(header.get("SOPClassUID"), "name", None) or header.get("Modality") or "no SOP class"
        raise InputError(
            f"{path} holds no pixel data ({kind}; e.g. a DICOMDIR index or a structured report), so it is no image: "
            "move it out of the patient folder"
        )
    syntax = compressed_syntax(header)
    if syntax is not None:
        try:
            decodable = get_decoder(syntax).is_available
        except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all (video)
            decodable = False
        if not decodable:
            raise InputError(
                f"{path} has compressed pixel data ({syntax.name}) that no installed decoder reads: {DECODER_FIX}"
            )
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    if int(header.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in GRAYSCALE:
        raise InputError(
            f"{path} is not a grayscale image (PhotometricInterpretation {photometric or 'missing'}, SamplesPerPixel "
            f"{header.get('SamplesPerPixel', 'missing')}): DicomDataModule reads MONOCHROME1/MONOCHROME2 images; "
            "move it out of the patient folder"
        )
    if int(header.get("Rows", 0) or 0) < 1 or int(header.get("Columns", 0) or 0) < 1:
        raise InputError(f"{path} has no Rows/Columns: its header is damaged; replace or remove the file")
    return header


def frame_count(header: Dataset) -> int:
    return int(header.get("NumberOfFrames", 1) or 1)


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


def series_geometry(folder: Path, headers: list[tuple[Path, Dataset]]) -> tuple[list[str], np.ndarray]:
    """The slice files of one series in `ImagePositionPatient` order along the slice normal, and the RAS affine.

    `InputError` for slices of different size or orientation, two slices at one position,
    missing slices (a step over `GAP_FACTOR` × the usual spacing) or uneven spacing.
    """
    path0, header0 = headers[0]
    orientation = np.array([float(v) for v in header0.ImageOrientationPatient])
    size = (int(header0.Rows), int(header0.Columns))
    for path, header in headers[1:]:
        if (int(header.Rows), int(header.Columns)) != size:
            raise InputError(
                f"{path} has {header.Rows}×{header.Columns} pixels but {path0} has {size[0]}×{size[1]}: one series' "
                f"slices share one size; remove the odd file from {folder}"
            )
        if not np.allclose([float(v) for v in header.ImageOrientationPatient], orientation, atol=1e-4):
            raise InputError(
                f"{path} and {path0} have different ImageOrientationPatient: the slices of {folder} do not form one "
                "volume; remove the odd files"
            )
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    positions = np.array([[float(v) for v in header.ImagePositionPatient] for _, header in headers])
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
    row_spacing, column_spacing = (float(v) for v in header0.get("PixelSpacing", [1.0, 1.0]))
    # PydicomReader builds an affine only for the series it stacks itself (ordered by InstanceNumber): by hand.
    affine = np.eye(4)
    affine[:3, 0] = column_direction * row_spacing  # array axis 0: the rows, down the image
    affine[:3, 1] = row_direction * column_spacing  # array axis 1: the columns, across it
    affine[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    affine[:3, 3] = positions[order[0]]
    return [str(p) for p in paths], LPS_TO_RAS @ affine


class LoadDicom(Transform):
    """Record → `image`: `[1, rows, columns]` (2D) or `[1, rows, columns, slices]` (3D, with its affine), float32.

    Pixels are read through MONAI's `PydicomReader`, which applies `RescaleSlope`/`RescaleIntercept`;
    a series is stacked here in the order the record gives. Undecodable pixel data and NaN or
    infinite values raise `InputError` naming the file.
    """

    def __init__(self) -> None:
        self.reader = PydicomReader(swap_ij=False, force=True)

    def read(self, path: str) -> np.ndarray:
        try:
            # Radiographs have no ImageOrientationPatient: PydicomReader warns about an affine not used here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient")
                dataset = self.reader.read(path)
                # A file without a file meta header is decoded in the encoding pydicom parsed it in.
                if "TransferSyntaxUID" not in dataset.file_meta:
                    dataset.file_meta.TransferSyntaxUID = ENCODINGS[dataset.original_encoding]
                array, _ = self.reader.get_data(dataset)
        except Exception as error:  # pydicom and its decoders raise many types
            reason = one_line(error)
            try:
                syntax = compressed_syntax(pydicom.dcmread(path, force=True, stop_before_pixels=True))
            except Exception:  # the header was read at setup; if it no longer is, say what the decoder said
                syntax = None
            if syntax is not None:
                raise InputError(
                    f"{path} has compressed pixel data ({syntax.name}) that cannot be decoded ({reason}): {DECODER_FIX}"
                ) from error
            raise InputError(
                f"{path} has pixel data that cannot be read ({reason}): replace or remove the file"
            ) from error
        array = np.asarray(array, dtype=np.float32)
        if str(dataset.PhotometricInterpretation).strip() == "MONOCHROME1":
            # MONAI keeps MONOCHROME1 as stored (low = white): mirror the stored range, after rescale.
            bits, signed = int(dataset.BitsStored), int(dataset.get("PixelRepresentation", 0)) == 1
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            slope, intercept = (
                float(dataset.get("RescaleSlope", 1)),
                float(dataset.get("RescaleIntercept", 0)),
            )
            array = slope * (low + high) + 2 * intercept - array
        return array

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        if record["kind"] == "series":
            slices = [self.read(path) for path in record["slices"]]
            image: torch.Tensor = MetaTensor(
                torch.from_numpy(np.stack(slices, axis=-1)[None]), affine=torch.tensor(record["affine"])
            )
        else:
            image = torch.from_numpy(self.read(record["image_path"])[None])
        finite = torch.isfinite(image)
        if not bool(finite.all()):
            raise InputError(
                f"image {record['id']} ({record['image_path']}) has {int((~finite).sum())} NaN or infinite pixels: "
                "fix or remove the file"
            )
        return {**record, "image": image}


class DicomDataModule(MedicalImageDataModule):
    """DICOM files in one folder per patient (see the module docstring for the layout and the 2D/3D modes).

    Headers are checked when the module is set up (at CLI start-up), pixels are not read:
    a missing or empty `root`, a non-DICOM file, a file without pixel data, compressed pixel
    data without an installed decoder, a colour image, two patients or (3D) two series in one
    folder, mixed 2D and 3D files, missing slices and uneven slice spacing each raise one
    `InputError` naming the file or folder. Pixels are read when the datasets are built
    (`cache: memory` decodes every image once, at set-up); damaged pixel data raises then.

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
            patient may be in both (unless `split_file` is given, which then decides the side
            of every patient of both folders).
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
        if intensity not in ("window", "percentile", "minmax"):
            raise InputError(f"intensity={intensity!r} must be window, percentile or minmax")
        if not hu_min < hu_max:
            raise InputError(f"hu_min={hu_min} must be below hu_max={hu_max}")
        percentiles = tuple(float(p) for p in percentiles)
        if len(percentiles) != 2 or not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
            raise InputError(
                f"percentiles={list(percentiles)} must be two numbers 0 <= lower < upper <= 100, e.g. [0.5, 99.5]"
            )
        self.root = Path(root)
        self.val_root = Path(val_root) if val_root is not None else None
        self.intensity = intensity
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)
        self.percentiles = percentiles
        self._patient_split: dict[str, str] = {}

    # --- headers ------------------------------------------------------------------------

    def _dicom_files(self, folder: Path, option: str) -> list[Path]:
        named = {Path(self.split_file).resolve()} if self.split_file is not None else set()
        found = []
        for parent, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                path = Path(parent) / name
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
        train_folders = {r["patient"]: r["image_path"] for r in train}
        for record in val:
            if record["patient"] in train_folders:
                raise InputError(
                    f"patient {record['patient']!r} is in both roots ({train_folders[record['patient']]} and "
                    f"{record['image_path']}): move all of a patient's files to root or to val_root"
                )
        self._patient_split = {r["patient"]: "train" for r in train} | {r["patient"]: "val" for r in val}
        return train + val

    def given_split(self, patients: Sequence[str]) -> dict[str, str] | None:
        if self.val_root is None or self.split_file is not None:
            return None
        return {patient: self._patient_split[patient] for patient in patients}

    def load_transforms(self) -> list[Callable]:
        keys = "image"
        if self.intensity == "window":
            scale = ScaleIntensityRanged(
                keys=keys, a_min=self.hu_min, a_max=self.hu_max, b_min=0.0, b_max=1.0, clip=True
            )
        elif self.intensity == "percentile":
            lower, upper = self.percentiles
            scale = ScaleIntensityRangePercentilesd(
                keys=keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True
            )
        else:
            scale = ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)
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
        again = (
            scale
            if self.intensity == "minmax"
            else ScaleIntensityRanged(keys=keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
        )
        return [LoadDicom(), scale, resize, again]
