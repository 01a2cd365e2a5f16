"""MRNet knee MRI (Stanford, MRNet-v1.0) as 3D volumes of one plane: the paper's 3D dataset.

The official layout, as downloaded::

    MRNet-v1.0/
        train/{axial,coronal,sagittal}/0000.npy ... 1129.npy     1130 cases
        valid/{axial,coronal,sagittal}/1130.npy ... 1249.npy     120 cases
        train-abnormal.csv, train-acl.csv, train-meniscus.csv, valid-*.csv   (labels, not used)

Each `.npy` is one case's series in one plane, `(slices, 256, 256)` uint8, with a varying
(often odd) number of slices. A case is one patient; its id is `mrnet-<folder>-<case>`,
e.g. `mrnet-train-0001`, `mrnet-valid-1130`.

Each volume of the chosen `plane` (sagittal by default, as the paper) becomes a one-channel
`[1, H, W, D]` tensor with the slices last (MONAI's `(H, W, D)`), is centre-cropped or
zero-padded to `spatial_size` (the paper: 256×256×32) and min-max scaled to `[0, 1]` per volume.

Splits: `paper` (default) holds out fold `fold` of a seeded 5-fold split of the official
training cases (1130 → 904 train / 226 val, as Dar et al., arXiv 2402.01054); `official`
trains on `train/` and validates on `valid/`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from monai.transforms import ResizeWithPadOrCropd, ScaleIntensityd, Transposed

from datamodules.base import MedicalImageDataModule
from datamodules.folder import LoadImageFile, one_line
from errors import InputError

PLANES = ("axial", "coronal", "sagittal")
SPLITS = ("paper", "official")
N_FOLDS = 5
DOWNLOAD = "https://stanfordmlgroup.github.io/competitions/mrnet/"


def expected_layout(root: Path | str, plane: str, split: str) -> str:
    """The files MRNetDataModule looks for, for error messages."""
    train = f"{root}/train/{plane}/0000.npy, {root}/train/{plane}/0001.npy, ..."
    return f"expected {train}" + (f" and {root}/valid/{plane}/1130.npy, ..." if split == "official" else "")


def check_volume(path: Path) -> tuple[int, ...]:
    """Read only the header of one MRNet `.npy`; its shape, or `InputError` if unreadable or not 3-D numeric."""
    try:
        with path.open("rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                raise ValueError("no .npy header")
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # also fails on a truncated file
    except Exception as error:  # numpy raises many types for a damaged file
        raise InputError(
            f"{path} cannot be read as .npy ({one_line(error)}): replace it with the file from the MRNet-v1.0 download"
        ) from error
    if array.dtype.kind not in "biuf":
        raise InputError(
            f"{path} holds {array.dtype} values, not numbers: replace it with the file from the MRNet-v1.0 download"
        )
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(
            f"{path} has shape {tuple(int(s) for s in array.shape)}, but an MRNet volume is a 3-D array "
            "(slices, 256, 256): replace it with the file from the MRNet-v1.0 download"
        )
    return tuple(int(s) for s in array.shape)


class MRNetDataModule(MedicalImageDataModule):
    """MRNet-v1.0 knee MRI volumes of one plane (see the module docstring for the layout).

    Every file of the chosen plane is checked at set-up (CLI start-up), reading headers only:
    a missing root or plane folder, an empty plane folder, a file that is not a readable
    `.npy`, and an array that is not 3-D each raise `InputError` naming the path. NaN or
    infinite voxels raise when a volume is read. The label CSVs are not needed.

    Args:
        root: the `MRNet-v1.0` folder (holding `train/` and, for `split="official"`, `valid/`).
        plane: `sagittal` (the paper's), `coronal` or `axial`.
        split: `paper`: 5 seeded folds of the official training cases, fold `fold` held
            out (`split_seed` seeds the folds); `official`: `train/` vs `valid/`.
        fold: the validation fold of the `paper` split, 0 to 4.
        spatial_size: `(H, W, D)` every volume is centre-cropped or zero-padded to, slices
            last; the paper's is `(256, 256, 32)`.
        batch_size, num_workers, n_train, augment, split_seed, cache, ...: see
            `MedicalImageDataModule`; `val_fraction` is unused (one fold in five is held
            out) and `split_file` is refused (use `split` and `fold`).
    """

    split_options = (*MedicalImageDataModule.split_options, "split", "fold")

    def __init__(
        self,
        root: str,
        plane: Literal["axial", "coronal", "sagittal"] = "sagittal",
        split: Literal["paper", "official"] = "paper",
        fold: int = 0,
        spatial_size: Sequence[int] = (256, 256, 32),
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_size=spatial_size, **kwargs)
        if kwargs.get("split_file") is not None:
            raise InputError(
                "MRNetDataModule takes its split from split (paper or official) and fold: remove split_file"
            )
        if self.spatial_dims != 3:
            raise InputError(
                f"spatial_size={list(spatial_size)}: MRNet volumes are 3D, give 3 sizes (H, W, D), e.g. [256, 256, 32]"
            )
        if plane not in PLANES:
            raise InputError(
                f"plane={plane!r} must be one of {', '.join(PLANES)}: set --data.init_args.plane"
            )
        if split not in SPLITS:
            raise InputError(
                f"split={split!r} must be paper (5 folds of train/) or official (train/ vs valid/)"
            )
        if not (isinstance(fold, int) and 0 <= fold < N_FOLDS):
            raise InputError(f"fold={fold!r} must be 0 to {N_FOLDS - 1}: set --data.init_args.fold")
        self.root = Path(root)
        self.plane = plane
        self.split = split
        self.fold = fold
        self._patient_split: dict[str, str] = {}

    def _check_root(self) -> None:
        layout = expected_layout(self.root, self.plane, self.split)
        if not self.root.is_dir():
            raise InputError(
                f"root={self.root} is not a folder: download MRNet-v1.0 ({DOWNLOAD}) and set "
                f"--data.init_args.root to it ({layout})"
            )
        if not (self.root / "train").is_dir() and (self.root / "MRNet-v1.0" / "train").is_dir():
            raise InputError(
                f"root={self.root} holds the dataset one level down: set --data.init_args.root {self.root / 'MRNet-v1.0'}"
            )

    def _folder_records(self, folder_name: str) -> list[dict[str, Any]]:
        folder = self.root / folder_name / self.plane
        layout = expected_layout(self.root, self.plane, self.split)
        if not folder.is_dir():
            raise InputError(
                f"{folder} is not a folder: root={self.root} is not in the MRNet-v1.0 layout ({layout}); "
                "set --data.init_args.root to the unpacked MRNet-v1.0 folder"
            )
        records = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if not entry.is_file() or path.suffix != ".npy" or len(path.name) == len(".npy"):
                raise InputError(
                    f"{path} is not an MRNet volume (NNNN.npy): move it out of {folder} ({layout})"
                )
            check_volume(path)
            case_id = f"mrnet-{folder_name}-{path.stem}"
            records.append(
                {
                    "id": case_id,
                    "patient": case_id,  # one case is one patient, with one volume per plane
                    "image": str(path),
                    "image_path": str(path),
                    "format": "npy",
                }
            )
        if not records:
            raise InputError(
                f"{folder} holds no .npy volumes: copy the MRNet-v1.0 {folder_name}/{self.plane} files there ({layout})"
            )
        return records

    def list_records(self) -> list[dict[str, Any]]:
        self._check_root()
        train = self._folder_records("train")
        if self.split == "official":
            val = self._folder_records("valid")
            self._patient_split = {r["patient"]: "train" for r in train} | {r["patient"]: "val" for r in val}
            return train + val
        # The paper's split: 5 seeded folds of the official training cases (1130 → 904 / 226).
        order = np.random.default_rng(self.split_seed).permutation(len(train))
        held_out = {train[i]["patient"] for i in np.array_split(order, N_FOLDS)[self.fold]}
        self._patient_split = {r["patient"]: ("val" if r["patient"] in held_out else "train") for r in train}
        return train

    def given_split(self, patients: Sequence[str]) -> dict[str, str] | None:
        return {patient: self._patient_split[patient] for patient in patients}

    def load_transforms(self) -> list[Callable]:
        keys = "image"
        scale = ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)
        # [1, slices, H, W] → [1, H, W, slices]; scaled before the zero padding (so it is each
        # volume's minimum) and after the crop (so every volume spans [0, 1]).
        return [
            LoadImageFile(),
            Transposed(keys=keys, indices=(0, 2, 3, 1)),
            scale,
            ResizeWithPadOrCropd(keys=keys, spatial_size=self.spatial_size, mode="constant"),
            scale,
        ]
