"""Phantom patients and the shared DataModule machinery: determinism, splits, subsets, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memwatch.datamodules import PhantomDataModule
from memwatch.datamodules.phantom import render_phantom
from memwatch.errors import InputError


@pytest.mark.parametrize("size", [(32, 32), (24, 20, 16)])
def test_same_id_same_image_and_different_ids_differ(size):
    first = render_phantom("phantom-0007", size)
    assert first.shape == (1, *size) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, render_phantom("phantom-0007", size))
    others = [render_phantom(f"phantom-{i:04d}", size) for i in range(8) if i != 7]
    # Every other patient differs from this one in a visible share of the pixels.
    assert min(float(np.mean(np.abs(first - other) > 0.1)) for other in others) > 0.05


def test_batches_follow_the_contract():
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=10, batch_size=4)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"image", "id"}
    assert type(batch["image"]) is torch.Tensor and batch["image"].dtype == torch.float32
    assert batch["image"].shape == (4, 1, 16, 16)
    assert all(isinstance(i, str) and i.startswith("phantom-") for i in batch["id"])
    volume = next(iter(PhantomDataModule(spatial_size=(16, 16, 8), n_patients=10, batch_size=2).val_dataloader()))
    assert volume["image"].shape == (2, 1, 16, 16, 8)


def test_split_is_seeded_by_patient_and_disjoint():
    a = PhantomDataModule(n_patients=50, val_fraction=0.2, split_seed=1)
    b = PhantomDataModule(n_patients=50, val_fraction=0.2, split_seed=1)
    c = PhantomDataModule(n_patients=50, val_fraction=0.2, split_seed=2)
    assert a.train_ids == b.train_ids and a.val_ids == b.val_ids
    assert a.val_ids != c.val_ids
    assert not set(a.train_ids) & set(a.val_ids)
    assert len(a.train_ids) == 40 and len(a.val_ids) == 10


def test_split_file_fixes_the_split(tmp_path):
    split = tmp_path / "split.csv"
    rows = ["patient,split"] + [f"phantom-{i:04d},{'val' if i < 3 else 'train'}" for i in range(10)]
    split.write_text("\n".join(rows) + "\n")
    data = PhantomDataModule(n_patients=10, split_file=str(split))
    assert data.val_ids == ["phantom-0000", "phantom-0001", "phantom-0002"]
    split.write_text("patient,split\nphantom-0000,val\n")
    with pytest.raises(InputError, match="does not list patient"):
        PhantomDataModule(n_patients=10, split_file=str(split)).setup()


def test_n_train_subsets_are_nested_and_checked():
    small = PhantomDataModule(n_patients=50, n_train=10).train_ids
    large = PhantomDataModule(n_patients=50, n_train=20).train_ids
    assert len(small) == 10 and len(large) == 20 and set(small) < set(large)
    assert PhantomDataModule(n_patients=50, n_train=10).val_ids == PhantomDataModule(n_patients=50).val_ids
    with pytest.raises(InputError, match=r"n_train=41 is larger than the 40 training images.*at most 40"):
        PhantomDataModule(n_patients=50, n_train=41).setup()


def test_augmentation_only_on_training_batches():
    torch.manual_seed(0)
    data = PhantomDataModule(spatial_size=(24, 24), n_patients=30, batch_size=24, augment=True)
    data.setup()
    reference = next(iter(data.reference_dataloader("train")))
    plain = dict(zip(reference["id"], reference["image"], strict=True))
    augmented = next(iter(data.train_dataloader()))
    changed = [not torch.equal(im, plain[i]) for im, i in zip(augmented["image"], augmented["id"], strict=True)]
    # flip p=0.5 per axis and rotation p=0.5: about 7 in 8 images change
    assert 0.5 < np.mean(changed) < 1.0
    assert augmented["image"].min() >= 0.0 and augmented["image"].max() <= 1.0
    reference = next(iter(data.reference_dataloader("train")))
    assert all(torch.equal(im, plain[i]) for im, i in zip(reference["image"], reference["id"], strict=True))
    unaugmented = PhantomDataModule(spatial_size=(24, 24), n_patients=30, batch_size=24)
    batch = next(iter(unaugmented.train_dataloader()))
    assert all(torch.equal(im, plain[i]) for im, i in zip(batch["image"], batch["id"], strict=True))


def test_bad_sizes_fail_at_construction():
    with pytest.raises(InputError, match="spatial_size"):
        PhantomDataModule(spatial_size=(32,))
    with pytest.raises(InputError, match="n_train=0"):
        PhantomDataModule(n_train=0)
