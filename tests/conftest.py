"""Shared fixtures: tiny phantom data, a folder of phantom PNGs, a trained tiny autoencoder, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from datamodules import PhantomDataModule
from datamodules.phantom import render_phantom
from lightning_modules import AutoencoderModule

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
            Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(root / split / f"patient_{i:02d}.png")
    return root


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
