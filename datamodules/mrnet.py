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

Splits, all by case (= patient):

- `authors` (default): Dar et al.'s own folds (arXiv 2402.01054), exactly as their code
  draws them: `indexes = list(range(1130)); random.seed(26); random.shuffle(indexes)`
  (Python's `random`), fold `k` validates on `indexes[226 k : 226 (k + 1)]` (the last fold
  on the rest) and trains on the other cases of `train/` (904 / 226). Case `i` is
  `train/<plane>/{i:04d}.npy`; `train/` must hold exactly the cases 0000–1129.
- `seeded`: 5 folds of a permutation seeded by `split_seed`, fold `fold` held out, for a
  `train/` that is not the full set; or, with `split_file`, the file's `patient,split` rows.
- `official`: trains on `train/` and validates on `valid/`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from monai.transforms import ResizeWithPadOrCropd, ScaleIntensityd, Transposed

from memwatch.datamodules.base import MedicalImageDataModule
from memwatch.datamodules.readers.image_files import LoadImageFile
from memwatch.errors import InputError, one_line

PLANES = ("axial", "coronal", "sagittal")
SPLITS = ("authors", "seeded", "official")
N_FOLDS = 5
# Dar et al.'s fold code: Python's random, seed 26, 1130 training cases, 226 per fold.
AUTHORS_SEED, AUTHORS_CASES, AUTHORS_FOLD_SIZE = 26, 1130, 226
DOWNLOAD = "https://stanfordmlgroup.github.io/competitions/mrnet/"


def expected_layout(root: Path | str, plane: str, split: str) -> str:
    """The files MRNetDataModule looks for, for error messages."""
    train = f"{root}/train/{plane}/0000.npy, {root}/train/{plane}/0001.npy, ..."
    return f"expected {train}" + (f" and {root}/valid/{plane}/1130.npy, ..." if split == "official" else "")


def authors_validation_cases(fold: int) -> list[int]:
    """The case numbers Dar et al. validate on in `fold` (0 to 4), in their shuffled order.

    Their code shuffles the global `random` state after `random.seed(26)`; a `random.Random(26)`
    of our own draws the same permutation without touching anyone else's random stream.
    """
    indexes = list(range(AUTHORS_CASES))
    random.Random(AUTHORS_SEED).shuffle(indexes)
    stop = AUTHORS_FOLD_SIZE * (fold + 1) if fold < N_FOLDS - 1 else AUTHORS_CASES
    return indexes[AUTHORS_FOLD_SIZE * fold : stop]


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
        split: `authors`: Dar et al.'s 5 folds of `train/` (cases 0000–1129), fold `fold`
            held out; `seeded`: 5 folds seeded by `split_seed`, or the rows of `split_file`;
            `official`: `train/` vs `valid/`. `paper` (a seeded split under that name in
            earlier versions) is refused: say `authors` or `seeded`.
        fold: the validation fold of the `authors` and `seeded` splits, 0 to 4.
        spatial_size: `(H, W, D)` every volume is centre-cropped or zero-padded to, slices
            last; the paper's is `(256, 256, 32)`.
        split_file: CSV `patient,split` deciding the side of every case of `train/`
            (patient ids `mrnet-train-NNNN`); with `split: seeded` only, the other two
            splits are fixed.
        batch_size, num_workers, n_train, augment, split_seed, cache, ...: see
            `MedicalImageDataModule` (`split_seed` also seeds the `n_train` subset);
            `val_fraction` is unused (one fold in five is held out).
    """

    split_options = (*MedicalImageDataModule.split_options, "split", "fold")

    def __init__(
        self,
        root: str,
        plane: Literal["axial", "coronal", "sagittal"] = "sagittal",
        # str, not a Literal: the CLI then shows the one-line error below for `split: paper`.
        split: str = "authors",
        fold: int = 0,
        spatial_size: Sequence[int] = (256, 256, 32),
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_size=spatial_size, **kwargs)
        if split == "paper":
            raise InputError(
                "split='paper' was a seeded 5-fold split, not the paper's: set --data.init_args.split authors "
                "(Dar et al.'s exact folds) or seeded (the folds that paper drew, seeded by split_seed)"
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
                f"split={split!r} must be authors (Dar et al.'s 5 folds of train/), seeded (5 seeded folds "
                "or split_file) or official (train/ vs valid/): set --data.init_args.split"
            )
        if split != "seeded" and self.split_file is not None:
            raise InputError(
                f"split_file is used with split: seeded only; split: {split} is fixed: set "
                "--data.init_args.split seeded or remove split_file"
            )
        if not (isinstance(fold, int) and 0 <= fold < N_FOLDS):
            raise InputError(f"fold={fold!r} must be 0 to {N_FOLDS - 1}: set --data.init_args.fold")
        self.root = Path(root)
        self.plane = plane
        self.split = split
        self.fold = fold

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

    def _check_authors_cases(self, train: list[dict[str, Any]]) -> None:
        """`InputError` unless `train/<plane>` holds exactly the cases 0000–1129 that the authors' folds index."""
        found = {Path(r["image_path"]).stem for r in train}
        expected = {f"{case:04d}" for case in range(AUTHORS_CASES)}
        missing, extra = sorted(expected - found), sorted(found - expected)
        if missing or extra:
            wrong = (
                f"lacks case {missing[0]} ({len(missing)} missing)" if missing
                else f"holds {extra[0]}.npy ({len(extra)} beyond 0000-1129)"
            )  # fmt: skip
            raise InputError(
                f"{self.root / 'train' / self.plane} {wrong}: split: authors (Dar et al.'s folds) needs exactly "
                "the 1130 training cases 0000-1129 of MRNet-v1.0; restore them, or set --data.init_args.split seeded"
            )

    def list_records(self) -> list[dict[str, Any]]:
        self._check_root()
        train = self._folder_records("train")
        self.own_split = {}
        if self.split == "official":
            val = self._folder_records("valid")
            self.own_split = {r["patient"]: "train" for r in train} | {r["patient"]: "val" for r in val}
            return train + val
        if self.split == "authors":
            self._check_authors_cases(train)
            held_out = {f"mrnet-train-{case:04d}" for case in authors_validation_cases(self.fold)}
        elif self.split_file is not None:
            return train  # the base class reads the sides from split_file
        else:
            order = np.random.default_rng(self.split_seed).permutation(len(train))
            held_out = {train[i]["patient"] for i in np.array_split(order, N_FOLDS)[self.fold]}
        self.own_split = {r["patient"]: ("val" if r["patient"] in held_out else "train") for r in train}
        return train

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
