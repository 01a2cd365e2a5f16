"""Every training stage as 2 gloo CPU processes through the real CLI, and SimCLR's gathered negatives.

DDP runs in subprocesses (in-process DDP under pytest leaves orphan ranks). The four runs are
independent and each spends most of its time importing, so a module fixture starts them all at
once. The LDM's 2-process run is `test_ldm_trains_as_two_cpu_processes` in tests/test_cli.py.

`python tests/test_ddp_training.py simclr-gradients OUT` is the 2-process half of the SimCLR
loss test: it writes each rank's loss and DDP-averaged gradient after one step.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from memwatch.lightning_modules.simclr import SimCLRModule
from tests.helpers import ROOT, quiet_trainer, run_cli

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
STEPS = 4


class RankWeights(L.Callback):
    """Saves every rank's parameters at the start and the end of fit, as `rank{R}_{start,end}.pt` in `out`."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        weights = {name: p.detach().cpu().clone() for name, p in pl_module.named_parameters()}
        torch.save(weights, self.out / f"rank{trainer.global_rank}_{when}.pt")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "end")


def _fit_args(config: str, out: Path, *extra: str) -> list[str]:
    callback = {"class_path": "tests.test_ddp_training.RankWeights", "init_args": {"out": str(out)}}
    return [
        "fit", "--config", str(ROOT / "configs" / config), *DDP,
        "--trainer.max_steps", str(STEPS),
        "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks", yaml.safe_dump([callback], default_flow_style=True, width=1 << 20),
        # 10 training images: 5 per rank, batches of 4 and 1 (an uneven last batch), 2 steps an epoch
        "--data.init_args.n_patients", "20", "--data.init_args.val_fraction", "0.5",
        "--data.init_args.batch_size", "4",
        *extra,
    ]  # fmt: skip


AE_WARMUP = ["--model.init_args.adv_warmup_steps", "2"]  # steps 3 and 4 train the discriminator
CASES = {
    "kl": ("phantom_ae.yaml", AE_WARMUP),
    "vq": (
        "phantom_ae.yaml",
        [*AE_WARMUP, "--model.init_args.kind", "vq", "--model.init_args.channels", "[16, 32]"],
    ),
    "simclr": (
        "phantom_simclr.yaml",
        ["--model.init_args.channels", "[16, 32, 64, 128]", "--model.init_args.embedding_dim", "16"],
    ),
}


def _simclr_two_processes(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "simclr-gradients", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every 2-process run of this file, started together: name → (output folder, finished process)."""
    folders = {name: tmp_path_factory.mktemp(f"ddp_{name}") for name in [*CASES, "simclr_gradients"]}
    with ThreadPoolExecutor(len(folders)) as pool:
        futures = {
            name: pool.submit(run_cli, *_fit_args(config, folders[name], *extra))
            for name, (config, extra) in CASES.items()
        }
        futures["simclr_gradients"] = pool.submit(_simclr_two_processes, folders["simclr_gradients"])
        return {name: (folders[name], future.result()) for name, future in futures.items()}


def _finished(run: tuple[Path, subprocess.CompletedProcess], stage: str) -> tuple[dict, dict, dict]:
    """Check a CLI run ended well on 2 processes; (rank 0 start, rank 0 end, rank 1 end) parameters."""
    out, result = run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    (checkpoint,) = out.glob(f"{stage}/version_0/checkpoints/last.ckpt")
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == STEPS
    load = lambda name: torch.load(out / name, weights_only=True)  # noqa: E731
    start, end, other = load("rank0_start.pt"), load("rank0_end.pt"), load("rank1_end.pt")
    # The ranks saw different images: identical weights after the steps mean DDP synced the gradients.
    assert end.keys() == other.keys()
    for name in end:
        torch.testing.assert_close(end[name], other[name], rtol=0, atol=1e-6, msg=name)
    return start, end, other


def _logged(out: Path, stage: str) -> set[str]:
    # Imported here: the CLI's ranks import this module for RankWeights and need no TensorBoard reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = out.glob(f"{stage}/version_0")
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_trains_past_the_adversarial_warmup_as_two_cpu_processes(runs, kind):
    start, end, _ = _finished(runs[kind], "phantom_ae")
    out = runs[kind][0]
    assert {"train/adv_g", "train/adv_d", "train/l1", "val/l1"} <= _logged(out, "phantom_ae")
    for network in ("autoencoder.", "discriminator."):
        names = [name for name in start if name.startswith(network)]
        assert names and any(not torch.equal(start[n], end[n]) for n in names), f"{network} did not train"


def test_simclr_trains_as_two_cpu_processes(runs):
    start, end, _ = _finished(runs["simclr"], "phantom_simclr")
    assert any(not torch.equal(start[n], end[n]) for n in start)
    assert {"train/loss", "train/embedding_std", "val/loss"} <= _logged(runs["simclr"][0], "phantom_simclr")


# --- SimCLR: 2 processes with gathered negatives = 1 process over the concatenated batch ---------

N_IMAGES = 63
# Rank 0 takes images 0-32, rank 1 images 33-62 and image 5 again: unequal batch sizes (padded for
# the gather) and a repeated id (as DistributedSampler's padding makes), which must count once.
RANK_INDICES = {0: list(range(33)), 1: [*range(33, N_IMAGES), 5]}


class FlipViewsSimCLR(SimCLRModule):
    """Second view = the horizontal flip, so that 1 and 2 processes build the very same pairs."""

    def _embed_pairs(self, images: torch.Tensor, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.encoder(torch.cat([images, images.flip(-1)])).float()
        return embeddings[: len(images)], embeddings[len(images) :]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.recorded_loss = loss.detach().clone()
        return loss


class RankImages(L.LightningDataModule):
    """All `N_IMAGES` test images in one batch on one process; `RANK_INDICES` under 2 processes."""

    def train_dataloader(self) -> DataLoader:
        images = torch.rand(N_IMAGES, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        indices = RANK_INDICES[self.trainer.global_rank] if self.trainer.world_size > 1 else range(N_IMAGES)
        items = [{"image": images[i], "id": f"image-{i}"} for i in indices]
        return DataLoader(items, batch_size=len(items))


class SaveGradients(L.Callback):
    """Writes the loss and the (DDP-averaged) gradients before the first optimizer step."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {name: p.grad.detach().clone() for name, p in pl_module.named_parameters()}
        torch.save(
            {"loss": pl_module.recorded_loss, "grads": grads}, self.out / f"rank{trainer.global_rank}.pt"
        )


def simclr_step(out: Path, devices: int) -> None:
    L.seed_everything(0)
    module = FlipViewsSimCLR(encoder="conv", channels=(8,), hidden_dim=16, embedding_dim=8)
    trainer = quiet_trainer(
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[SaveGradients(out)],
    )
    trainer.fit(module, RankImages())


def test_simclr_two_process_loss_and_gradient_equal_one_process_over_the_concatenated_batch(runs, tmp_path):
    out, result = runs["simclr_gradients"]
    assert result.returncode == 0, result.stderr[-3000:]
    simclr_step(tmp_path, devices=1)
    one = torch.load(tmp_path / "rank0.pt", weights_only=True)
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for two in ranks:
        torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=0)
        # Measured: differences up to 7e-7 (summation order) on gradients of about 0.1-1; the conv biases
        # before a GroupNorm have gradients of 0 analytically (1e-8 here): an absolute tolerance.
        for name, grad in one["grads"].items():
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)


if __name__ == "__main__":
    if sys.argv[1:2] == ["simclr-gradients"]:
        simclr_step(Path(sys.argv[2]), devices=2)
    else:
        sys.exit(f"usage: {sys.argv[0]} simclr-gradients OUT")
