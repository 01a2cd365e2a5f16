"""ChestXray14DataModule on a tiny copy of NIH ChestX-ray14 written in the real format (64×64 instead of 1024×1024)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memwatch.datamodules import ChestXray14DataModule
from memwatch.errors import InputError
from tests.helpers import (
    CHESTXRAY_MODES,
    CHESTXRAY_OFFICIAL_TRAIN,
    CHESTXRAY_SIZE,
    chestxray_image_names,
    input_error,
    stored_pixels,
    write_chestxray14,
    write_png,
)


def as_loaded(pixels: np.ndarray) -> np.ndarray:
    """The one-channel [0, 1] image the module should make of `pixels` at their own size."""
    gray = pixels[..., :3].astype(np.float64).mean(axis=-1) if pixels.ndim == 3 else pixels.astype(np.float64)
    return (gray - gray.min()) / (gray.max() - gray.min())


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_chestxray14(tmp_path / "ChestX-ray14")


def images(data: ChestXray14DataModule, split: str = "train") -> dict[str, torch.Tensor]:
    loaded = {}
    for batch in data.reference_dataloader(split):
        loaded.update(zip(batch["id"], batch["image"], strict=True))
    return loaded


def patients(ids: list[str]) -> set[str]:
    return {image_id[:8] for image_id in ids}


def test_every_png_mode_becomes_one_channel_in_unit_range(dataset):
    native = ChestXray14DataModule(str(dataset), spatial_size=[CHESTXRAY_SIZE, CHESTXRAY_SIZE], batch_size=5)
    loaded = {**images(native, "train"), **images(native, "val")}
    assert sorted(loaded) == [name.removesuffix(".png") for name in chestxray_image_names()]
    for k, name in enumerate(chestxray_image_names()):
        # 16 bits are kept, RGB(A) becomes the mean of R, G and B, rows stay rows.
        expected = as_loaded(stored_pixels(name, CHESTXRAY_MODES[k % 3]))
        np.testing.assert_allclose(loaded[name[:-4]][0].numpy(), expected, atol=1e-5, err_msg=name)

    data = ChestXray14DataModule(str(dataset), spatial_size=[32, 32], batch_size=4)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"image", "id"} and type(batch["image"]) is torch.Tensor
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert torch.all(batch["image"].amin(dim=(1, 2, 3)) == 0.0) and torch.all(
        batch["image"].amax(dim=(1, 2, 3)) == 1.0
    )
    smaller = images(data)["00000001_000"][0].numpy()
    full = loaded["00000001_000"][0].numpy().reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.abs(smaller - full).mean() < 0.05  # the same picture, anti-aliased to half size


def test_the_official_split_is_nih_lists_and_by_patient(dataset):
    data = ChestXray14DataModule(str(dataset), spatial_size=[16, 16])
    names = [name.removesuffix(".png") for name in chestxray_image_names()]
    assert data.train_ids == [n for n in names if int(n[:8]) in CHESTXRAY_OFFICIAL_TRAIN]
    assert data.val_ids == [n for n in names if int(n[:8]) not in CHESTXRAY_OFFICIAL_TRAIN]
    assert not patients(data.train_ids) & patients(data.val_ids)
    assert {r["patient"] for r in data.train_records} == {"1", "2", "3"}  # the table's Patient ID


def test_the_nih_layout_reads_as_the_kaggle_layout(tmp_path):
    kaggle = ChestXray14DataModule(str(write_chestxray14(tmp_path / "kaggle")), spatial_size=[16, 16])
    nih = ChestXray14DataModule(str(write_chestxray14(tmp_path / "nih", layout="nih")), spatial_size=[16, 16])
    assert nih.train_ids == kaggle.train_ids and nih.val_ids == kaggle.val_ids
    assert all("/nih/images/" in r["image_path"] for r in nih.train_records)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_seeded_split_keeps_each_patient_on_one_side(dataset, seed):
    for name in ("train_val_list.txt", "test_list.txt"):
        (dataset / name).unlink()  # not needed
    data = ChestXray14DataModule(
        str(dataset), spatial_size=[16, 16], split="seeded", val_fraction=0.4, split_seed=seed
    )
    assert not patients(data.train_ids) & patients(data.val_ids)
    assert sorted(data.train_ids + data.val_ids) == sorted(name[:-4] for name in chestxray_image_names())
    assert len(patients(data.val_ids)) == 2  # 40% of 5 patients
    again = ChestXray14DataModule(
        str(dataset), spatial_size=[16, 16], split="seeded", val_fraction=0.4, split_seed=seed
    )
    assert again.val_ids == data.val_ids


def test_train_and_val_subsets_are_nested_and_seeded(dataset):
    def subset(n_train=None, n_val=None, seed=0):
        return ChestXray14DataModule(
            str(dataset), spatial_size=[16, 16], n_train=n_train, n_val=n_val, split_seed=seed
        )

    full = subset()
    sizes = [subset(n_train=n) for n in (2, 5, 8)]
    assert [len(d.train_ids) for d in sizes] == [2, 5, 8] and sizes[-1].train_ids == full.train_ids
    assert set(sizes[0].train_ids) <= set(sizes[1].train_ids) <= set(sizes[2].train_ids)
    assert all(d.val_ids == full.val_ids for d in sizes)  # n_train leaves validation alone
    assert subset(n_train=5).train_ids == sizes[1].train_ids  # seeded
    vals = [subset(n_val=n) for n in (1, 3)]
    assert set(vals[0].val_ids) < set(vals[1].val_ids) < set(full.val_ids)
    assert all(d.train_ids == full.train_ids for d in vals)


def _table(root: Path, edit) -> None:
    path = root / "Data_Entry_2017.csv"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def _lists(root: Path, train: list[str], val: list[str]) -> None:
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(val) + "\n")


def _unlisted(root: Path) -> Path:
    return write_png(
        root / "images_002/images/00000099_000.png", np.zeros((CHESTXRAY_SIZE, CHESTXRAY_SIZE), np.uint8)
    )


def _corrupt(root: Path) -> Path:
    path = root / "images_001/images/00000002_000.png"
    path.write_bytes(b"definitely not a png")
    return path


def _palette(root: Path) -> Path:
    path = root / "images_001/images/00000001_001.png"
    Image.fromarray(np.zeros((CHESTXRAY_SIZE, CHESTXRAY_SIZE), np.uint8)).convert("P").save(path)
    return path


def _duplicate(root: Path) -> Path:
    return Path(
        shutil.copy(root / "images_001/images/00000001_000.png", root / "images_002/images/00000001_000.png")
    )


def _patient_on_both_sides(root: Path) -> Path:
    names = chestxray_image_names()
    _lists(root, names[:4], names[4:])  # patient 2's two images: one in each list
    return root / "test_list.txt"


def _empty_folder(root: Path) -> Path:
    (root / "images_003/images").mkdir(parents=True)
    return root / "images_003"


# Per case: break the dataset at `root`; return (the path the error must name, a phrase of it).
BAD_INPUTS = {
    "root missing": lambda root: (shutil.rmtree(root), root, "is not a folder: set --data.init_args.root")[1:],
    "no table": lambda root: ((root / "Data_Entry_2017.csv").unlink(), root / "Data_Entry_2017.csv", "expected ROOT/Data_Entry_2017.csv")[1:],
    "table without Patient ID": lambda root: (_table(root, lambda lines: [lines[0].replace("Patient ID", "Patient"), *lines[1:]]), root / "Data_Entry_2017.csv", "has no column 'Patient ID'")[1:],
    "row without patient": lambda root: (_table(root, lambda lines: [*lines[:2], lines[2].replace(",1,41,", ",,41,"), *lines[3:]]), root / "Data_Entry_2017.csv", "line 3 has")[1:],
    "no images folder": lambda root: ([shutil.rmtree(p) for p in root.glob("images_*")], root, "has no images folder: expected ROOT/Data_Entry_2017.csv")[1:],
    "empty images folder": lambda root: (_empty_folder(root), "holds no PNG images"),
    "png missing": lambda root: ((root / "images_002/images/00000005_001.png").unlink(), "00000005_001.png", "is in no images folder")[1:],
    "png not in the table": lambda root: (_unlisted(root), "is not in"),
    "not a png in an images folder": lambda root: ((root / "images_001/images/notes.txt").write_text("x"), root / "images_001/images/notes.txt", "is not a PNG image")[1:],
    "same png twice": lambda root: (_duplicate(root), "have the same name"),
    "corrupt png": lambda root: (_corrupt(root), "cannot be read as PNG"),
    "png of an unexpected mode": lambda root: (_palette(root), "has the PNG mode P"),
    "list file missing": lambda root: ((root / "test_list.txt").unlink(), root / "test_list.txt", "split seeded")[1:],
    "patient on both sides of the lists": lambda root: (_patient_on_both_sides(root), "patient 2 has images in both"),
    "image in no list": lambda root: (_lists(root, chestxray_image_names()[:8], chestxray_image_names()[8:11]), "00000005_001.png", "train_val_list.txt nor")[1:],
    "listed image not in the table": lambda root: (_lists(root, chestxray_image_names()[:8], [*chestxray_image_names()[8:], "00000077_000.png"]), "00000077_000.png", "does not")[1:],
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_an_input_error_naming_the_file(dataset, case):
    named, phrase = BAD_INPUTS[case](dataset)
    error = input_error(ChestXray14DataModule(str(dataset), spatial_size=[16, 16]).setup)
    assert str(named) in str(error) and phrase in str(error), str(error)


def test_a_subset_above_the_split_is_an_input_error(dataset):
    error = input_error(ChestXray14DataModule(str(dataset), spatial_size=[16, 16], n_train=9).setup)
    assert "n_train=9 is larger than the 8 training images" in str(error)
    error = input_error(ChestXray14DataModule(str(dataset), spatial_size=[16, 16], n_val=5).setup)
    assert "n_val=5 is larger than the 4 validation images" in str(error)


def test_pixels_are_read_lazily_and_a_truncated_png_is_an_input_error(dataset):
    path = dataset / "images_001/images/00000001_000.png"
    write_png(
        path,
        (np.arange(CHESTXRAY_SIZE * CHESTXRAY_SIZE) % 251)
        .astype(np.uint8)
        .reshape(CHESTXRAY_SIZE, CHESTXRAY_SIZE),
    )
    path.write_bytes(path.read_bytes()[:200])  # the header still reads
    data = ChestXray14DataModule(str(dataset), spatial_size=[16, 16], batch_size=8)
    data.setup()
    error = input_error(lambda: images(data))
    assert str(path) in str(error) and "cannot be read" in str(error)


def test_a_failed_setup_checks_again(dataset):
    path = _corrupt(dataset)
    data = ChestXray14DataModule(str(dataset), spatial_size=[16, 16])
    input_error(data.setup)
    assert str(path) in str(input_error(data.setup))  # not a half-set-up module


def test_bad_options_fail_at_construction(dataset):
    with pytest.raises(InputError, match="split='random' must be official or seeded"):
        ChestXray14DataModule(str(dataset), split="random")
    with pytest.raises(InputError, match="split_file is used with split: seeded only"):
        ChestXray14DataModule(str(dataset), split_file="split.csv")
    with pytest.raises(InputError, match="ChestX-ray14 images are 2D"):
        ChestXray14DataModule(str(dataset), spatial_size=[16, 16, 16])
    with pytest.raises(InputError, match="n_val=0 must be at least 1"):
        ChestXray14DataModule(str(dataset), n_val=0)
