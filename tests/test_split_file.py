"""`split_file` (CSV `patient,split`) decides the split of every DataModule, on the smallest real-format data.

Each file puts a different number of patients on the validation side than the module's own
split would, so agreeing with the file cannot happen by chance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
from PIL import Image

from memwatch.datamodules import (
    ChestXray14DataModule,
    FolderDataModule,
    MedicalImageDataModule,
    MRNetDataModule,
    NiftiDataModule,
    PhantomDataModule,
)
from memwatch.datamodules.phantom import render_phantom
from tests.helpers import reference_images, write_chestxray14, write_mrnet


def write_split(path: Path, train: set[str], val: set[str]) -> Path:
    path.write_text(
        "patient,split\n"
        + "".join(f"{p},train\n" for p in sorted(train))
        + "".join(f"{p},val\n" for p in sorted(val))
    )
    return path


def assert_the_file_decides(
    build: Callable[[str | None], MedicalImageDataModule], split_file: Path, train: set[str], val: set[str]
) -> None:
    """`build(split_file)` splits as the file does, down to the batches; `build(None)` does not."""
    data = build(str(split_file))
    assert set(data.train_patients) == train and set(data.val_patients) == val
    for side, ids in (("train", data.train_ids), ("val", data.val_ids)):
        assert sorted(reference_images(data, side)) == sorted(ids)
    assert set(build(None).val_patients) != val


def test_phantom(tmp_path):
    val = {"phantom-0001", "phantom-0004", "phantom-0005"}  # the seeded split holds out 1 of 6
    train = {f"phantom-{i:04d}" for i in range(6)} - val
    split_file = write_split(tmp_path / "split.csv", train, val)
    assert_the_file_decides(
        lambda f: PhantomDataModule(spatial_size=(8, 8), n_patients=6, split_file=f), split_file, train, val
    )


def test_nifti(tmp_path):
    root = tmp_path / "nifti"
    for name in ["a.nii.gz", "b.nii", "c.nii.gz", "d.nii.gz", "e.nii.gz", "pat/x.nii.gz", "pat/y.nii.gz"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nibabel.save(
            nibabel.Nifti1Image(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4)), root / name
        )
    val = {"b", "pat"}  # a patient of two volumes; the seeded split holds out 1 of 6
    train = {"a", "c", "d", "e"}
    split_file = write_split(tmp_path / "split.csv", train, val)
    assert_the_file_decides(
        lambda f: NiftiDataModule(str(root), spatial_size=(4, 4, 4), split_file=f), split_file, train, val
    )
    assert set(NiftiDataModule(str(root), spatial_size=(4, 4, 4), split_file=str(split_file)).val_ids) == {
        "b", "pat/x", "pat/y",
    }  # fmt: skip


def test_chestxray_seeded(tmp_path):
    root = write_chestxray14(tmp_path / "ChestX-ray14")
    val = {"1", "4"}  # not NIH's lists (4, 5); the seeded split holds out 1 of 5
    train = {"2", "3", "5"}
    split_file = write_split(tmp_path / "split.csv", train, val)
    assert_the_file_decides(
        lambda f: ChestXray14DataModule(str(root), spatial_size=(16, 16), split="seeded", split_file=f),
        split_file,
        train,
        val,
    )


def test_mrnet_seeded(tmp_path):
    root = write_mrnet(
        tmp_path / "MRNet-v1.0", n_train=10, n_valid=1, size=(8, 8), slices=(3,), planes=("sagittal",)
    )
    val = {"mrnet-train-0000", "mrnet-train-0003", "mrnet-train-0005"}  # a seeded fold holds 2 of 10
    train = {f"mrnet-train-{c:04d}" for c in range(10)} - val
    split_file = write_split(tmp_path / "split.csv", train, val)
    assert_the_file_decides(
        lambda f: MRNetDataModule(str(root), split="seeded", spatial_size=(8, 8, 2), split_file=f),
        split_file,
        train,
        val,
    )


def test_folder(tmp_path):
    for folder, names in (
        ("train", ["p0.png", "p1.png", "p2.png", "multi/a.png", "multi/b.png"]),
        ("val", ["p3.png", "p4.png"]),
    ):
        for name in names:
            path = tmp_path / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(255 * render_phantom(name, (8, 8))[0]).astype(np.uint8)).save(path)
    val = {"p1", "multi", "p3"}  # across both folders, which hold out p3 and p4
    train = {"p0", "p2", "p4"}
    split_file = write_split(tmp_path / "split.csv", train, val)

    def build(f: str | None) -> FolderDataModule:
        return FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), (8, 8), split_file=f)

    assert_the_file_decides(build, split_file, train, val)
