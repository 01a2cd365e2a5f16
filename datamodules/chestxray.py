"""NIH ChestX-ray14 (Wang et al. 2017): 112,120 frontal chest radiographs of 30,805 patients, 2D.

The paper's 2D dataset (Dar et al., arXiv 2402.01054): images resized to 512×512, 10k
training / 10k validation images, and 5k/10k/20k training subsets (`n_train`, `n_val`).
The layout of the NIH download (box.com) and of its Kaggle copy are both read::

    data/ChestX-ray14/
        Data_Entry_2017.csv         Image Index, Patient ID, ... (one row per image)
        train_val_list.txt          optional: the official split, one image name per line
        test_list.txt               optional: ... the other side of it
        images/00000001_000.png     NIH: every images_NNN.tar.gz extracts to images/
        images_001/images/00000001_000.png   Kaggle: one folder per archive

(`Data_Entry_2017_v2020.csv`, NIH's corrected table, is read when `Data_Entry_2017.csv`
is absent.) An image's id is its name without extension (`00000001_000`), its patient the
table's `Patient ID`. The split is always by patient, so a patient's follow-up images are
never on both sides of it:

- `split: official` (default): training = `train_val_list.txt`, validation = `test_list.txt`,
  NIH's own patient-wise split (86,524 / 25,596 images); the lists must cover every image
  of the table exactly once and keep every patient on one side.
- `split: seeded`: the base class's seeded patient split (`val_fraction`, `split_seed`),
  or `split_file`; the list files are not needed.

Every image is reduced to one channel (RGB(A) → mean of R, G, B), scaled to `[0, 1]` by
its own minimum and maximum (8- and 16-bit PNGs alike), resized to `spatial_size`
(bilinear, Gaussian anti-aliasing when shrinking) and scaled to `[0, 1]` again.

The table, the folders and the PNG headers of the images in use are checked at setup;
pixels are read lazily. A missing PNG, a PNG that the table does not list, a corrupt PNG
or one of an unexpected mode is an `InputError` naming the file, never a silent skip.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from monai.transforms import Resized, ScaleIntensityd
from PIL import Image

from memwatch.datamodules.base import MedicalImageDataModule
from memwatch.datamodules.readers.image_files import LoadImageFile
from memwatch.errors import InputError, one_line

TABLES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")  # the first one present is read
IMAGE_COLUMN, PATIENT_COLUMN = "Image Index", "Patient ID"
LISTS = {"train": "train_val_list.txt", "val": "test_list.txt"}
# Grayscale 8/16/32-bit, with or without alpha, and RGB(A) (a few hundred NIH images are RGBA).
MODES = ("L", "LA", "I", "I;16", "I;16B", "I;16L", "RGB", "RGBA")
LAYOUT = (
    "expected ROOT/Data_Entry_2017.csv and PNGs in ROOT/images/ (NIH) or ROOT/images_001/images/ ... "
    "(Kaggle), optionally ROOT/train_val_list.txt and ROOT/test_list.txt"
)


def check_png(path: Path) -> None:
    """Read one PNG's header; raise `InputError` if it is unreadable or of a mode a radiograph should not have."""
    try:
        with Image.open(path) as image:
            image_format, mode = image.format, image.mode
    except Exception as error:  # PIL raises several types for a damaged file
        raise InputError(
            f"{path} cannot be read as PNG ({one_line(error)}): download the file again"
        ) from error
    if image_format != "PNG":
        raise InputError(f"{path} is a {image_format} file, not a PNG: download the file again")
    if mode not in MODES:
        raise InputError(
            f"{path} has the PNG mode {mode}, not one of {', '.join(MODES)}: download the file again "
            "or save it as grayscale"
        )


class ChestXray14DataModule(MedicalImageDataModule):
    """NIH ChestX-ray14 radiographs, split by patient (see the module docstring for the layout).

    Args:
        root: the dataset folder (`Data_Entry_2017.csv`, `images*/`, the list files).
        spatial_size: `(H, W)` every image is resized to; the paper's 512×512 by default
            (the files are 1024×1024).
        split: `official` (NIH's `train_val_list.txt` / `test_list.txt`) or `seeded` (the
            base class's seeded patient split by `val_fraction` and `split_seed`, or `split_file`).
        n_val: validate on this many validation images (a seeded subset, as `n_train` for
            training); `None` for all. The paper: 10k training and 10k validation images.
        batch_size, num_workers, n_train, augment, cache, ...: see `MedicalImageDataModule`.
    """

    split_options = (*MedicalImageDataModule.split_options, "split", "n_val")

    def __init__(
        self,
        root: str = "data/ChestX-ray14",
        spatial_size: Sequence[int] = (512, 512),
        split: Literal["official", "seeded"] = "official",
        n_val: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_size=spatial_size, **kwargs)
        if self.spatial_dims != 2:
            raise InputError(
                f"spatial_size={list(spatial_size)}: ChestX-ray14 images are 2D, set --data.init_args.spatial_size "
                "to 2 sizes, e.g. [512, 512]"
            )
        if split not in ("official", "seeded"):
            raise InputError(f"split={split!r} must be official or seeded")
        if split == "official" and kwargs.get("split_file") is not None:
            raise InputError(
                "split_file is used with split: seeded only; split: official takes NIH's train_val_list.txt "
                "and test_list.txt: set --data.init_args.split seeded or remove split_file"
            )
        if n_val is not None and n_val < 1:
            raise InputError(f"n_val={n_val} must be at least 1 (or null for all validation images)")
        self.root = Path(root)
        self.split = split
        self.n_val = n_val
        self._table_path = self.root / TABLES[0]

    # --- the table and the folders -----------------------------------------------------

    def _table(self) -> list[tuple[str, str]]:
        """`(image name, patient)` for every row of the table, in its order."""
        if not self.root.is_dir():
            raise InputError(
                f"root={self.root} is not a folder: set --data.init_args.root to the dataset ({LAYOUT})"
            )
        path = next((self.root / name for name in TABLES if (self.root / name).is_file()), None)
        if path is None:
            raise InputError(f"{self.root / TABLES[0]} does not exist: {LAYOUT}")
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                header = [name.strip() for name in next(reader, [])]
                missing = [c for c in (IMAGE_COLUMN, PATIENT_COLUMN) if c not in header]
                if missing:
                    raise InputError(
                        f"{path} has no column {' or '.join(repr(c) for c in missing)} (its header: "
                        f"{','.join(header)[:200]!r}): use NIH's Data_Entry_2017.csv, whose columns include "
                        f"{IMAGE_COLUMN},...,{PATIENT_COLUMN}"
                    )
                image_at, patient_at = header.index(IMAGE_COLUMN), header.index(PATIENT_COLUMN)
                rows, seen = [], {}
                for line, row in enumerate(reader, start=2):
                    if not any(cell.strip() for cell in row):
                        continue  # a blank line (e.g. at the end of the file) holds no image
                    name = row[image_at].strip() if len(row) > image_at else ""
                    patient = row[patient_at].strip() if len(row) > patient_at else ""
                    if not name.lower().endswith(".png") or not patient:
                        raise InputError(
                            f"{path} line {line} has {IMAGE_COLUMN}={name!r} and {PATIENT_COLUMN}={patient!r}: "
                            "every row needs a .png name and a patient; download the table again"
                        )
                    if name in seen:
                        raise InputError(
                            f"{path} lists {name} twice (lines {seen[name]} and {line}): remove one row"
                        )
                    seen[name] = line
                    rows.append((name, patient))
        except (UnicodeDecodeError, csv.Error) as error:
            raise InputError(
                f"{path} cannot be read as CSV ({one_line(error)}): download the table again"
            ) from error
        if not rows:
            raise InputError(f"{path} lists no images: download NIH's Data_Entry_2017.csv again")
        self._table_path = path
        return rows

    def _image_files(self) -> dict[str, Path]:
        """Every PNG in `root/images*/` and `root/images*/images/`, by file name."""
        folders = sorted(p for p in self.root.glob("images*") if p.is_dir())
        if not folders:
            raise InputError(f"{self.root} has no images folder: {LAYOUT}")
        files: dict[str, Path] = {}
        for folder in folders:
            inner = [folder / "images"] if (folder / "images").is_dir() else []
            found = 0
            for directory in [folder, *inner]:
                for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                    if entry.name.startswith(".") or (
                        directory == folder and entry.name == "images" and inner
                    ):
                        continue
                    path = Path(entry.path)
                    if not entry.is_file() or not entry.name.lower().endswith(".png"):
                        raise InputError(f"{path} is not a PNG image: move it out of {directory} ({LAYOUT})")
                    if entry.name in files:
                        raise InputError(
                            f"{path} and {files[entry.name]} have the same name: delete one of them"
                        )
                    files[entry.name] = path
                    found += 1
            if not found:
                raise InputError(
                    f"{folder} holds no PNG images: extract the images into it or delete it ({LAYOUT})"
                )
        return files

    def _official_split(self, names: list[str]) -> dict[str, str]:
        """Image name → `train`/`val` from NIH's list files."""
        sides: dict[str, str] = {}
        for side, list_name in LISTS.items():
            path = self.root / list_name
            if not path.is_file():
                raise InputError(
                    f"{path} does not exist: split: official needs NIH's {LISTS['train']} and {LISTS['val']} "
                    "in root; download them or set --data.init_args.split seeded"
                )
            for line, name in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
                name = name.strip()
                if not name:
                    continue
                if name in sides:
                    where = "listed twice" if sides[name] == side else f"also in {LISTS[sides[name]]}"
                    raise InputError(
                        f"{path} line {line}: {name} is {where}: each image belongs in one list once"
                    )
                sides[name] = side
        table = set(names)
        unknown = sorted(set(sides) - table)
        if unknown:
            raise InputError(
                f"{self.root / LISTS[sides[unknown[0]]]} lists {unknown[0]} ({len(unknown)} such), which "
                f"{self._table_path.name} does not: use the list files and the table of one download"
            )
        unlisted = [name for name in names if name not in sides]
        if unlisted:
            raise InputError(
                f"{unlisted[0]} ({len(unlisted)} such), a row of {self._table_path}, is in neither "
                f"{self.root / LISTS['train']} nor {self.root / LISTS['val']}: use the list files of the same download, or "
                "--data.init_args.split seeded"
            )
        return sides

    def list_records(self) -> list[dict[str, Any]]:
        table = self._table()
        files = self._image_files()
        listed = {name for name, _ in table}
        stray = sorted(name for name in files if name not in listed)
        if stray:
            raise InputError(
                f"{files[stray[0]]} ({len(stray)} such) is not in {self._table_path}: every PNG needs a row "
                "there; move unlisted images out of the images folders"
            )
        missing = [name for name, _ in table if name not in files]
        if missing:
            raise InputError(
                f"{missing[0]}, listed in {self._table_path}, is in no images folder under {self.root} ({len(missing)} "
                f"of the table's {len(table)} images are missing): download and extract every images_NNN archive ({LAYOUT})"
            )
        self.own_split = {}
        if self.split == "official":
            sides = self._official_split([name for name, _ in table])
            patient_split: dict[str, tuple[str, str]] = {}
            for name, patient in table:
                side = sides[name]
                first = patient_split.setdefault(patient, (side, name))
                if first[0] != side:
                    raise InputError(
                        f"patient {patient} has images in both {self.root / LISTS[first[0]]} ({first[1]}) and "
                        f"{self.root / LISTS[side]} ({name}): the split must be by patient; use NIH's list files "
                        "or --data.init_args.split seeded"
                    )
            self.own_split = {patient: side for patient, (side, _) in patient_split.items()}
        return [
            {"id": name[: -len(".png")], "patient": patient, "image": str(files[name]), "image_path": str(files[name]), "format": "png"}
            for name, patient in table
        ]  # fmt: skip

    def _split(self, records: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
        train, val = super()._split(records)
        if self.n_val is not None:
            if self.n_val > len(val):
                raise InputError(
                    f"n_val={self.n_val} is larger than the {len(val)} validation images of "
                    f"{type(self).__name__}: set --data.init_args.n_val to at most {len(val)}"
                )
            # A seeded subset, nested like n_train's (another stream of the same seed).
            order = np.random.default_rng([self.split_seed, 1]).permutation(len(val))
            val = [val[i] for i in sorted(order[: self.n_val])]
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_records is not None:
            return
        super().setup(stage)
        try:  # only the headers of the images in use: a 10k subset does not open all 112k files
            for record in [*self.train_records, *self.val_records]:
                check_png(Path(record["image_path"]))
        except InputError:
            self.train_records = self.val_records = None  # a later setup() checks again
            raise

    # --- pixels ------------------------------------------------------------------------

    def load_transforms(self) -> list[Callable]:
        # Scaled before resizing, so the anti-aliasing filter's zero border is each image's
        # minimum whatever its bit depth; and after, so that each spans [0, 1].
        scale = ScaleIntensityd(keys="image", minv=0.0, maxv=1.0)
        resize = Resized(keys="image", spatial_size=self.spatial_size, mode="bilinear", anti_aliasing=True)
        return [LoadImageFile(), scale, resize, scale]
