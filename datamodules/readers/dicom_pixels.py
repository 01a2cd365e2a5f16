"""Whether a DICOM file's pixel data will load: judged from its header where that is enough, decoded where not.

`check_pixels` runs at setup (from `dicom.read_header`) so that nothing fails later inside a
DataLoader worker (mid-epoch). It refuses, in one `InputError` line naming the file and the
fix: a header element the pixels need that is missing or does not parse as a number in its
range (`Rows`, `Columns`, `SamplesPerPixel`, `BitsAllocated`, `BitsStored`,
`PixelRepresentation`, `NumberOfFrames`, `RescaleSlope`, `RescaleIntercept`); pixel data
shorter than the header says (a truncated file); compressed pixel data that the installed
decoders do not decode; NaN or infinite float pixels.

What setup costs, and why. A header is read without its pixel data (`defer_size`), and most
of a file is judged from it. Native (uncompressed) pixel data is vouched for by its length:
the element's length, and the bytes the file actually holds after it, must reach
Rows × Columns × SamplesPerPixel × BitsAllocated/8 × frames; no pixel is read, so a series
of native slices (the usual PACS export) costs one header read per file. A header cannot
vouch for compressed pixel data: a decoder plugin may be installed and still refuse a JPEG
process or bit depth (Pillow and 12-bit JPEG Extended), or the code stream may be damaged. So
the first frame of every compressed file is decoded at setup; `DicomDataModule` accepts
single-frame files only, so that is the whole image, decoded once more than the first epoch
decodes it. Measured on one CPU core: a header read takes 0.4 ms, a 512×512 16-bit RLE slice
6 ms to decode; for 904 volumes of 32 slices, setup takes some 10 s if they are native and
some 3 minutes if compressed (as long as reading them once). Float pixel data (parametric
maps) is read at setup too, as only its values show NaN or infinity.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from memwatch.errors import InputError, one_line

DECODER_FIX = (
    "install a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or pip install "
    "python-gdcm) or decompress the files (gdcmconv --raw IN OUT)"
)
DAMAGED = "its header is damaged; replace or remove the file"
ENCODINGS = {  # (implicit VR, little endian) → transfer syntax
    (True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian, (False, False): ExplicitVRBigEndian,
}  # fmt: skip
UNDEFINED_LENGTH = 0xFFFFFFFF


def transfer_syntax(header: Dataset) -> UID:
    """The transfer syntax of a file: its file meta header's, or the encoding pydicom parsed a file without one in."""
    meta = getattr(header, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(syntax) if syntax else ENCODINGS[header.original_encoding]


def compressed_syntax(header: Dataset) -> UID | None:
    """The transfer syntax of a file's header if its pixel data are compressed, else `None`."""
    syntax = transfer_syntax(header)
    return syntax if syntax.is_transfer_syntax and syntax.is_compressed else None


def _integer(path: Path, header: Dataset, keyword: str, low: int, high: int, default: int | None = None) -> int:
    """`header.<keyword>` as an integer in `[low, high]`, or `InputError` naming the file and the value."""
    value = header.get(keyword)
    if value is None or value == "":
        if default is None:
            raise InputError(f"{path} lacks {keyword}, which its pixel data need: {DAMAGED}")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{path} has {keyword} {value!r}, not a whole number: {DAMAGED}") from None
    if not low <= number <= high:
        raise InputError(f"{path} has {keyword} {number}, outside [{low}, {high}]: {DAMAGED}")
    return number


def _real(path: str | Path, header: Dataset, keyword: str, default: float) -> float:
    """`header.<keyword>` as a finite float (`default` where absent), or `InputError` naming the file and the value."""
    value = header.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{path} has {keyword} {value!r}, not a number: {DAMAGED}") from None
    if not np.isfinite(number):
        raise InputError(f"{path} has {keyword} {number}, not a finite number: {DAMAGED}")
    return number


def rescale(path: str | Path, header: Dataset) -> tuple[float, float]:
    """`(RescaleSlope, RescaleIntercept)`, `(1, 0)` where absent; `InputError` unless both are finite numbers."""
    return _real(path, header, "RescaleSlope", 1.0), _real(path, header, "RescaleIntercept", 0.0)


def _stored_bytes(path: Path, header: Dataset, keyword: str, syntax: UID) -> int:
    """How many bytes of native pixel data the file holds: the element's length, cut short where the file ends."""
    element = header.get_item(keyword, keep_deferred=True)
    if element.value is not None or syntax == DeflatedExplicitVRLittleEndian:
        return len(header[keyword].value)  # read already (short), or inflated in memory (deflated files)
    if element.length == UNDEFINED_LENGTH:
        raise InputError(
            f"{path} has encapsulated pixel data but the native transfer syntax {syntax.name}: {DAMAGED}"
        )
    return min(element.length, os.path.getsize(path) - element.value_tell)


def check_pixels(path: Path, header: Dataset, keyword: str) -> None:
    """`InputError` unless the header's pixel description parses and the pixel data `keyword` will decode into it.

    Native pixel data is judged by its length, compressed and float pixel data by decoding
    frame 0 (see the module docstring for why).
    """
    rows = _integer(path, header, "Rows", 1, 2**16 - 1)
    columns = _integer(path, header, "Columns", 1, 2**16 - 1)
    samples = _integer(path, header, "SamplesPerPixel", 1, 1)
    frames = _integer(path, header, "NumberOfFrames", 0, 2**31, default=1) or 1
    bits = _integer(path, header, "BitsAllocated", 1, 64)
    if bits != 1 and bits % 8:
        raise InputError(f"{path} has BitsAllocated {bits}, not 1 or a multiple of 8: {DAMAGED}")
    if keyword == "PixelData":
        _integer(path, header, "BitsStored", 1, bits)
        _integer(path, header, "PixelRepresentation", 0, 1)
    elif str(header.PhotometricInterpretation).strip() == "MONOCHROME1":
        raise InputError(
            f"{path} holds MONOCHROME1 float pixel data, which has no stored range to invert: save it as "
            "MONOCHROME2 or move it out of the patient folder"
        )
    slope, intercept = rescale(path, header)
    if keyword == "PixelData" and abs(slope) * 2.0**bits + abs(intercept) > np.finfo(np.float32).max:
        raise InputError(
            f"{path} has RescaleSlope {slope:g} and RescaleIntercept {intercept:g}, which take its pixels beyond "
            f"float32: {DAMAGED}"
        )
    syntax = transfer_syntax(header)
    if syntax.is_compressed or keyword != "PixelData":
        _decode_first_frame(path, header, syntax)
        return
    expected = (rows * columns * samples * frames * bits + 7) // 8
    stored = _stored_bytes(path, header, keyword, syntax)
    if stored < expected:
        raise InputError(
            f"{path} has pixel data that cannot be read ({stored} bytes, but Rows × Columns × frames × BitsAllocated "
            f"= {rows} × {columns} × {frames} × {bits} bits need {expected}: the file is truncated or its header "
            "damaged): replace or remove the file"
        )


def _decode_first_frame(path: Path, header: Dataset, syntax: UID) -> None:
    """Decode frame 0 as `LoadDicom` will (compressed or float pixel data: no header vouches for them)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pydicom's note on excess padding: the decoder copes
            frame, _ = get_decoder(syntax).as_array(header, index=0)
    except Exception as error:  # pydicom and its plugins raise many types
        if syntax.is_compressed:
            raise InputError(
                f"{path} has compressed pixel data ({syntax.name}) that cannot be decoded ({one_line(error)}): "
                f"{DECODER_FIX}; if it still fails, the file is damaged: replace or remove it"
            ) from error
        raise InputError(
            f"{path} has pixel data that cannot be read ({one_line(error)}): replace or remove the file"
        ) from error
    bad = int((~np.isfinite(frame)).sum())
    if bad:
        raise InputError(f"{path} has {bad} NaN or infinite pixels: fix or remove the file")
