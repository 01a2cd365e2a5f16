"""Any two folders of images, 2D (`.png`, `.npy`) or 3D (`.nii`, `.nii.gz`, `.npy`): train on your own data.

Layout: one folder of training images, one of validation images; the folders *are* the
split. A file directly in a folder is one patient (patient = its name without extension);
a subfolder is one patient (patient = the subfolder's name) with any number of images, so
all of a patient's images stay on one side of the split. An image's id is its path in its
folder without extension::

    data/
        train/
            knee_001.png            id knee_001            patient knee_001
            knee_002.npy            id knee_002            patient knee_002
            patient_17/
                left.png            id patient_17/left     patient patient_17
                right.png           id patient_17/right    patient patient_17
        val/
            knee_101.png            id knee_101            patient knee_101
            patient_18/
                visit_1/a.png       id patient_18/visit_1/a  patient patient_18

Every image is read, reduced to one channel, scaled to `[0, 1]` and resized (or
cropped/padded) to `spatial_size`, so images of mixed sizes and file formats may share a
folder; each must have as many spatial axes as `spatial_size` (2D images for a 2D
`spatial_size`, 3D volumes for a 3D one). Hidden files and folders (names starting with `.`)
are ignored; any other file that is not a supported image is an error, never skipped.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel
import numpy as np
import torch
from monai.data import NibabelReader, NumpyReader, PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
)
from PIL import Image

from datamodules.base import MedicalImageDataModule
from errors import InputError

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


def one_line(error: BaseException) -> str:
    """A library's error message on one line (the CLI prints an `InputError` as one line)."""
    return " ".join(str(error).split())


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

    Headers are read (not pixels); an unsupported or unreadable file, an image of other than
    `spatial_dims` axes, two files with one id, or no image at all raise `InputError`
    naming `option`, the command-line argument that gave `folder`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{option}={folder} is not a folder: set {option} to your image folder")
    records, seen = [], {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(root) / name
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


class FolderDataModule(MedicalImageDataModule):
    """Images from a training folder and a validation folder (see the module docstring for the layout).

    Files are checked when the module is set up (at CLI start-up): a missing or empty folder,
    a file that is not a supported image or whose header cannot be read, an image with more
    or fewer axes than `spatial_size`, and a patient in both folders each raise `InputError`
    naming the file. Pixels are read lazily; NaN/infinite pixels raise when an image is read.

    Args:
        train_dir: folder of training images.
        val_dir: folder of validation images; no patient may also be in `train_dir`.
        spatial_size: `(H, W)` or `(H, W, D)` every image is brought to; its length sets 2D or 3D.
        resize: `resize` interpolates to `spatial_size` ((bi/tri)linear, with Gaussian
            anti-aliasing when shrinking); `crop_or_pad` keeps the pixel spacing and centre-crops
            or zero-pads (zero is each image's minimum after scaling).
        intensity: `minmax` scales each image to `[0, 1]` by its own minimum and maximum
            (before and again after reaching `spatial_size`, so every image spans `[0, 1]`);
            `none` uses the values as stored, which must already lie in `[0, 1]`.
        batch_size, num_workers, n_train, augment, cache, ...: see `MedicalImageDataModule`;
            `val_fraction` and `split_seed` are unused: the folders are the split, unless
            `split_file` is given, which then decides the side of every patient of both folders.
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str,
        spatial_size: Sequence[int],
        resize: Literal["resize", "crop_or_pad"] = "resize",
        intensity: Literal["minmax", "none"] = "minmax",
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_size=spatial_size, **kwargs)
        if resize not in ("resize", "crop_or_pad"):
            raise InputError(f"resize={resize!r} must be resize or crop_or_pad")
        if intensity not in ("minmax", "none"):
            raise InputError(f"intensity={intensity!r} must be minmax or none")
        self.train_dir = Path(train_dir)
        self.val_dir = Path(val_dir)
        self.resize = resize
        self.intensity = intensity
        self._patient_split: dict[str, str] = {}

    def list_records(self) -> list[dict[str, Any]]:
        train = image_records(self.train_dir, "--data.init_args.train_dir", self.spatial_dims)
        val = image_records(self.val_dir, "--data.init_args.val_dir", self.spatial_dims)
        train_files = {r["patient"]: r["image"] for r in train}
        for record in val:
            if record["patient"] in train_files:
                raise InputError(
                    f"patient {record['patient']!r} is in both folders ({train_files[record['patient']]} and "
                    f"{record['image']}): move all of a patient's images to train_dir or to val_dir"
                )
        self._patient_split = {r["patient"]: "train" for r in train} | {r["patient"]: "val" for r in val}
        return train + val

    def given_split(self, patients: Sequence[str]) -> dict[str, str] | None:
        if self.split_file is not None:
            return None
        return {patient: self._patient_split[patient] for patient in patients}

    def load_transforms(self) -> list[Callable]:
        keys = "image"
        if self.resize == "resize":
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            shape = Resized(keys=keys, spatial_size=self.spatial_size, mode=mode, anti_aliasing=True)
        else:
            shape = ResizeWithPadOrCropd(keys=keys, spatial_size=self.spatial_size, mode="constant")
        if self.intensity == "none":
            clip = ScaleIntensityRanged(keys=keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
            return [LoadImageFile(), CheckUnitRange(), shape, clip]  # clip: interpolation's rounding
        # Scaled before reshaping, so that zero padding (crop_or_pad, and the anti-aliasing filter's
        # border) is each image's minimum whatever its units; and after, so that each spans [0, 1].
        scale = ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)
        return [LoadImageFile(), scale, shape, scale]
