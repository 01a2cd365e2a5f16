"""NiftiDataModule on tiny volumes written with nibabel: RAS orientation, windowing, crops, ids, splits, bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from memwatch.datamodules import NiftiDataModule
from memwatch.errors import InputError
from tests.helpers import input_error

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Voxel axis 0 runs Superior, axis 1 Left, axis 2 Anterior (2 mm voxels, shifted origin).
PERMUTED = np.array(
    [[0.0, -2.0, 0.0, 10.0], [0.0, 0.0, 2.0, -5.0], [2.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]]
)


def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray | None = None, slope_inter=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nibabel.Nifti1Image(volume, np.eye(4) if affine is None else affine)
    if slope_inter is not None:
        image.header.set_slope_inter(*slope_inter)
    nibabel.save(image, path)
    return path


def air(shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, -1000.0, np.float32)


def images(data: NiftiDataModule, split: str = "train") -> dict[str, np.ndarray]:
    found = {}
    for batch in data.reference_dataloader(split):
        assert set(batch) == {"image", "id"} and type(batch["image"]) is torch.Tensor
        assert batch["image"].dtype == torch.float32
        found.update((i, image[0].numpy()) for i, image in zip(batch["id"], batch["image"], strict=True))
    return found


@pytest.mark.parametrize(
    ("affine", "ras_index", "ras_shape"),
    [(np.eye(4), (1, 2, 3), (6, 8, 10)), (LPS, (4, 5, 3), (6, 8, 10)), (PERMUTED, (5, 3, 1), (8, 10, 6))],
    ids=["RAS", "LPS", "permuted"],
)
def test_volumes_are_reoriented_to_ras(tmp_path, affine, ras_index, ras_shape):
    volume = air((6, 8, 10))
    volume[1, 2, 3] = 1000.0  # the marker, at hu_max
    write_nifti(tmp_path / "scan.nii.gz", volume, affine)
    write_nifti(tmp_path / "other.nii.gz", air((6, 8, 10)), affine)
    # spatial_size = the RAS shape: the centre crop keeps every voxel where orientation put it.
    data = NiftiDataModule(str(tmp_path), spatial_size=ras_shape, val_fraction=0.5, split_seed=1)
    loaded = {**images(data), **images(data, "val")}["scan"]
    assert loaded.shape == ras_shape
    assert [tuple(int(i) for i in p) for p in np.argwhere(loaded == 1.0)] == [ras_index]
    canonical = nibabel.as_closest_canonical(
        nibabel.load(tmp_path / "scan.nii.gz")
    ).get_fdata()  # nibabel's RAS
    assert tuple(int(i) for i in np.argwhere(canonical == 1000.0)[0]) == ras_index


def test_ct_window_maps_hu_min_to_0_and_hu_max_to_1(tmp_path):
    hu = np.array([-500.0, -100.0, 100.0, 300.0, 2000.0])  # below, hu_min, middle, hu_max, above
    volume = np.zeros((5, 4, 4), np.float32)
    volume[:] = hu[:, None, None]
    # Stored as int16 with CT's usual intercept -1024: the window applies to Hounsfield units.
    write_nifti(tmp_path / "ct.nii", (volume + 1024).astype(np.int16), slope_inter=(1.0, -1024.0))
    write_nifti(tmp_path / "other.nii", np.zeros((5, 4, 4), np.int16))
    data = NiftiDataModule(
        str(tmp_path), spatial_size=(5, 4, 4), hu_min=-100, hu_max=300, val_fraction=0.5, split_seed=3
    )
    loaded = {**images(data), **images(data, "val")}["ct"]
    np.testing.assert_allclose(loaded[:, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_percentile_scaling_clips_outside_the_percentiles(tmp_path):
    volume = np.arange(10 * 10 * 10, dtype=np.float32).reshape(10, 10, 10) ** 1.5  # any units, skewed
    write_nifti(tmp_path / "mri.nii.gz", volume)
    write_nifti(tmp_path / "other.nii.gz", volume)
    data = NiftiDataModule(
        str(tmp_path), spatial_size=(10, 10, 10), intensity="percentile", percentiles=(1, 99)
    )
    loaded = images(data)["mri"] if "mri" in data.train_ids else images(data, "val")["mri"]
    low, high = np.percentile(volume, [1, 99])
    np.testing.assert_allclose(loaded, np.clip((volume - low) / (high - low), 0, 1), atol=1e-5)
    assert loaded.min() == 0.0 and loaded.max() == 1.0


def test_center_crop_and_pad_keep_the_volume_centred(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 1000, (20, 12, 6)).astype(np.float32)
    write_nifti(tmp_path / "a.nii.gz", volume)
    write_nifti(tmp_path / "b.nii.gz", volume[:4, :4, :4])  # smaller than spatial_size: zero-padded
    data = NiftiDataModule(
        str(tmp_path), spatial_size=(16, 16, 8), hu_min=0, hu_max=1000, val_fraction=0.5, split_seed=2
    )
    loaded = {**images(data), **images(data, "val")}
    assert {image.shape for image in loaded.values()} == {(16, 16, 8)}
    expected = np.zeros((16, 16, 8))
    expected[:, 2:14, 1:7] = volume[2:18] / 1000.0  # 2 rows cut on each side, 2 columns / 1 slice padded
    np.testing.assert_allclose(loaded["a"], expected, atol=1e-6)
    assert loaded["b"].min() >= 0.0 and loaded["b"].max() <= 1.0 and np.count_nonzero(loaded["b"]) == 64


def test_foreground_crop_centres_the_body(tmp_path):
    volume = air((40, 40, 40))
    volume[25:35, 0:10, 10:20] = 50.0  # the "body": off centre, touching one border
    write_nifti(tmp_path / "scan.nii.gz", volume)
    write_nifti(tmp_path / "twin.nii.gz", volume)
    data = NiftiDataModule(str(tmp_path), spatial_size=(16, 16, 16), crop="foreground", val_fraction=0.5)
    loaded = {**images(data), **images(data, "val")}["scan"]
    expected = np.zeros((16, 16, 16))
    expected[3:13, 3:13, 3:13] = 0.525  # bounding box centre (30, 5, 15) at index 8: the box is centred
    np.testing.assert_allclose(loaded, expected, atol=1e-6)

    write_nifti(tmp_path / "empty.nii.gz", air((8, 8, 8)))
    data = NiftiDataModule(str(tmp_path), spatial_size=(16, 16, 16), crop="foreground", cache="memory")
    error = input_error(data.setup)
    assert "image empty" in str(error) and "has no voxel above hu_min=-1000" in str(error)


def test_centers_file_cuts_patches_around_ras_points(tmp_path):
    volume = np.zeros((12, 12, 12), np.float32)  # 0 HU: 0.5 after the window, so padding (0) stands out
    volume[2, 3, 4] = volume[9, 9, 9] = 1000.0
    write_nifti(tmp_path / "p1.nii.gz", volume, LPS)  # in RAS the markers sit at (9, 8, 4) and (2, 2, 9)
    write_nifti(tmp_path / "p2/scan.nii.gz", volume)
    centers = tmp_path / "centers.csv"  # inside root: ignored as a volume, because it is centers_file
    centers.write_text("id,x,y,z\np1,9,8,4\np1,2,2,9\np2/scan,2,3,4\n")
    data = NiftiDataModule(str(tmp_path), spatial_size=(8, 8, 8), crop="centers", centers_file=str(centers),
                           val_fraction=0.5, split_seed=0)  # fmt: skip
    records = {r["id"]: r["patient"] for r in data.list_records()}
    assert records == {"p1@9_8_4": "p1", "p1@2_2_9": "p1", "p2/scan@2_3_4": "p2"}
    loaded = {**images(data), **images(data, "val")}
    assert loaded.keys() == records.keys()
    for patch_id, patch in loaded.items():
        assert patch.shape == (8, 8, 8), patch_id
        assert np.argwhere(patch == 1.0).tolist() == [[4, 4, 4]], patch_id  # the point at index size // 2
    # (2, 2, 9) is 2 voxels from the low x and y borders and 3 from the high z border: padded with 0 there.
    edge = loaded["p1@2_2_9"]
    assert np.all(edge[:2] == 0.0) and np.all(edge[:, :2] == 0.0) and np.all(edge[:, :, 7] == 0.0)
    assert set(np.unique(edge[2:, 2:, :7])) == {0.5, 1.0}
    assert set(data.train_ids) in (
        {"p1@9_8_4", "p1@2_2_9"},
        {"p2/scan@2_3_4"},
    )  # a patient's patches stay together


def test_ids_patients_and_the_split(tmp_path):
    for name in ["a.nii.gz", "b.nii", "c.nii.gz", "d.nii.gz", "e.nii.gz", "pat/x.nii.gz", "pat/deep/y.nii"]:
        write_nifti(tmp_path / "data" / name, np.zeros((4, 4, 4), np.float32))
    write_nifti(
        tmp_path / "data/one_time_point.nii.gz", np.zeros((4, 4, 4, 1), np.float32)
    )  # 4D, one volume: fine
    (tmp_path / "data/.DS_Store").write_bytes(b"\0")  # hidden: not a volume
    root, size = str(tmp_path / "data"), (4, 4, 4)
    data = NiftiDataModule(root, spatial_size=size, val_fraction=0.3)
    records = {r["id"]: r["patient"] for r in data.list_records()}
    assert records == {"a": "a", "b": "b", "c": "c", "d": "d", "e": "e", "one_time_point": "one_time_point",
                       "pat/deep/y": "pat", "pat/x": "pat"}  # fmt: skip
    assert len(data.val_ids) in (2, 3) and {"pat/x", "pat/deep/y"} <= set(data.train_ids) | set(data.val_ids)
    assert ("pat/x" in data.train_ids) == ("pat/deep/y" in data.train_ids)  # one patient, one side
    again = NiftiDataModule(root, spatial_size=size, val_fraction=0.3)
    assert again.train_ids == data.train_ids  # seeded
    reseeded = [
        NiftiDataModule(root, spatial_size=size, val_fraction=0.3, split_seed=s).val_ids for s in range(1, 6)
    ]
    assert any(ids != data.val_ids for ids in reseeded)

    split = tmp_path / "split.csv"
    split.write_text(
        "patient,split\n"
        + "".join(f"{p},{'val' if p in ('b', 'pat') else 'train'}\n" for p in set(records.values()))
    )
    data = NiftiDataModule(root, spatial_size=size, split_file=str(split), batch_size=3)
    assert data.train_ids == ["a", "c", "d", "e", "one_time_point"] and data.val_ids == [
        "b",
        "pat/x",
        "pat/deep/y",
    ]
    assert next(iter(data.train_dataloader()))["image"].shape == (3, 1, 4, 4, 4)
    subset = NiftiDataModule(root, spatial_size=size, split_file=str(split), n_train=2)
    assert (
        len(subset.train_ids) == 2
        and set(subset.train_ids) < set(data.train_ids)
        and subset.val_ids == data.val_ids
    )


def test_disk_cache_gives_the_same_patches(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        write_nifti(
            tmp_path / f"data/{name}.nii.gz", rng.uniform(-1000, 1000, (9, 7, 5)).astype(np.float32), LPS
        )
    kwargs = dict(spatial_size=(8, 8, 8), val_fraction=0.4)
    memory = images(NiftiDataModule(str(tmp_path / "data"), cache="memory", **kwargs))
    disk = NiftiDataModule(str(tmp_path / "data"), cache="disk", cache_dir=str(tmp_path / "cache"), **kwargs)
    assert memory.keys() == images(disk).keys()
    for key, image in images(disk).items():  # the second pass reads the cache
        np.testing.assert_array_equal(image, memory[key])
    assert list((tmp_path / "cache").rglob("*.pt"))
    # Another window with the same cache_dir is not served the cached patches of the first.
    narrow = NiftiDataModule(
        str(tmp_path / "data"), cache="disk", cache_dir=str(tmp_path / "cache"), hu_max=0.0, **kwargs
    )
    assert all(not np.array_equal(image, memory[key]) for key, image in images(narrow).items())


def _write(root: Path, name: str, volume: np.ndarray) -> Path:
    return write_nifti(root / name, volume)


def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"definitely not a volume")
    return path


def _truncated(root: Path) -> Path:
    path = _write(root, "cut.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    path.write_bytes(path.read_bytes()[:600])  # the header reads, the voxels are missing
    return path


def _nan(root: Path) -> Path:
    volume = np.zeros((4, 4, 4), np.float32)
    volume[1, 2, 3] = np.nan
    return _write(root, "has_nan.nii.gz", volume)


def _split_without_columns(root: Path) -> Path:
    path = root.parent / "split.csv"
    path.write_text("name,fold\nfine,train\n")
    return path


# Per case: write the bad input beside one good volume, return (data kwargs, the path in the message, a phrase).
BAD_INPUTS = {
    "missing root": lambda root: ({"root": str(root / "absent")}, root / "absent",
                                  "is not a folder: set --data.init_args.root to a folder of NIfTI volumes laid out as root/<patient>.nii.gz"),
    "empty root": lambda root: ({"root": str(_garbage(root / "empty/.hidden").parent)}, root / "empty", "holds no NIfTI volumes"),
    "not nifti": lambda root: ({}, _garbage(root / "notes.txt"), "is not a NIfTI volume (.nii, .nii.gz)"),
    "corrupt nii.gz": lambda root: ({}, _garbage(root / "bad.nii.gz"), "cannot be read as NIfTI"),
    "truncated nii.gz": lambda root: ({}, _truncated(root), "cannot be read"),
    "NaN voxel": lambda root: ({}, _nan(root), "has 1 NaN or infinite pixels"),
    "2D image": lambda root: ({}, _write(root, "slice.nii.gz", np.zeros((8, 8), np.float32)), "has shape (8, 8), not one 3D volume"),
    "4D image": lambda root: ({}, _write(root, "series.nii", np.zeros((4, 4, 4, 2), np.float32)), "has shape (4, 4, 4, 2), not one 3D volume"),
    "same id twice": lambda root: ({}, (_write(root, "fine.nii", np.zeros((4, 4, 4), np.float32))), "have the same id 'fine'"),
    "split without columns": lambda root: ({"split_file": str(_split_without_columns(root))}, root.parent / "split.csv", "needs the columns patient,split"),
    "n_train above the split": lambda root: ({"n_train": 5, "val_fraction": 0.5}, None, "n_train=5 is larger than the 1 training images"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_one_line_input_error_naming_the_file(tmp_path, case):
    root = tmp_path / "data"
    write_nifti(root / "fine.nii.gz", np.zeros((4, 4, 4), np.float32))
    write_nifti(root / "fine_too.nii.gz", np.zeros((4, 4, 4), np.float32))
    kwargs, path, phrase = BAD_INPUTS[case](root)
    data = NiftiDataModule(**{"root": str(root), "spatial_size": (4, 4, 4), "cache": "memory", **kwargs})
    error = input_error(data.setup)  # cache memory decodes every volume at set-up
    assert phrase in str(error), str(error)
    assert path is None or str(path) in str(error), str(error)


def test_bad_centers_files(tmp_path):
    write_nifti(tmp_path / "data/a.nii.gz", np.zeros((8, 8, 8), np.float32))
    write_nifti(tmp_path / "data/b.nii.gz", np.zeros((8, 8, 8), np.float32))
    cases = {
        "x,y,z\n1,2,3\n": "needs the columns id,x,y,z",
        "id,x,y,z\na,1,2,3\nb,one,2,3\n": "line 3: x, y, z = 'one', '2', '3' are not numbers",
        "id,x,y,z\na,1,2,3\nb,1,2,3\nc,1,2,3\n": "names 'c' (1 unknown id(s)), which is no volume",
        "id,x,y,z\na,1,2,3\n": "b.nii.gz has no row in centers_file",
        "id,x,y,z\na,1,2,3\nb,1,2,8\n": "point (1, 2, 8) of 'b' lies outside its RAS-oriented shape (8, 8, 8)",
        "id,x,y,z\na,1,2,3\na,1,2,3\nb,1,1,1\n": "line 3 repeats the point (1, 2, 3) of 'a'",
    }
    for text, phrase in cases.items():
        centers = tmp_path / "centers.csv"
        centers.write_text(text)
        data = NiftiDataModule(
            str(tmp_path / "data"), spatial_size=(4, 4, 4), crop="centers", centers_file=str(centers)
        )
        error = input_error(data.setup)
        assert phrase in str(error), str(error)
    missing = NiftiDataModule(
        str(tmp_path / "data"), spatial_size=(4, 4, 4), crop="centers", centers_file="nope.csv"
    )
    assert "centers_file nope.csv does not exist" in str(input_error(missing.setup))


def test_bad_options_fail_at_construction():
    cases = {
        "spatial_size=[64, 64] must have 3 sizes": {"spatial_size": (64, 64)},
        "crop='random' must be center, foreground or centers": {"crop": "random"},
        "crop centers needs centers_file": {"crop": "centers"},
        "centers_file needs crop centers": {"centers_file": "c.csv"},
        "intensity='zscore' must be window or percentile": {"intensity": "zscore"},
        "hu_min=400 must be below hu_max=400": {"hu_min": 400, "hu_max": 400},
        "percentiles=[99.0, 1.0] must be two numbers": {"percentiles": (99, 1)},
    }
    for phrase, kwargs in cases.items():
        with pytest.raises(InputError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
            NiftiDataModule(**{"root": "data/nifti", **kwargs})


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_cached_patch_keeps_only_its_own_voxels(cache, tmp_path):
    for name in ("a", "b"):
        write_nifti(tmp_path / f"data/{name}.nii.gz", np.full((40, 40, 8), 100.0, dtype=np.float32))
    data = NiftiDataModule(
        str(tmp_path / "data"), spatial_size=(8, 8, 8), val_fraction=0.5, cache=cache, cache_dir=str(tmp_path / "cache")
    )
    patch = data.reference_dataloader("train").dataset[0]["image"]
    assert patch.untyped_storage().nbytes() == 8 * 8 * 8 * 4  # not the 40×40×8 volume behind a view
    if cache == "disk":
        assert all(f.stat().st_size < 40 * 40 * 8 * 4 / 4 for f in (tmp_path / "cache").rglob("*.pt"))
