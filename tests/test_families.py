"""Image families (2D and 3D), copy variations, follow-up scans, and planted-copy sets on disk."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from bench.families import (
    FAMILIES,
    PLANES,
    family_spatial_dims,
    follow_up,
    planted_variation,
    render,
    write_planted_copy_set,
)
from memwatch.datamodules import FolderDataModule
from memwatch.datamodules.readers.image_files import image_records
from memwatch.errors import InputError
from tests.helpers import reference_images

SMALL = {2: (48, 40), 3: (32, 32, 16)}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def centre(image: np.ndarray) -> np.ndarray:
    """The middle half of every spatial axis of `[1, *spatial]` (away from what a rotation pads)."""
    return image[(slice(None), *(slice(n // 4, n - n // 4) for n in image.shape[1:]))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_is_deterministic_per_id_different_across_ids_and_in_unit_range(family: str) -> None:
    size = SMALL[family_spatial_dims(family)]
    images = [render(family, f"patient-{k}", size) for k in range(6)]
    again = render(family, "patient-0", size)
    assert again.dtype == np.float32 and again.shape == (1, *size)
    assert np.array_equal(again, images[0])
    for image in images:
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.03
    differences = [np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1 :]]
    assert min(differences) > 0.01, "two patients of one family look alike"


def test_families_are_told_apart_by_their_ids_not_by_a_shared_seed() -> None:
    # The same id in two families gives two different images (each family seeds by its own name too).
    assert not np.allclose(render("vessels", "x", (32, 32)), render("tissue", "x", (32, 32)))
    assert not np.allclose(render("knee", "x", (32, 32, 16)), render("brain", "x", (32, 32, 16)))


@pytest.mark.parametrize("family", ["knee", "brain"])
def test_a_volume_is_slices_through_3d_shapes_not_one_image_repeated(family: str) -> None:
    volume = render(family, "p", (48, 48, 24))[0]
    neighbours = [correlation(volume[..., d], volume[..., d + 1]) for d in range(3, 20)]
    assert min(neighbours) > 0.7, "slices change smoothly"
    step = np.median([np.abs(volume[..., d] - volume[..., d + 1]).mean() for d in range(23)])
    far = max(
        np.abs(volume[..., 4] - volume[..., 12]).mean(), np.abs(volume[..., 12] - volume[..., 19]).mean()
    )
    assert far > 2.5 * step, "distant slices show other anatomy"


def test_bad_family_or_size_is_an_input_error() -> None:
    assert {family: family_spatial_dims(family) for family in FAMILIES} == {
        "vessels": 2, "radiograph": 2, "tissue": 2, "knee": 3, "brain": 3,
    }  # fmt: skip
    with pytest.raises(InputError, match="family='bones'"):
        render("bones", "x", (32, 32))
    with pytest.raises(InputError, match="family='bones'"):
        family_spatial_dims("bones")
    with pytest.raises(InputError, match=r"spatial_size=\[32, 32, 32\].*'vessels' is 2D: give 2 sizes"):
        render("vessels", "x", (32, 32, 32))
    with pytest.raises(InputError, match=r"spatial_size=\[32, 32\].*'knee' is 3D: give 3 sizes"):
        render("knee", "x", (32, 32))
    with pytest.raises(InputError, match="at least 8"):
        render("brain", "x", (32, 32, 4))
    with pytest.raises(InputError, match="at least 8"):
        render("tissue", "x", (32, 4))


def test_planted_variation_is_the_source_flipped_and_rotated_with_another_contrast() -> None:
    source = render("radiograph", "p", (64, 64))
    copy, drawn = planted_variation(source, np.random.default_rng(3))
    assert copy.shape == source.shape and copy.dtype == np.float32 and 0 <= copy.min() <= copy.max() <= 1
    assert (
        abs(drawn["rotation_degrees"]) <= 5
        and 0.8 <= drawn["gamma"] <= 1.25
        and abs(drawn["brightness"]) <= 0.08
    )
    unflipped = np.flip(copy, axis=1 + drawn["flip_axis"])
    assert correlation(centre(unflipped), centre(source)) > 0.8
    assert np.abs(copy - source).mean() > 0.02


def test_a_2d_variation_draws_what_it_drew_before_volumes_were_supported() -> None:
    # Planted 2D sets written before stay the same: the same draws, in the same order, and nothing else.
    rng = np.random.default_rng(11)
    expected = {
        "flip_axis": int(rng.integers(0, 2)),
        "rotation_degrees": float(rng.uniform(-5, 5)),
        "gamma": float(np.exp(rng.uniform(*np.log((0.8, 1.25))))),
        "brightness": float(rng.uniform(-0.08, 0.08)),
    }
    _, drawn = planted_variation(render("vessels", "p", (16, 16)), np.random.default_rng(11))
    assert drawn == expected


def test_a_3d_variation_flips_any_axis_and_rotates_in_one_plane() -> None:
    source = render("knee", "p", (32, 32, 16))
    flips, planes = set(), set()
    for seed in range(12):
        copy, drawn = planted_variation(source, np.random.default_rng(seed))
        assert copy.shape == source.shape and copy.dtype == np.float32 and 0 <= copy.min() <= copy.max() <= 1
        assert tuple(drawn["rotation_plane"]) in PLANES and abs(drawn["rotation_degrees"]) <= 5
        flips.add(drawn["flip_axis"])
        planes.add(tuple(drawn["rotation_plane"]))
        unflipped = np.flip(copy, axis=1 + drawn["flip_axis"])
        assert correlation(centre(unflipped), centre(source)) > 0.8, drawn
        assert correlation(centre(copy), centre(source)) < 0.95, "the flip should change the volume"
    assert flips == {0, 1, 2} and planes == set(PLANES)


def test_a_rotation_plane_turns_only_its_two_axes() -> None:
    # A volume constant along one axis stays so when rotated in the plane of the other two.
    slab = np.broadcast_to(render("radiograph", "p", (24, 24))[..., None], (1, 24, 24, 12)).copy()
    for seed in range(20):
        copy, drawn = planted_variation(slab, np.random.default_rng(seed), noise_std=0.0)
        if drawn["rotation_plane"] == [0, 1] and abs(drawn["rotation_degrees"]) > 2:
            assert np.allclose(copy[..., :1], copy, atol=1e-5)
            return
    pytest.fail("no draw rotated in the (H, W) plane")


@pytest.mark.parametrize("family", ["radiograph", "knee", "brain"])
def test_a_follow_up_is_the_same_patient_moved_a_little(family: str) -> None:
    size = SMALL[family_spatial_dims(family)]
    source = render(family, "p", size)
    scans = [follow_up(source, np.random.default_rng(seed)) for seed in range(4)]
    for scan in scans:
        assert scan.shape == source.shape and scan.dtype == np.float32 and 0 <= scan.min() <= scan.max() <= 1
        assert correlation(scan, source) > 0.8
        assert np.abs(scan - source).mean() > 0.005
    assert not np.allclose(scans[0], scans[1]), "each follow-up is another scan"
    # Closer to its patient than another patient is (radiographs are alike: 0.87 for this pair).
    assert np.mean([correlation(scan, source) for scan in scans]) > correlation(
        render(family, "q", size), source
    )


def test_planted_copy_set_holds_the_stated_copies_and_novel_patients(tmp_path) -> None:
    planted = write_planted_copy_set(
        tmp_path / "set", "vessels", n_train=10, n_val=6, n_copies=4, n_novel=5, spatial_size=(32, 32)
    )
    names = {
        split: sorted(p.stem for p in (tmp_path / "set" / split).glob("*.png"))
        for split in ("train", "val", "synthetic")
    }
    assert (len(names["train"]), len(names["val"]), len(names["synthetic"])) == (10, 6, 9)
    assert not set(names["train"]) & set(names["val"])
    assert sorted([*planted["copies"], *planted["novel"]]) == names["synthetic"]
    assert (
        set(planted["copies"].values()) <= set(names["train"]) and len(set(planted["copies"].values())) == 4
    )
    assert json.loads((tmp_path / "set" / "planted.json").read_text()) == planted
    with Image.open(tmp_path / "set" / "train" / f"{names['train'][0]}.png") as image:
        assert image.mode == "L" and image.size == (32, 32)
    with pytest.raises(InputError, match="is not empty"):
        write_planted_copy_set(tmp_path / "set", "vessels", n_train=10, n_val=6, n_copies=4, n_novel=5)
    with pytest.raises(InputError, match="n_copies=11"):
        write_planted_copy_set(tmp_path / "other", "vessels", n_train=10, n_copies=11)


def test_a_one_image_set_is_flat_files_with_the_pixels_it_always_had(tmp_path) -> None:
    root = tmp_path / "set"
    planted = write_planted_copy_set(
        root, "radiograph", n_train=5, n_val=3, n_copies=2, n_novel=3, spatial_size=(24, 20), seed=7
    )
    assert all(
        path.is_file() and path.suffix == ".png"
        for split in ("train", "val", "synthetic")
        for path in (root / split).iterdir()
    )
    assert (
        planted["copy_patients"]
        == planted["copies"]
        == {"syn_0000": "radiograph-7-00003", "syn_0001": "radiograph-7-00004"}
    )
    assert planted["novel"] == ["syn_0002", "syn_0003", "syn_0004"] and "blend_sources" not in planted
    assert (planted["images_per_patient"], planted["novel_kind"], planted["spatial_dims"]) == (1, "new", 2)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(path.relative_to(root).as_posix().encode())
        with Image.open(path) as image:
            digest.update(np.asarray(image).tobytes())
    # The pixels of this set as the code wrote it before volumes, follow-ups and blends existed.
    assert digest.hexdigest() == "dde8a5fec8434561de55bd5fa0eb2724cf6d51340f08ba9c4f3d24711f901677"


def test_a_3d_set_of_follow_ups_is_a_folder_per_patient_read_as_volumes(tmp_path) -> None:
    root, size = tmp_path / "set", (24, 24, 8)
    planted = write_planted_copy_set(
        root,
        "knee",
        n_train=6,
        n_val=4,
        n_copies=3,
        n_novel=3,
        spatial_size=size,
        images_per_patient=(1, 3),
        seed=1,
    )
    assert (planted["spatial_dims"], planted["images_per_patient"], planted["spatial_size"]) == (
        3,
        [1, 3],
        list(size),
    )
    visits = {}
    for split in ("train", "val"):
        assert all(path.is_dir() for path in (root / split).iterdir()), "every patient is a folder"
        for patient in (root / split).iterdir():
            names = sorted(path.name for path in patient.iterdir())
            assert names == [f"visit_{k}.npy" for k in range(1, len(names) + 1)] and 1 <= len(names) <= 3
            visits[split, patient.name] = len(names)
    assert max(visits.values()) > 1 and len({patient for _, patient in visits}) == 10, (
        "each patient on one side"
    )
    patient = next(patient for (split, patient), count in visits.items() if split == "train" and count > 1)
    first, second = (np.load(root / "train" / patient / f"visit_{k}.npy") for k in (1, 2))
    assert correlation(first, second) > 0.8 and np.abs(first - second).mean() > 0.005, "visits are follow-ups"
    records = image_records(root / "train", "--train", 3)
    assert {r["patient"] for r in records} == {patient for split, patient in visits if split == "train"}
    assert all(r["shape"] == size for r in records)
    volume = np.load(root / "synthetic" / "syn_0000.npy")
    assert volume.shape == size and volume.dtype == np.float32
    assert len(set(planted["copy_patients"].values())) == 3
    for synthetic_id, image_id in planted["copies"].items():
        patient, visit = image_id.split("/")
        assert planted["copy_patients"][synthetic_id] == patient and visit.startswith("visit_")
        source = np.load(root / "train" / f"{image_id}.npy")[None]
        copy = np.load(root / "synthetic" / f"{synthetic_id}.npy")[None]
        unflipped = np.flip(copy, axis=1 + planted["variations"][synthetic_id]["flip_axis"])
        assert correlation(centre(unflipped), centre(source)) > 0.8
    data = FolderDataModule(str(root / "train"), str(root / "val"), list(size), batch_size=4)
    assert sorted(data.train_ids) == sorted(r["id"] for r in records)
    assert all(image.shape == (1, *size) for image in reference_images(data, "val").values())


def test_blended_novel_images_are_the_mean_of_two_training_patients(tmp_path) -> None:
    root = tmp_path / "set"
    planted = write_planted_copy_set(
        root, "radiograph", n_train=8, n_val=3, n_copies=2, n_novel=4, spatial_size=(48, 48), novel="blend"
    )
    assert planted["novel_kind"] == "blend" and sorted(planted["blend_sources"]) == planted["novel"]

    def read(folder: str, name: str) -> np.ndarray:
        with Image.open(root / folder / f"{name}.png") as image:
            return np.asarray(image, dtype=np.float64)[None] / 255

    for synthetic_id, (a, b) in planted["blend_sources"].items():
        assert a != b and (root / "train" / f"{a}.png").is_file() and (root / "train" / f"{b}.png").is_file()
        drawn = planted["variations"][synthetic_id]
        blend = np.flip(read("synthetic", synthetic_id), axis=1 + drawn["flip_axis"])
        mean = (read("train", a) + read("train", b)) / 2
        assert correlation(centre(blend), centre(mean)) > 0.9
        for single in (a, b):  # near both, a copy of neither
            assert correlation(centre(blend), centre(read("train", single))) < correlation(
                centre(blend), centre(mean)
            )


def test_bad_set_options_are_input_errors(tmp_path) -> None:
    with pytest.raises(InputError, match=r"novel='average' must be one of \['new', 'blend'\]"):
        write_planted_copy_set(
            tmp_path / "a", "vessels", n_train=4, n_val=2, n_copies=1, n_novel=1, novel="average"
        )
    for bad in (0, (3, 2), (0, 2)):
        with pytest.raises(InputError, match="images_per_patient="):
            write_planted_copy_set(
                tmp_path / "b", "vessels", n_train=4, n_val=2, n_copies=1, n_novel=1, images_per_patient=bad
            )
    with pytest.raises(InputError, match="'knee' is 3D"):
        write_planted_copy_set(
            tmp_path / "c", "knee", n_train=4, n_val=2, n_copies=1, n_novel=1, spatial_size=(32, 32)
        )
    assert not any(tmp_path.iterdir()), "nothing is written for bad options"


def test_a_set_defaults_to_the_family_size(tmp_path) -> None:
    planted = write_planted_copy_set(tmp_path / "set", "brain", n_train=2, n_val=2, n_copies=1, n_novel=1)
    assert planted["spatial_size"] == [64, 64, 32]
    assert np.load(next((tmp_path / "set" / "val").iterdir())).shape == (64, 64, 32)
