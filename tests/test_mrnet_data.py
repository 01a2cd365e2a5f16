"""MRNetDataModule on tiny files written in the official MRNet-v1.0 layout and format (uint8 .npy, label CSVs)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from memwatch.cli import main
from memwatch.datamodules import MRNetDataModule
from memwatch.datamodules.mrnet import authors_validation_cases
from tests.helpers import MRNET_PLANES, ROOT, input_error, write_mrnet
from tests.helpers import reference_images as images


def centre_pad_or_crop(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """MONAI's ResizeWithPadOrCrop by hand: crop from `n // 2 - t // 2`, zero-pad `(t - n) // 2` before."""
    for axis, target in enumerate(size):
        n = array.shape[axis]
        if n > target:
            array = np.take(array, range(n // 2 - target // 2, n // 2 - target // 2 + target), axis=axis)
        elif n < target:
            pad = [(0, 0)] * array.ndim
            pad[axis] = ((target - n) // 2, target - n - (target - n) // 2)
            array = np.pad(array, pad)
    return array


def minmax(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    return (array - array.min()) / (array.max() - array.min())


def expected(path: Path, size: tuple[int, int, int]) -> np.ndarray:
    """What a volume should become: slices last, min-max, centre crop/pad, min-max again."""
    return minmax(centre_pad_or_crop(minmax(np.load(path).transpose(1, 2, 0)), size))


@pytest.fixture(scope="module")
def mrnet(tmp_path_factory) -> Path:
    root = write_mrnet(tmp_path_factory.mktemp("mrnet") / "MRNet-v1.0")
    (root / "train/sagittal/.DS_Store").write_bytes(b"\0")  # hidden files are not volumes
    return root


@pytest.mark.parametrize("plane", MRNET_PLANES)
def test_volumes_become_slices_last_cropped_or_padded_and_scaled(mrnet, plane):
    size = (32, 32, 8)  # in-plane 36×28 → rows cropped, columns padded; 5/7/9 slices → padded or cropped
    data = MRNetDataModule(str(mrnet), plane=plane, split="official", spatial_size=size, batch_size=4)
    loaded = {**images(data, "train"), **images(data, "val")}
    assert sorted(loaded) == [f"mrnet-train-{c:04d}" for c in range(10)] + [
        f"mrnet-valid-{c}" for c in (1130, 1131, 1132)
    ]
    for image_id, image in loaded.items():
        _, folder, case = image_id.split("-")
        np.testing.assert_allclose(
            image[0].numpy(), expected(mrnet / folder / plane / f"{case}.npy", size), atol=1e-6
        )
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"image", "id"} and type(batch["image"]) is torch.Tensor
    assert batch["image"].shape == (4, 1, *size) and batch["image"].dtype == torch.float32
    assert torch.all(batch["image"].amin(dim=(1, 2, 3, 4)) == 0.0) and torch.all(
        batch["image"].amax(dim=(1, 2, 3, 4)) == 1.0
    )


def test_default_plane_is_sagittal_and_the_labels_are_not_needed(tmp_path):
    root = write_mrnet(tmp_path, n_train=5, n_valid=1)
    for csv in root.glob("*.csv"):
        csv.unlink()
    data = MRNetDataModule(str(root), split="seeded", spatial_size=(16, 16, 4), batch_size=5, cache="memory")
    image = images(data, "val")[data.val_ids[0]]
    np.testing.assert_allclose(
        image[0].numpy(),
        expected(root / "train/sagittal" / f"{data.val_ids[0][-4:]}.npy", (16, 16, 4)),
        atol=1e-6,
    )


def test_seeded_split_is_five_seeded_disjoint_folds_of_the_training_cases(mrnet):
    def split(fold: int, seed: int = 0) -> tuple[list[str], list[str]]:
        data = MRNetDataModule(str(mrnet), split="seeded", fold=fold, split_seed=seed, spatial_size=(8, 8, 4))
        return data.train_ids, data.val_ids

    cases = [f"mrnet-train-{c:04d}" for c in range(10)]  # the valid/ folder is not used
    folds = [split(fold) for fold in range(5)]
    for train, val in folds:
        assert len(val) == 2 and sorted(train + val) == cases
    assert sorted(v for _, val in folds for v in val) == cases  # every case is validation exactly once
    assert split(3) == folds[3]  # same seed, same folds
    assert [split(fold, seed=1)[1] for fold in range(5)] != [val for _, val in folds]


def test_n_train_is_a_subset_of_the_seeded_training_fold(mrnet):
    full = MRNetDataModule(str(mrnet), split="seeded", spatial_size=(8, 8, 4))
    subset = MRNetDataModule(str(mrnet), split="seeded", spatial_size=(8, 8, 4), n_train=3)
    assert len(subset.train_ids) == 3 and set(subset.train_ids) <= set(full.train_ids)
    assert subset.val_ids == full.val_ids
    too_many = MRNetDataModule(str(mrnet), split="seeded", spatial_size=(8, 8, 4), n_train=9)
    assert "n_train=9 is larger than the 8 training images" in str(input_error(lambda: too_many.setup("fit")))


def test_disk_cache_is_decoded_once_and_keyed_by_spatial_size(mrnet, tmp_path):
    for size in [(16, 16, 4), (8, 8, 2)]:
        data = MRNetDataModule(
            str(mrnet), split="seeded", spatial_size=size, cache="disk", cache_dir=str(tmp_path), batch_size=8
        )
        assert all(image.shape == (1, *size) for image in images(data).values())
    assert len(list(tmp_path.rglob("*.pt"))) == 2 * 8  # one file per training volume and size


def test_the_five_folds_share_one_disk_cache(mrnet, tmp_path):
    for fold in range(5):
        data = MRNetDataModule(
            str(mrnet),
            split="seeded",
            spatial_size=(8, 8, 2),
            fold=fold,
            cache="disk",
            cache_dir=str(tmp_path),
        )
        images(data, "train")
        images(data, "val")
    cases = len(list((mrnet / "train" / "sagittal").glob("*.npy")))
    # Every fold caches all cases; separate caches per fold would hold 5 files per case. Shared, a
    # case has at most one file in the training cache and one in the validation cache.
    assert len(list(tmp_path.rglob("*.pt"))) <= 2 * cases


def _break(root: Path, case: str) -> str:
    """Damage a fresh tiny MRNet under `root` in one way; the path or text the error must name."""
    sagittal = root / "MRNet-v1.0/train/sagittal"
    if case == "missing root":
        return str(root / "nowhere")
    write_mrnet(root / "MRNet-v1.0", n_train=5, n_valid=2, size=(8, 8), slices=(3,))
    if case == "root one level up":
        return str(root / "MRNet-v1.0")
    if case == "no sagittal folder":
        for path in sagittal.iterdir():
            path.unlink()
        sagittal.rmdir()
    elif case == "empty plane folder":
        for path in sagittal.iterdir():
            path.unlink()
    elif case == "stray file":
        (sagittal / "notes.txt").write_text("not a volume")
        return str(sagittal / "notes.txt")
    elif case == "not an npy":
        (sagittal / "0002.npy").write_bytes(b"PK\x03\x04 a zip, not an array")
        return str(sagittal / "0002.npy")
    elif case == "truncated npy":
        data = (sagittal / "0002.npy").read_bytes()
        (sagittal / "0002.npy").write_bytes(data[: len(data) // 2])
        return str(sagittal / "0002.npy")
    elif case == "2-D array":
        np.save(sagittal / "0002.npy", np.zeros((8, 8), np.uint8))
        return str(sagittal / "0002.npy")
    elif case == "NaN voxels":
        volume = np.ones((3, 8, 8), np.float32)
        volume[1, 2, 3] = np.nan
        np.save(sagittal / "0002.npy", volume)
        return str(sagittal / "0002.npy")
    return str(sagittal)


BAD_FILES = {
    "missing root": "is not a folder: download MRNet-v1.0",
    "root one level up": "holds the dataset one level down: set --data.init_args.root",
    "no sagittal folder": "is not in the MRNet-v1.0 layout (expected",
    "empty plane folder": "holds no .npy volumes",
    "stray file": "is not an MRNet volume (NNNN.npy): move it out of",
    "not an npy": "cannot be read as .npy",
    "truncated npy": "cannot be read as .npy",
    "2-D array": "has shape (8, 8), but an MRNet volume is a 3-D array (slices, 256, 256)",
    "NaN voxels": "has 1 NaN or infinite pixels",
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, case):
    named = _break(tmp_path, case)
    root = (
        str(tmp_path / "nowhere")
        if case == "missing root"
        else str(tmp_path if case == "root one level up" else tmp_path / "MRNet-v1.0")
    )
    data = None

    def load():
        nonlocal data
        data = MRNetDataModule(root, split="seeded", spatial_size=(8, 8, 4), batch_size=8)
        images(data, "train"), images(data, "val")

    error = str(input_error(load))
    assert BAD_FILES[case] in error and named in error, error
    if case in ("missing root", "no sagittal folder"):
        assert "train/sagittal/0000.npy" in error  # the message shows the expected layout


def test_official_split_needs_the_valid_folder(tmp_path):
    root = write_mrnet(tmp_path, n_train=5, n_valid=1, size=(8, 8), slices=(3,), planes=("sagittal",))
    seeded = MRNetDataModule(str(root), split="seeded", spatial_size=(8, 8, 4))
    seeded.setup("fit")  # the seeded split does not need valid/
    for path in (root / "valid/sagittal").iterdir():
        path.unlink()
    (root / "valid/sagittal").rmdir()
    error = str(
        input_error(lambda: MRNetDataModule(str(root), split="official", spatial_size=(8, 8, 4)).setup("fit"))
    )
    assert f"{root}/valid/sagittal is not a folder" in error and "valid/sagittal/1130.npy" in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"plane": "lateral"}, "plane='lateral' must be one of axial, coronal, sagittal"),
        ({"split": "random"}, "split='random' must be authors (Dar et al.'s 5 folds of train/), seeded"),
        ({"split": "paper"}, "set --data.init_args.split authors (Dar et al.'s exact folds) or seeded"),
        ({"fold": 5}, "fold=5 must be 0 to 4"),
        ({"spatial_size": (256, 256)}, "MRNet volumes are 3D, give 3 sizes"),
        ({"split_file": "split.csv"}, "split_file is used with split: seeded only; split: authors is fixed"),
        (
            {"split": "official", "split_file": "split.csv"},
            "split: official is fixed: set --data.init_args.split seeded",
        ),
    ],
    ids=["plane", "split", "paper", "fold", "spatial_size", "split_file", "split_file_official"],
)
def test_bad_arguments_are_refused(tmp_path, arguments, message):
    error = input_error(lambda: MRNetDataModule(str(tmp_path), **{"spatial_size": (8, 8, 4), **arguments}))
    assert message in str(error)


# --- the authors' folds (Dar et al.'s code) on a tree of the 1130 official training cases ------------

AUTHORS_CASES = [f"mrnet-train-{case:04d}" for case in range(1130)]
TINY = (4, 4, 2)


@pytest.fixture(scope="module")
def full_train(tmp_path_factory) -> Path:
    """`MRNet-v1.0/train/sagittal/0000.npy ... 1129.npy`: 1130 tiny uint8 volumes (2 slices of 4×4)."""
    root = tmp_path_factory.mktemp("mrnet_full") / "MRNet-v1.0"
    folder = root / "train" / "sagittal"
    folder.mkdir(parents=True)
    for case in range(1130):
        np.save(folder / f"{case:04d}.npy", np.full((2, 4, 4), case % 256, np.uint8))
    return root


def the_authors_validation_ids(fold: int) -> set[str]:
    """Their code, verbatim (the global `random`, whose state is restored after)."""
    state = random.getstate()
    try:
        indexes = list(range(1130))
        random.seed(26)
        random.shuffle(indexes)
    finally:
        random.setstate(state)
    cases = indexes[226 * fold : 226 * (fold + 1)] if fold < 4 else indexes[904:]
    return {f"mrnet-train-{case:04d}" for case in cases}


def test_our_own_random_instance_draws_the_authors_global_shuffle():
    ours = list(range(1130))
    random.Random(26).shuffle(ours)
    state = random.getstate()
    try:
        theirs = list(range(1130))
        random.seed(26)
        random.shuffle(theirs)
    finally:
        random.setstate(state)
    assert ours == theirs and ours != sorted(ours)
    before = random.getstate()
    authors_validation_cases(0)
    assert random.getstate() == before  # nobody else's random stream moves


@pytest.mark.parametrize("fold", range(5))
def test_authors_folds_equal_their_code(full_train, fold):
    data = MRNetDataModule(str(full_train), split="authors", fold=fold, spatial_size=TINY)
    expected_val = the_authors_validation_ids(fold)
    assert set(data.val_ids) == expected_val and len(data.val_ids) == 226
    assert set(data.train_ids) == set(AUTHORS_CASES) - expected_val and len(data.train_ids) == 904
    assert data.train_patients == data.train_ids  # a case is a patient


def test_authors_is_the_default_and_fold_0_validates_on_these_cases(full_train):
    val_ids = MRNetDataModule(str(full_train), spatial_size=TINY).val_ids
    # Pinned, so a change of Python's shuffle or of our indexing shows here (records are in case order).
    assert val_ids[:5] == [f"mrnet-train-{c}" for c in ("0007", "0008", "0012", "0014", "0017")]
    assert val_ids[-3:] == [f"mrnet-train-{c}" for c in ("1102", "1106", "1107")]
    assert [f"mrnet-train-{c:04d}" for c in authors_validation_cases(0)[:5]] == [
        f"mrnet-train-{c}" for c in ("0367", "0948", "0844", "0683", "0088")
    ]  # their shuffled order: indexes[0:5]


def test_authors_folds_are_disjoint_and_cover_the_1130_cases(full_train):
    folds = [MRNetDataModule(str(full_train), fold=fold, spatial_size=TINY) for fold in range(5)]
    validation = [v for data in folds for v in data.val_ids]
    assert sorted(validation) == AUTHORS_CASES  # every case validates exactly once
    for data in folds:
        assert not set(data.train_ids) & set(data.val_ids)
        assert sorted(data.train_ids + data.val_ids) == AUTHORS_CASES


def test_n_train_is_a_subset_of_the_authors_training_fold(full_train):
    full = MRNetDataModule(str(full_train), fold=2, spatial_size=TINY)
    subset = MRNetDataModule(str(full_train), fold=2, spatial_size=TINY, n_train=100)
    assert len(subset.train_ids) == 100 and set(subset.train_ids) < set(full.train_ids)
    assert subset.val_ids == full.val_ids


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing 0417", "lacks case 0417 (1 missing)"),
        ("extra 1130", "holds 1130.npy (1 beyond 0000-1129)"),
    ],
)
def test_authors_split_needs_exactly_the_1130_training_cases(full_train, tmp_path, change, message):
    root = tmp_path / "MRNet-v1.0"
    shutil.copytree(full_train, root)
    folder = root / "train" / "sagittal"
    if change == "missing 0417":
        (folder / "0417.npy").unlink()
    else:
        np.save(folder / "1130.npy", np.zeros((2, 4, 4), np.uint8))
    error = str(input_error(lambda: MRNetDataModule(str(root), spatial_size=TINY).setup("fit")))
    assert f"{folder} {message}" in error and "set --data.init_args.split seeded" in error
    seeded = MRNetDataModule(str(root), split="seeded", spatial_size=TINY)  # the fix works
    assert len(seeded.train_ids) + len(seeded.val_ids) == len(list(folder.glob("*.npy")))


def test_the_cli_refuses_split_paper_on_one_line(mrnet, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "configs/mrnet_ae.yaml"), "--data.init_args.root", str(mrnet),
              "--data.init_args.split", "paper", "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (
        stop.value.code == 2 and len(errors) == 1 and "split authors (Dar et al.'s exact folds)" in errors[0]
    )
    assert not list(tmp_path.rglob("*"))  # nothing written
