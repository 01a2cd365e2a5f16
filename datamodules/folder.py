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
Files are listed and read by `datamodules.readers.image_files`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from monai.transforms import Resized, ResizeWithPadOrCropd

from memwatch.datamodules.base import MedicalImageDataModule
from memwatch.datamodules.intensity import CheckUnitRange, check_intensity, clip_to_unit, scale_to_unit
from memwatch.datamodules.readers.image_files import LoadImageFile, image_records
from memwatch.errors import InputError

# Also importable from here, as before `datamodules.readers` (bench/data_loading.py patches folder.LoadImageFile);
# new code imports them from `datamodules.readers.image_files` and `datamodules.intensity`.
__all__ = ["CheckUnitRange", "FolderDataModule", "LoadImageFile", "image_records"]


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
        self.scaling = check_intensity(intensity, ("minmax", "none"))
        self.train_dir = Path(train_dir)
        self.val_dir = Path(val_dir)
        self.resize = resize
        self.intensity = intensity

    def list_records(self) -> list[dict[str, Any]]:
        train = image_records(self.train_dir, "--data.init_args.train_dir", self.spatial_dims)
        val = image_records(self.val_dir, "--data.init_args.val_dir", self.spatial_dims)
        return self.records_of_two_roots(train, val, ("train_dir", "val_dir"), kind="folders", what="images")

    def load_transforms(self) -> list[Callable]:
        keys = "image"
        if self.resize == "resize":
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            shape = Resized(keys=keys, spatial_size=self.spatial_size, mode=mode, anti_aliasing=True)
        else:
            shape = ResizeWithPadOrCropd(keys=keys, spatial_size=self.spatial_size, mode="constant")
        scale = scale_to_unit(self.scaling, keys)
        if self.intensity == "none":
            return [LoadImageFile(), scale, shape, clip_to_unit(keys)]  # scale checks [0, 1]; clip: interpolation's rounding
        # Scaled before reshaping, so that zero padding (crop_or_pad, and the anti-aliasing filter's
        # border) is each image's minimum whatever its units; and after, so that each spans [0, 1].
        return [LoadImageFile(), scale, shape, scale]
