"""Shared fixtures: a trained tiny autoencoder and embedder, fake datasets in the real formats (phantom PNGs,
ChestX-ray14, MRNet, NIfTI) and the audit's planted-copies folders. Shared helpers that are not fixtures
are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from memwatch.datamodules import PhantomDataModule
from memwatch.datamodules.phantom import render_phantom
from memwatch.memorization.variation import vary
from tests.helpers import (
    AUDIT_N_NOVEL,
    AUDIT_N_PLANTED,
    MEMORIZATION_SIZE,
    memorization_phantoms,
    quiet_trainer,
    save_npy,
    tiny_autoencoder,
    write_chestxray14,
    write_mrnet,
)


@pytest.fixture(scope="session")
def autoencoder_ckpt(tmp_path_factory) -> Path:
    """A tiny 2D KL autoencoder, trained briefly on 16×16 phantoms, saved as a checkpoint."""
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=20, batch_size=8)
    model = tiny_autoencoder()
    trainer = quiet_trainer(max_steps=30)
    trainer.fit(model, data)
    path = tmp_path_factory.mktemp("autoencoder") / "ae.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def folder_dataset(tmp_path_factory) -> Path:
    """`ROOT/train` (6) and `ROOT/val` (4): 64×64 8-bit PNGs of phantom patients, for `FolderDataModule`."""
    root = tmp_path_factory.mktemp("folder_dataset")
    for split, indices in [("train", range(6)), ("val", range(6, 10))]:
        (root / split).mkdir()
        for i in indices:
            pixels = render_phantom(f"phantom-{i:04d}", (64, 64))[0]
            Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(
                root / split / f"patient_{i:02d}.png"
            )
    return root


@pytest.fixture(scope="session")
def embedder_ckpt(tmp_path_factory) -> Path:
    """A small 2D embedder trained briefly on the training patients of `memorization_phantoms()`."""
    from memwatch.lightning_modules import SimCLRModule

    L.seed_everything(0)
    model = SimCLRModule(
        embedding_dim=32,
        resnet_block="basic",
        resnet_layers=(1, 1, 1, 1),
        channels=(16, 32, 64, 128),
        lr=1e-3,
    )
    trainer = quiet_trainer(max_steps=150, limit_val_batches=0)
    trainer.fit(model, memorization_phantoms())
    path = tmp_path_factory.mktemp("embedder") / "embedder.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def chestxray_dataset(tmp_path_factory) -> Path:
    """A 12-image NIH ChestX-ray14 in the real format (64×64 PNGs, table, list files), for `ChestXray14DataModule`."""
    return write_chestxray14(tmp_path_factory.mktemp("chestxray") / "ChestX-ray14")


@pytest.fixture(scope="session")
def mrnet_dataset(tmp_path_factory) -> Path:
    """A 13-case MRNet-v1.0 in the real format (uint8 .npy of 5/7/9 slices × 36×36, label CSVs), for `MRNetDataModule`."""
    return write_mrnet(tmp_path_factory.mktemp("mrnet") / "MRNet-v1.0", n_train=10, n_valid=3, size=(36, 36))


@pytest.fixture(scope="session")
def nifti_dataset(tmp_path_factory) -> Path:
    """8 patients of 36×34×30 int16 CT-like phantoms (HU, -1000 to 1000) as NIfTI, for `NiftiDataModule`.

    Seven files in the root (every other one with an LPS affine), one patient as a subfolder of two volumes.
    """
    import nibabel

    root = tmp_path_factory.mktemp("nifti_dataset")
    names = [f"patient_{i:02d}.nii.gz" for i in range(7)] + [
        "patient_07/scan_a.nii.gz",
        "patient_07/scan_b.nii",
    ]
    for i, name in enumerate(names):
        hu = np.round(render_phantom(f"phantom-{i:04d}", (36, 34, 30))[0] * 2000 - 1000).astype(np.int16)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if i % 2 else np.eye(4)
        (root / name).parent.mkdir(exist_ok=True)
        nibabel.save(nibabel.Nifti1Image(hu, affine), root / name)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """`train/`, `val/` (the embedder's phantom patients as .npy) and `synthetic/`: 8 varied copies + 16 novel patients."""
    root = tmp_path_factory.mktemp("audit")
    data = memorization_phantoms()
    for split, ids in [("train", data.train_ids), ("val", data.val_ids)]:
        for image_id in ids:
            save_npy(root / split / f"{image_id}.npy", render_phantom(image_id, MEMORIZATION_SIZE)[0])
    planted = data.train_ids[:AUDIT_N_PLANTED]
    originals = torch.stack([torch.from_numpy(render_phantom(i, MEMORIZATION_SIZE)) for i in planted])
    for k, image in enumerate(vary(originals, seed=1)):
        save_npy(root / "synthetic" / f"copy_{k:02d}.npy", image[0])
    novel = torch.stack(
        [torch.from_numpy(render_phantom(f"novel-{k:04d}", MEMORIZATION_SIZE)) for k in range(AUDIT_N_NOVEL)]
    )
    for k, image in enumerate(vary(novel, seed=2)):
        save_npy(root / "synthetic" / f"novel_{k:02d}.npy", image[0])
    return root
