"""Shared fixtures: tiny phantom data, a folder of phantom PNGs, a trained tiny autoencoder, and the real CLI."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import yaml
from PIL import Image

from memwatch.datamodules import PhantomDataModule
from memwatch.datamodules.phantom import render_phantom
from memwatch.lightning_modules import AutoencoderModule
from memwatch.memorization.history import read_history
from scripts import launch
from scripts.launch import CliRun

ROOT = Path(__file__).resolve().parents[1]


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU trainer that writes nothing unless asked."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def tiny_autoencoder(**overrides) -> AutoencoderModule:
    args = dict(channels=(16, 16), latent_channels=2, norm_num_groups=8, adv_weight=0.0, lr=1e-3)
    return AutoencoderModule(**{**args, **overrides})


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


def reference_images(data, split: str = "train") -> dict:
    """id → image `[C, *spatial]` of every image of `split`, through the DataModule's reference loader."""
    loaded = {}
    for batch in data.reference_dataloader(split):
        loaded.update(zip(batch["id"], batch["image"], strict=True))
    return loaded


def input_error(action):
    """The one-line `InputError` raised by `action()`, also when MONAI's transform chain wrapped it."""
    from memwatch.errors import InputError

    with pytest.raises(Exception) as raised:
        action()
    error = raised.value
    while error is not None and not isinstance(error, InputError):
        error = error.__cause__
    assert error is not None, repr(raised.value)
    assert "\n" not in str(error)
    return error


MEMORIZATION_SIZE = (32, 32)
N_TRAIN = 32  # and as many validation patients: N_syn = N_train = N_val makes τ's 95% exact


@functools.cache
def _simulated_taus() -> np.ndarray:
    """τ of 100 000 simulated checks, as a quantile of the best held-out correlation: the 95th percentile of
    N_TRAIN uniform draws each."""
    return np.percentile(np.random.default_rng(0).random((100_000, N_TRAIN)), 95.0, axis=1)


@functools.cache
def chance_ceiling(n_counted: int, n_compared: int, risk: float = 1e-3) -> int:
    """The most of `n_counted` images that pass τ at chance level, but with probability `risk`.

    For counts a test does not control, at the sizes of `memorization_phantoms()` (τ at the 95th percentile
    of the N_TRAIN training images' best correlation with N_TRAIN held-out ones): training images that
    synthetic images of other patients (novel ones, or other training patients) make pass τ, or synthetic
    images of novel patients (or held-out images) flagged as copies. Each counted image passes when its best correlation with
    `n_compared` images (the distinct synthetic patients, or the training images) reaches τ. The worst
    case is assumed: those are as similar to it as held-out patients are to training ones, so each best
    correlation is a draw from one distribution. The expected share is then about 5%, but τ from 32
    held-out images scatters, and the count with it: 6 of 32 novel samples or more in 1 check in 12,
    more than 12 in 1 in 2000. On another CPU the embedder trains to other weights and the count is another
    draw: a test never asserts that a chance count is 0, or any exact number, nor bounds it tighter than this.
    """
    from scipy.stats import binom

    tau = _simulated_taus()
    rate = 1.0 - tau ** (n_compared / N_TRAIN)  # P(the best of n_compared reaches τ), given τ
    ceiling = 0
    while binom.sf(ceiling, n_counted, rate).mean() > risk:
        ceiling += 1
    return ceiling


# EarlyStopping on memorization/frac_mem in the scripted runs: above what 32 samples of novel patients reach
# by chance (`chance_ceiling(N_TRAIN, N_TRAIN)`: 12 of 32, 0.375; at most 6 measured, with embedders trained
# from 6 seeds) and below what copying 24 of the 32 training patients scores (16 to 24 of 32 measured), so
# which checks cross it is the test's doing. At 0.2, 7 of 32 novel patients would cross it: in the worst case
# of `chance_ceiling`, 1 check in 20.
STOP_FRAC_MEM = 0.4
N_COPIED_TO_STOP = 24


def memorization_phantoms(**overrides) -> PhantomDataModule:
    """32 training and 32 validation phantom patients at 32×32, for copy-counting tests."""
    arguments = {
        "spatial_size": MEMORIZATION_SIZE,
        "n_patients": 2 * N_TRAIN,
        "val_fraction": 0.5,
        "batch_size": 16,
    }
    return PhantomDataModule(**{**arguments, **overrides})


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
    from tests.test_chestxray_data import write_chestxray14

    return write_chestxray14(tmp_path_factory.mktemp("chestxray") / "ChestX-ray14")


@pytest.fixture(scope="session")
def mrnet_dataset(tmp_path_factory) -> Path:
    """A 13-case MRNet-v1.0 in the real format (uint8 .npy of 5/7/9 slices × 36×36, label CSVs), for `MRNetDataModule`."""
    from tests.test_mrnet_data import write_mrnet

    return write_mrnet(tmp_path_factory.mktemp("mrnet") / "MRNet-v1.0", n_train=10, n_valid=3, size=(36, 36))


@pytest.fixture(scope="session")
def nifti_dataset(tmp_path_factory) -> Path:
    """8 patients of 36×34×30 int16 CT-like phantoms (HU, -1000 to 1000) as NIfTI, for `NiftiDataModule`.

    Seven files in the root (every other one with an LPS affine), one patient as a subfolder of two volumes.
    """
    import nibabel

    root = tmp_path_factory.mktemp("nifti_dataset")
    names = [f"patient_{i:02d}.nii.gz" for i in range(7)] + ["patient_07/scan_a.nii.gz", "patient_07/scan_b.nii"]
    for i, name in enumerate(names):
        hu = np.round(render_phantom(f"phantom-{i:04d}", (36, 34, 30))[0] * 2000 - 1000).astype(np.int16)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if i % 2 else np.eye(4)
        (root / name).parent.mkdir(exist_ok=True)
        nibabel.save(nibabel.Nifti1Image(hu, affine), root / name)
    return root


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None, **options) -> CliRun:
    """`python cli.py ARGS` in a subprocess, as a user runs it, without Python's warnings; output captured.

    `env` adds to the environment and `options` are those of `scripts.launch.run_cli` (`threads`, ...)."""
    environment = {"PYTHONWARNINGS": "ignore", **(env or {})}
    return launch.run_cli(*args, cwd=cwd or ROOT, timeout=timeout, env=environment, **options)


def scripted_config(
    tmp_path: Path,
    embedder_ckpt: Path,
    *,
    copy_from_epoch: int,
    max_epochs: int,
    early_stop: bool,
    callback_args: dict | None = None,
    generator_args: dict | None = None,
) -> Path:
    """A YAML run of the scripted generator with the callback (and EarlyStopping), as a user writes it."""
    sections = {
        "memorization": {
            "embedder_ckpt": str(embedder_ckpt), "every_n_epochs": 1, "num_inference_steps": 1, **(callback_args or {}),
        },
    }  # fmt: skip
    if early_stop:
        sections["early_stopping"] = {
            "monitor": "memorization/frac_mem", "mode": "min", "divergence_threshold": STOP_FRAC_MEM, "patience": 100,
        }  # fmt: skip
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": max_epochs,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "scripted"},
            },
        },
        **sections,
        "model": {
            "class_path": "tests.doubles.ScriptedGenerator",
            "init_args": {
                "copied_ids": memorization_phantoms().train_ids[:12],
                "novel_ids": [f"novel-{i:04d}" for i in range(N_TRAIN)],
                "copy_from_epoch": copy_from_epoch,
                "spatial_size": list(MEMORIZATION_SIZE),
                **(generator_args or {}),
            },
        },
        "data": {
            "class_path": "memwatch.datamodules.PhantomDataModule",
            "init_args": {
                "spatial_size": list(MEMORIZATION_SIZE),
                "n_patients": 2 * N_TRAIN,
                "val_fraction": 0.5,
                "batch_size": 16,
            },
        },
    }
    path = tmp_path / "scripted.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def memorization_history(run_dir: Path) -> list[dict]:
    """The rows of `memorization_history.csv` in a run's log folder, as `memwatch.memorization.history` reads them."""
    return read_history(run_dir)


def config_sections(path: Path) -> dict:
    """A config's YAML sections as jsonargparse applies them: an overlay's `config: BASE` (its first
    key, BASE next to it) loads BASE first; a nested section then replaces BASE's whole section and a
    dotted key (`trainer.logger.init_args.name`) sets one value (see configs/mrnet_ldm_aug.yaml)."""
    sections = yaml.safe_load(path.read_text())
    base = sections.pop("config", None)
    if base is None:
        return sections
    merged = config_sections(path.parent / base)
    for key, value in sections.items():
        *parents, last = key.split(".")
        target = merged
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    return merged
