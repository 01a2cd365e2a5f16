"""FolderDataModule on tiny files written in the real formats: PNG (8/16-bit, RGBA), .npy, .nii, .nii.gz."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image

from memwatch.datamodules import FolderDataModule
from memwatch.errors import InputError
from tests.helpers import input_error
from tests.helpers import reference_images as images


def write_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return path


def write_npy(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def write_nifti(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    return path


def gradient(shape: tuple[int, ...], high: float) -> np.ndarray:
    """Values rising along the first axis (rows), from 0 to `high`, plus a small pattern along the others."""
    rows = np.linspace(0.0, high, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    return rows + 0.01 * high * (np.indices(shape).sum(axis=0) % 3)


def minmax(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    return (array - array.min()) / (array.max() - array.min())


def test_every_2d_format_becomes_one_channel_in_unit_range_at_spatial_size(tmp_path):
    rows8 = np.round(gradient((40, 20), 200.0)).astype(np.uint8)  # 40 rows, 20 columns
    rows16 = np.round(gradient((40, 20), 60000.0)).astype(np.uint16)  # beyond 8 bits
    write_png(tmp_path / "train/gray8.png", rows8)
    write_png(tmp_path / "train/gray16.png", rows16)
    rgba = np.zeros((40, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = rows8, rows8 // 2, 0  # alpha 0 everywhere: ignored
    write_png(tmp_path / "train/colour.png", rgba, "RGBA")
    write_npy(tmp_path / "train/ct.npy", gradient((40, 20), 3000.0).astype(np.float32) - 1000.0)  # HU-like units
    write_png(tmp_path / "val/held_out.PNG", rows8)

    exact = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [40, 20], resize="crop_or_pad", batch_size=3)
    assert exact.train_ids == ["colour", "ct", "gray16", "gray8"] and exact.val_ids == ["held_out"]
    loaded = images(exact)
    # Rows stay rows (MONAI's PNG reader would swap them by default), 16 bits are kept,
    # RGB becomes the mean of its channels (alpha dropped), any units become [0, 1].
    np.testing.assert_allclose(loaded["gray8"][0].numpy(), minmax(rows8), atol=1e-6)
    np.testing.assert_allclose(loaded["gray16"][0].numpy(), minmax(rows16), atol=1e-6)
    np.testing.assert_allclose(loaded["colour"][0].numpy(), minmax(rows8 * 1.0 + rows8 // 2), atol=1e-6)
    np.testing.assert_allclose(loaded["ct"][0].numpy(), minmax(gradient((40, 20), 3000.0)), atol=1e-5)
    # Padding is the image's minimum (black), whatever the file's units.
    padded = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [44, 20], resize="crop_or_pad")
    ct = images(padded)["ct"][0].numpy()
    np.testing.assert_allclose(ct[2:42], minmax(gradient((40, 20), 3000.0)), atol=1e-5)
    assert np.all(ct[:2] == 0.0) and np.all(ct[42:] == 0.0)

    resized = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [16, 24], batch_size=4)
    batch = next(iter(resized.train_dataloader()))
    assert set(batch) == {"image", "id"} and type(batch["image"]) is torch.Tensor
    assert batch["image"].shape == (4, 1, 16, 24) and batch["image"].dtype == torch.float32
    assert torch.all(batch["image"].amin(dim=(1, 2, 3)) == 0.0) and torch.all(batch["image"].amax(dim=(1, 2, 3)) == 1.0)
    top, bottom = batch["image"][:, :, :4].mean(dim=(1, 2, 3)), batch["image"][:, :, -4:].mean(dim=(1, 2, 3))
    assert torch.all(top < bottom)  # every image still dark at the top, bright at the bottom


def test_3d_volumes_from_nifti_and_npy(tmp_path):
    volume = gradient((20, 12, 6), 500.0)
    write_nifti(tmp_path / "train/a.nii.gz", volume.astype(np.float32))
    write_nifti(tmp_path / "train/b.nii", volume.astype(np.int16))
    write_npy(tmp_path / "val/c.npy", volume)
    data = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [16, 16, 8], batch_size=2)
    assert data.train_ids == ["a", "b"] and data.val_ids == ["c"]
    for split in ("train", "val"):
        for image in images(data, split).values():
            assert image.shape == (1, 16, 16, 8)
            assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    padded = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [24, 12, 6], resize="crop_or_pad")
    image = images(padded)["a"][0]
    np.testing.assert_allclose(image[2:22].numpy(), minmax(volume), atol=1e-6)  # centred, zero-padded rows
    assert float(image[:2].abs().max()) == 0.0 and float(image[22:].abs().max()) == 0.0


def test_intensity_none_keeps_values_and_checks_the_range(tmp_path):
    unit = gradient((8, 8), 0.9).astype(np.float32)
    write_npy(tmp_path / "train/ok.npy", unit)
    write_npy(tmp_path / "val/ok_too.npy", unit)
    data = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [8, 8], intensity="none")
    np.testing.assert_array_equal(images(data)["ok"][0].numpy(), unit)
    write_npy(tmp_path / "train/too_bright.npy", unit * 2)
    data = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [8, 8], intensity="none", batch_size=2)
    error = input_error(lambda: images(data))
    assert "too_bright" in str(error) and "intensity minmax" in str(error)


def test_folders_are_the_split_and_subfolders_are_patients(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for name in ["train/knee_001.png", "train/knee_002.png", "train/patient_17/left.png", "train/patient_17/right.png",
                 "val/knee_101.png", "val/patient_18/scans/a.png"]:  # fmt: skip
        write_png(tmp_path / name, pixels)
    (tmp_path / "train/.DS_Store").write_bytes(b"\0")  # hidden files are not images
    (tmp_path / "train/.cache").mkdir()
    (tmp_path / "train/.cache/x.txt").write_text("hidden")
    data = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [8, 8], val_fraction=0.9)
    assert data.train_ids == ["knee_001", "knee_002", "patient_17/left", "patient_17/right"]
    assert data.val_ids == ["knee_101", "patient_18/scans/a"]
    assert [r["patient"] for r in data.train_records] == ["knee_001", "knee_002", "patient_17", "patient_17"]
    assert [r["patient"] for r in data.val_records] == ["knee_101", "patient_18"]
    subset = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [8, 8], n_train=2)
    assert len(subset.train_ids) == 2 and subset.val_ids == data.val_ids


@pytest.mark.parametrize("patient", ["knee_001.png", "patient_17/left.png"], ids=["flat", "subfolder"])
def test_a_patient_in_both_folders_is_an_error(tmp_path, patient):
    pixels = np.zeros((8, 8), np.uint8)
    write_png(tmp_path / "train" / patient, pixels)
    write_png(tmp_path / "train/other.png", pixels)
    write_png(tmp_path / "val" / patient.replace("left", "right"), pixels)
    error = input_error(FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [8, 8]).setup)
    name = patient.split("/")[0].removesuffix(".png")
    assert f"patient {name!r} is in both folders" in str(error)
    assert str(tmp_path / "train" / patient) in str(error)


def _garbage(path: Path) -> Path:
    path.write_bytes(b"definitely not an image")
    return path


def _truncated(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _twins(train: Path) -> Path:
    write_png(train / "twin.png", np.zeros((8, 8), np.uint8))
    return write_npy(train / "twin.npy", np.zeros((8, 8)))


# Per case: write the bad input into an empty train/ and return (the offending path, a phrase of its error).
BAD_INPUTS = {
    "missing folder": lambda train: (train / "absent", "is not a folder"),
    "empty folder": lambda train: (train, "holds no images: add .nii, .nii.gz, .npy, .png files"),
    "unsupported file": lambda train: (write_npy(train / "scan.npy", np.zeros(1)).rename(train / "scan.npz"), "is not a supported image"),
    "corrupt png": lambda train: (_garbage(train / "bad.png"), "cannot be read as png"),
    "corrupt npy": lambda train: (_garbage(train / "bad.npy"), "cannot be read as npy"),
    "truncated npy": lambda train: (_truncated(write_npy(train / "cut.npy", np.zeros((8, 8))), 200), "cannot be read as npy"),
    "object npy": lambda train: (write_npy(train / "objects.npy", np.array([None, 1])), "cannot be read as npy"),
    "corrupt nii.gz": lambda train: (_garbage(train / "bad.nii.gz"), "cannot be read as nifti"),
    "3D volume in a 2D dataset": lambda train: (write_nifti(train / "vol.nii.gz", np.zeros((8, 8, 4), np.float32)), "has shape (8, 8, 4)"),
    "3D array in a 2D dataset": lambda train: (write_npy(train / "stack.npy", np.zeros((3, 8, 8))), "has shape (3, 8, 8)"),
    "same id twice": lambda train: (_twins(train), "have the same id 'twin'"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_an_input_error_naming_the_file(tmp_path, case):
    write_png(tmp_path / "val/fine.png", np.zeros((8, 8), np.uint8))
    train = tmp_path / "train"
    train.mkdir()
    path, phrase = BAD_INPUTS[case](train)
    data = FolderDataModule(str(train if path.is_file() else path), str(tmp_path / "val"), [8, 8])
    error = input_error(data.setup)
    assert str(path) in str(error) and phrase in str(error), str(error)


def test_a_png_in_a_3d_dataset_is_an_error(tmp_path):
    write_nifti(tmp_path / "train/volume.nii", np.zeros((8, 8, 8), np.float32))
    flat = write_png(tmp_path / "val/slice.png", np.zeros((8, 8), np.uint8))
    error = input_error(FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [8, 8, 8]).setup)
    assert str(flat) in str(error) and "has shape (8, 8)" in str(error)


def test_bad_pixels_are_input_errors_when_read(tmp_path):
    write_png(tmp_path / "val/fine.png", np.zeros((8, 8), np.uint8))
    nan = np.ones((8, 8), np.float32)
    nan[3, 4] = np.nan
    write_npy(tmp_path / "train/has_nan.npy", nan)
    data = FolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), [8, 8])
    data.setup()  # headers are fine; pixels are read lazily
    error = input_error(lambda: images(data))
    assert "image has_nan" in str(error) and "1 NaN or infinite pixels" in str(error)

    # A PNG whose header reads but whose pixel data is cut off.
    png = write_png(tmp_path / "train2/cut.png", (np.arange(4096) % 251).astype(np.uint8).reshape(64, 64))
    png.write_bytes(png.read_bytes()[:200])
    data = FolderDataModule(str(tmp_path / "train2"), str(tmp_path / "val"), [8, 8])
    data.setup()
    error = input_error(lambda: images(data))
    assert str(png) in str(error) and "cannot be read" in str(error)


def test_bad_options_fail_at_construction(tmp_path):
    with pytest.raises(InputError, match="resize='stretch' must be resize or crop_or_pad"):
        FolderDataModule(str(tmp_path), str(tmp_path), [8, 8], resize="stretch")
    with pytest.raises(InputError, match="intensity='zscore' must be minmax or none"):
        FolderDataModule(str(tmp_path), str(tmp_path), [8, 8], intensity="zscore")


def test_memory_cache_decodes_each_file_once(tmp_path):
    for split, n in [("train", 3), ("val", 2)]:
        for i in range(n):
            write_npy(tmp_path / split / f"{split}{i}.npy", gradient((12, 12), 1.0 + i))
    data = FolderDataModule(tmp_path / "train", tmp_path / "val", spatial_size=(12, 12), cache="memory")
    data.setup("fit")
    before = next(iter(data.reference_dataloader("train")))["image"]
    for file in tmp_path.rglob("*.npy"):
        file.unlink()  # a cache that kept only the file names would now fail to load
    after = next(iter(data.reference_dataloader("train")))["image"]
    torch.testing.assert_close(after, before)


def test_disk_cache_follows_the_preprocessing_and_the_file(tmp_path):
    path = write_npy(tmp_path / "train" / "p0.npy", gradient((12, 12), 1.0))
    write_npy(tmp_path / "val" / "p1.npy", gradient((12, 12), 1.0))

    def first_image(**options) -> torch.Tensor:
        data = FolderDataModule(
            tmp_path / "train", tmp_path / "val", cache="disk", cache_dir=str(tmp_path / "cache"), **options
        )
        return data.reference_dataloader("train").dataset[0]["image"]

    original = first_image(spatial_size=(12, 12))
    assert first_image(spatial_size=(8, 8)).shape[-1] == 8  # not the cached 12×12 image
    np.save(path, np.rot90(gradient((12, 12), 1.0)).copy())  # the file is edited in place
    edited = first_image(spatial_size=(12, 12))
    torch.testing.assert_close(edited[0], torch.rot90(original[0]), atol=1e-5, rtol=0)

