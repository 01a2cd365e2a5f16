"""The callback on the real LDM: it leaves training untouched, and 1, 2 or 3 processes compute the same numbers, bitwise."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger

from memwatch.callbacks import MemorizationCallback
from memwatch.datamodules import PhantomDataModule
from memwatch.lightning_modules import LatentDiffusionModule, SimCLRModule
from memwatch.lightning_private import averaged_model
from memwatch.memorization.history import MEMBERSHIP_HISTORY_FILE, read_history
from tests.helpers import memorization_history, quiet_trainer, run_cli

SIZE = (16, 16)  # the size of the session autoencoder
# 33 training and 27 validation patients (enough held out for τ at the 95th percentile)
PHANTOMS = {"spatial_size": SIZE, "n_patients": 60, "val_fraction": 0.45, "batch_size": 4}
TINY_UNET = dict(channels=(16, 32), norm_num_groups=8, num_head_channels=8, num_train_timesteps=100)


@pytest.fixture(scope="module")
def embedder_16(tmp_path_factory) -> Path:
    """A small embedder trained briefly on the 33 training phantoms of `PHANTOMS` (16×16)."""
    L.seed_everything(0)
    model = SimCLRModule(
        embedding_dim=16, resnet_block="basic", resnet_layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), lr=1e-3
    )
    trainer = quiet_trainer(max_steps=20, limit_val_batches=0)
    trainer.fit(model, PhantomDataModule(**{**PHANTOMS, "batch_size": 16}))
    path = tmp_path_factory.mktemp("embedder16") / "embedder.ckpt"
    trainer.save_checkpoint(path)
    return path


def fit_ldm(autoencoder_ckpt: Path, tmp_path: Path, callback: MemorizationCallback | None) -> list[dict]:
    """Three epochs of a tiny LDM with EMA; the weights and EMA weights at the end."""
    L.seed_everything(0)
    model = LatentDiffusionModule(autoencoder_ckpt=str(autoencoder_ckpt), lr=1e-3, **TINY_UNET)
    ema = EMAWeightAveraging(decay=0.9, use_buffers=False)
    trainer = quiet_trainer(
        max_epochs=3, limit_val_batches=1, callbacks=[ema, *([callback] if callback else [])],
        logger=TensorBoardLogger(tmp_path, name="run"),
    )  # fmt: skip
    trainer.fit(model, PhantomDataModule(**PHANTOMS, n_train=20))  # the embedder's split: none of its patients held out
    return [model.state_dict(), averaged_model(ema).module.state_dict()]


def test_training_ends_with_the_same_weights_with_and_without_the_callback(autoencoder_ckpt, embedder_16, tmp_path):
    callback = MemorizationCallback(
        str(embedder_16), n_samples=6, num_inference_steps=2, sample_batch_size=4,
        log_images=True, output_dir=str(tmp_path / "reports"),
    )  # fmt: skip
    with_callback = fit_ldm(autoencoder_ckpt, tmp_path / "with", callback)
    without = fit_ldm(autoencoder_ckpt, tmp_path / "without", None)
    assert [row["epoch"] for row in callback.history] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [f"check_00{i}" for i in range(3)]
    for trained, reference in zip(with_callback, without, strict=True):
        assert trained.keys() == reference.keys()
        changed = [name for name in trained if not torch.equal(trained[name], reference[name])]
        assert not changed, changed[:5]


def test_one_two_and_three_processes_compute_every_image_identically(autoencoder_ckpt, embedder_16, tmp_path):
    # 33 training and 27 validation images, 7 samples in blocks of 3: every share and gather is uneven.
    data = {**PHANTOMS, "spatial_size": list(SIZE)}
    assert len(PhantomDataModule(**data).train_ids) == 33
    model = {"autoencoder_ckpt": str(autoencoder_ckpt), "lr": 0.0, **TINY_UNET}  # lr 0: one set of weights
    callback = {"class_path": "tests.recording.RecordingMemorizationCallback", "init_args": {
        "record_dir": "SET PER RUN", "embedder_ckpt": str(embedder_16), "check_at_start": True, "n_samples": 7,
        "num_inference_steps": 2, "sample_batch_size": 3, "log_images": True}}  # fmt: skip
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "precision": "32-true", "limit_train_batches": 1,
            "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "ldm"}},
        },
        "model": {"class_path": "memwatch.lightning_modules.LatentDiffusionModule", "init_args": model},
        "data": {"class_path": "memwatch.datamodules.PhantomDataModule", "init_args": data},
    }  # fmt: skip
    path = tmp_path / "ldm.yaml"
    path.write_text(yaml.safe_dump(config))
    # One epoch on one process fixes the weights and the latent scale factor (which depends on the ranks' batches).
    result = run_cli("fit", "--config", str(path), "--trainer.logger.init_args.version", "start")
    assert result.returncode == 0, result.stderr[-3000:]
    start = tmp_path / "ldm" / "start" / "checkpoints" / "last.ckpt"
    membership = {"class_path": "tests.recording.RecordingMembershipCallback", "init_args": {"record_dir": "SET PER RUN"}}
    config["trainer"] |= {"max_epochs": 3}

    # One thread per process in every run: on a CPU the thread count, like the batch on a GPU, may change
    # the rounding; what the blocks control is that each image is computed in the same batch.
    def fit_on(devices: int) -> list[dict]:
        record = {"record_dir": str(tmp_path / f"record{devices}")}
        trainer = {**config["trainer"], "callbacks": [  # the membership signal first: a check's row carries it
            {**membership, "init_args": record}, {**callback, "init_args": {**callback["init_args"], **record}},
        ]}  # fmt: skip
        run_config = tmp_path / f"ldm{devices}.yaml"
        run_config.write_text(yaml.safe_dump({**config, "trainer": trainer}))
        result = run_cli(
            "fit", "--config", str(run_config), "--ckpt_path", str(start),
            "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.logger.init_args.version", f"devices{devices}", threads=1,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return memorization_history(tmp_path / "ldm" / f"devices{devices}")

    with ThreadPoolExecutor(3) as pool:  # independent runs from one checkpoint, each mostly importing: at once
        runs = dict(zip((1, 2, 3), pool.map(fit_on, (1, 2, 3)), strict=True))
    assert [row["epoch"] for row in runs[1]] == [1, 2]  # resumed at epoch 1: no epoch-0 check

    def recorded(devices: int, check: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        ranks = [torch.load(tmp_path / f"record{devices}" / f"check{check}_rank{r}.pt") for r in range(devices)]
        return (
            [i for rank in ranks for i in rank["indices"]],
            torch.cat([rank["embeddings"] for rank in ranks]),
            torch.cat([rank["pairs"] for rank in ranks]),
        )

    references = {devices: torch.load(tmp_path / f"record{devices}" / "reference.pt") for devices in (1, 2, 3)}
    for devices in (2, 3):
        for split in ("train", "val"):
            assert torch.equal(references[devices][split], references[1][split]), (devices, split)
        for check in (0, 1):
            indices, embeddings, pairs = recorded(devices, check)
            one_indices, one_embeddings, one_pairs = recorded(1, check)
            assert indices == one_indices == list(range(7))
            assert torch.equal(embeddings, one_embeddings), (devices, check)  # every sample's embedding, bitwise
            assert torch.equal(pairs, one_pairs), (devices, check)
        # The CSV writes each float's repr, read back exactly: equal reprs are equal bits (NaN included).
        keys = ("check", "epoch", "n_mem", "n_copies", "tau", "fd", "ms_ssim", "frac_mem", "frac_copies", "null_frac_mem")
        assert [[repr(row[k]) for k in keys] for row in runs[devices]] == [[repr(row[k]) for k in keys] for row in runs[1]]
        # The membership signal: every image's score and the AUCs, bitwise, on any world size.
        for step in (2, 3):  # one training batch per epoch, evaluated at the end of epochs 1 and 2
            scores, one = (torch.load(tmp_path / f"record{d}" / f"membership_step{step}.pt") for d in (devices, 1))
            assert all(torch.equal(scores[split], one[split]) for split in ("train", "val")), (devices, step)
        membership = [read_history(tmp_path / "ldm" / f"devices{d}" / MEMBERSHIP_HISTORY_FILE) for d in (devices, 1)]
        keys = ("step", "membership_auc", "membership_auc_low", "membership_tpr_at_5fpr", "membership_auc_control")
        assert [[repr(row[k]) for k in keys] for row in membership[0]] == [[repr(row[k]) for k in keys] for row in membership[1]]
    assert float(runs[1][0]["tau"]) > 0 and float(runs[1][0]["ms_ssim"]) > 0
    # All 27 held-out images and 27 of the 33 training ones are scored (1 UNet forward each), in the history too.
    one = torch.load(tmp_path / "record1" / "membership_step2.pt")
    assert (len(one["train"]), len(one["val"])) == (27, 27) and torch.isfinite(one["train"]).all()
    assert runs[1][0]["membership_auc"] == read_history(tmp_path / "ldm" / "devices1" / MEMBERSHIP_HISTORY_FILE)[0]["membership_auc"]
    # Rank 0 of 3 holds samples 0-5 (two blocks of 3: a pair never splits), rank 1 sample 6, rank 2 none.
    assert [len(torch.load(tmp_path / "record3" / f"check0_rank{r}.pt")["indices"]) for r in range(3)] == [6, 1, 0]
