"""DICOM files: recognised by content, judged whole at setup, read later as float32 pixels.

`read_header` judges one file when a DataModule is set up, so that nothing fails later inside
a DataLoader worker (mid-epoch): the file loads, or it is refused with one `InputError` line
naming it and the fix. Refused here: a file pydicom cannot parse; no pixel data (a DICOMDIR,
a structured report); a segmentation (a label map, not an image); an unknown transfer
syntax, or a compressed one without an installed decoder; a colour image; and, by
`dicom_pixels.check_pixels` (whose docstring says what setup costs, and why), a damaged
header, truncated pixel data and compressed pixel data that does not decode.

`LoadDicom` reads a record's pixels with pydicom (`Dataset.pixel_array`), applies
`RescaleSlope`/`RescaleIntercept` and inverts `MONOCHROME1`, so that bright means dense.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import Transform
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from memwatch.datamodules.readers.dicom_pixels import (
    DECODER_FIX,
    ENCODINGS,
    check_pixels,
    compressed_syntax,
    rescale,
    transfer_syntax,
)
from memwatch.datamodules.readers.folders import visible_files
from memwatch.datamodules.readers.image_files import image_format
from memwatch.errors import InputError, one_line

PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


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


def is_dicom_folder(path: str | Path, option: str = "the folder") -> bool:
    """Whether the first non-hidden file found under `path` (sorted, subfolders searched) is DICOM; `option`
    names the folder in the error of a symbolic-link loop (`visible_files`)."""
    if not Path(path).is_dir():
        return False
    first = next(visible_files(Path(path), option), None)
    return first is not None and is_dicom_file(first)


def frame_count(header: Dataset) -> int:
    """`NumberOfFrames` (1 where absent or 0, as pydicom reads it); parses for every header `read_header` passed."""
    return int(header.get("NumberOfFrames", 1) or 1)


def read_header(path: Path) -> Dataset:
    """The header of one DICOM file (pixel data deferred), judged whole: `InputError` unless its image will load."""
    try:
        # defer_size, not stop_before_pixels: the check must see whether pixel data exists; deferred values are read
        # only where no header can vouch for them (see `dicom_pixels`).
        header = pydicom.dcmread(path, force=True, defer_size=256)
    except Exception as error:  # a damaged file
        raise InputError(
            f"{path} cannot be read as DICOM ({one_line(error)}): replace or remove the file"
        ) from error
    try:
        _judge(path, header)
    except InputError:
        raise
    except Exception as error:  # a header element pydicom cannot convert
        raise InputError(f"{path} has a damaged header ({one_line(error)}): replace or remove the file") from error
    return header


def _judge(path: Path, header: Dataset) -> None:
    keywords = [tag for tag in PIXEL_DATA_TAGS if tag in header]
    if not keywords:
        kind = getattr(header.get("SOPClassUID"), "name", None) or header.get("Modality") or "no SOP class"
        raise InputError(
            f"{path} holds no pixel data ({kind}; e.g. a DICOMDIR index or a structured report), so it is no image: "
            "move it out of the patient folder"
        )
    if "SegmentSequence" in header or str(header.get("Modality", "")).strip() == "SEG":
        raise InputError(
            f"{path} is a segmentation (Modality SEG: a label map, not an image of the patient): move it out of the "
            "patient folder"
        )
    syntax = transfer_syntax(header)
    if not syntax.is_transfer_syntax:
        raise InputError(f"{path} has the unknown transfer syntax {syntax}: decompress it (gdcmconv --raw IN OUT)")
    if syntax.is_compressed:
        try:
            decodable = get_decoder(syntax).is_available
        except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all (video)
            decodable = False
        if not decodable:
            raise InputError(
                f"{path} has compressed pixel data ({syntax.name}) that no installed decoder reads: {DECODER_FIX}"
            )
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    samples = header.get("SamplesPerPixel", 1)
    if str(samples or 1).strip() != "1" or photometric not in GRAYSCALE:
        raise InputError(
            f"{path} is not a grayscale image (PhotometricInterpretation {photometric or 'missing'}, SamplesPerPixel "
            f"{header.get('SamplesPerPixel', 'missing')}): DicomDataModule reads MONOCHROME1/MONOCHROME2 images; "
            "move it out of the patient folder"
        )
    if not header.get("Rows") or not header.get("Columns"):  # absent, empty or 0
        raise InputError(f"{path} has no Rows/Columns: its header is damaged; replace or remove the file")
    if len(keywords) > 1:
        raise InputError(
            f"{path} holds two pixel data elements ({' and '.join(keywords)}): its header is damaged; replace or "
            "remove the file"
        )
    check_pixels(path, header, keywords[0])


class LoadDicom(Transform):
    """Record → `image`: `[1, rows, columns]` (2D) or `[1, rows, columns, slices]` (3D, with its affine), float32.

    Pixels are read with pydicom (`Dataset.pixel_array`), `RescaleSlope`/`RescaleIntercept`
    are applied and `MONOCHROME1` is inverted; a series is stacked here in the order the record
    gives. Every file was judged at setup (`read_header`); a file that changed since and no
    longer decodes, and NaN or infinite values, raise `InputError` naming the file.
    """

    def read(self, path: str) -> np.ndarray:
        """One single-frame file's pixels, `[rows, columns]` float32, rescaled, bright = dense."""
        try:
            dataset = pydicom.dcmread(path, force=True)
            # A file without a file meta header is decoded in the encoding pydicom parsed it in.
            if "TransferSyntaxUID" not in dataset.file_meta:
                dataset.file_meta.TransferSyntaxUID = ENCODINGS[dataset.original_encoding]
            array = dataset.pixel_array
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
        slope, intercept = rescale(path, dataset)
        # In float64, then float32: as MONAI's PydicomReader, which read these files before, computes it.
        array = (array.astype(np.float32) * np.float64(slope) + np.float64(intercept)).astype(np.float32)
        if str(dataset.PhotometricInterpretation).strip() == "MONOCHROME1":
            # Stored low = white: mirror the stored range, after rescale.
            bits, signed = int(dataset.BitsStored), int(dataset.get("PixelRepresentation", 0)) == 1
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
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
