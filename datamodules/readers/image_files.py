"""Image files by extension, 2D (`.png`, `.npy`) or 3D (`.nii`, `.nii.gz`, `.npy`): headers at setup, pixels later.

`image_records` lists a folder of image files (headers only: shape and readability);
`LoadImageFile` reads one record's pixels into a one-channel `[1, *spatial]` float32 tensor.
Both name the file and its fix in one `InputError` line. `FolderDataModule`, `NiftiDataModule`,
`MRNetDataModule`, `ChestXray14DataModule` and the audit's synthetic folder read through them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import torch
from monai.data import NibabelReader, NumpyReader, PILReader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from memwatch.datamodules.readers.folders import visible_files
from memwatch.errors import InputError, one_line

# With pydicom installed, every MONAI LoadImage builds its GPU DICOM reader, which warns (and logs)
# on each construction where nvImageCodec is absent; DICOM is read by pydicom's own decoders then.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".npy": "npy", ".png": "png"}  # longest suffix first
SUPPORTED = ", ".join(sorted(FORMATS))
PNG_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"}


def image_format(path: Path) -> tuple[str, str] | None:
    """`(format, name without extension)` of a supported image file, else `None`; case-insensitive."""
    lower = path.name.lower()
    for suffix, kind in FORMATS.items():
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return kind, path.name[: -len(suffix)]
    return None


def _pil_readable(image: Image.Image) -> Image.Image:
    # A palette PNG stores indices, not intensities: expand the palette before reading pixels.
    return image.convert("RGBA") if image.mode in ("P", "PA") else image


def check_image_file(path: Path, kind: str, spatial_dims: int) -> tuple[int, ...]:
    """Read only the header of one image: its spatial shape; `InputError` if unreadable or of the wrong dimensionality."""
    try:
        if kind == "png":
            with Image.open(path) as image:
                shape, detail = (image.height, image.width), f"mode {image.mode}"
                if image.mode not in PNG_MODES:
                    raise InputError(
                        f"{path} has the unsupported PNG mode {image.mode}: save it as grayscale (L, I;16) or RGB(A)"
                    )
        elif kind == "npy":
            with path.open("rb") as handle:
                if handle.read(6) != b"\x93NUMPY":
                    raise ValueError("no .npy header; save arrays with numpy.save")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, detail = array.shape, f"dtype {array.dtype}"
            if array.dtype.kind not in "biuf":
                raise InputError(
                    f"{path} holds {array.dtype} values: save it as a numeric (integer or float) array"
                )
        else:
            shape, detail = nibabel.load(path).shape, "NIfTI"
    except InputError:
        raise
    except Exception as error:  # PIL, numpy and nibabel raise many types for a damaged file
        raise InputError(
            f"{path} cannot be read as {kind} ({one_line(error)}): replace or remove the file"
        ) from error
    if len(shape) != spatial_dims or min(shape) < 1:
        expected = "(H, W)" if spatial_dims == 2 else "(H, W, D)"
        raise InputError(
            f"{path} has shape {tuple(int(s) for s in shape)} ({detail}), but spatial_size has {spatial_dims} axes "
            f"and needs {spatial_dims}D images {expected} without a channel axis: remove the file or set "
            "--data.init_args.spatial_size to match"
        )
    return tuple(int(s) for s in shape)


def image_records(folder: Path, option: str, spatial_dims: int) -> list[dict[str, Any]]:
    """Every image under `folder`, sorted, as records `{id, patient, image, image_path, format, shape}`.

    A file directly in `folder` is one patient (its name without extension), a subfolder is one
    patient (its name); an image's id is its path in `folder` without extension. Headers are
    read (not pixels); an unsupported or unreadable file, an image of other than `spatial_dims`
    axes, two files with one id, or no image at all raise `InputError` naming `option`, the
    command-line argument that gave `folder`. Hidden files and folders are ignored (see `visible_files`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{option}={folder} is not a folder: set {option} to your image folder")
    records, seen = [], {}
    for path in visible_files(folder, option):
        found = image_format(path)
        if found is None:
            raise InputError(
                f"{path} is not a supported image ({SUPPORTED}): convert it or move it out of {option}"
            )
        kind, stem = found
        relative = path.parent.relative_to(folder) / stem
        image_id = relative.as_posix()
        if image_id in seen:
            raise InputError(
                f"{path} and {seen[image_id]} have the same id {image_id!r}: rename one of them"
            )
        seen[image_id] = path
        shape = check_image_file(path, kind, spatial_dims)
        patient = relative.parts[0]  # the subfolder, or the file itself in a flat folder
        records.append(
            {
                "id": image_id,
                "patient": patient,
                "image": str(path),
                "image_path": str(path),
                "format": kind,
                "shape": shape,
            }
        )
    if not records:
        raise InputError(
            f"{option}={folder} holds no images: add {SUPPORTED} files (subfolders are searched)"
        )
    return records


class LoadImageFile:
    """Record `{"image": path, "format": ...}` → `image` as a one-channel `[1, *spatial]` float32 tensor.

    The MONAI reader follows the file's extension. PNGs are read as `(H, W)` (rows first, as
    numpy and PIL show them; MONAI's default swaps the axes); RGB(A) becomes the mean of
    R, G and B, alpha is dropped. Unreadable files, NaN and infinite pixels raise `InputError`.
    """

    def __init__(self) -> None:
        readers = {
            "png": PILReader(converter=_pil_readable, reverse_indexing=False),
            "npy": NumpyReader(),
            "nifti": NibabelReader(),
        }
        self.loaders = {
            kind: Compose(
                [LoadImaged(keys="image", reader=reader, image_only=True), EnsureChannelFirstd(keys="image")]
            )
            for kind, reader in readers.items()
        }

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        path = record["image_path"]
        try:
            image = self.loaders[record["format"]](dict(record))["image"]
        except Exception as error:  # the header was fine at setup, the pixel data is not
            reason = one_line(error.__cause__ or error)  # MONAI's Compose wraps the reader's error
            raise InputError(f"{path} cannot be read ({reason}): replace or remove the file") from error
        if image.shape[0] == 2:  # grayscale + alpha
            image = image[:1]
        elif image.shape[0] in (3, 4):  # RGB(A): the mean of the colour channels
            image = image[:3].mean(dim=0, keepdim=True)
        finite = torch.isfinite(image)
        if not bool(finite.all()):
            raise InputError(
                f"image {record['id']} ({path}) has {int((~finite).sum())} NaN or infinite pixels: "
                "fix or remove the file"
            )
        return {**record, "image": image}
