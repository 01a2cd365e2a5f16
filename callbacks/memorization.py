"""Memorization as a training metric: sample the LDM every few epochs and count copies of training patients.

Lightning glue around `memorization.detect_copies` (Dar et al., arXiv 2402.01054,
Algorithm 1). The reference embeddings (training and validation images) and the
threshold τ are computed once per fit; each check samples, embeds and compares only the
new synthetic images. Every rank computes the same report from gathered tensors, so
N_mem is the same on 1 or N processes.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from errors import InputError
from lightning_modules.simclr import SimCLRModule
from memorization import detect_copies, frechet_distance, ms_ssim_diversity
from memorization.report import copy_order, staged_output, viewable, write_report

SCALAR_KEYS = ("n_mem", "n_copies", "frac_mem", "frac_copies", "tau", "fd", "ms_ssim")
MAX_PAIRS = 8  # copy pairs shown per check (log_images, output_dir)
# One TensorBoard page (the CUSTOM SCALARS tab) with memorization next to the quality metrics
# that do not see it (the paper's over-training finding) and the loss.
TENSORBOARD_LAYOUT = {
    "memwatch": {
        "memorized training samples (N_mem) and copies (N_copies)": [
            "Multiline",
            ["memorization/n_mem", "memorization/n_copies"],
        ],
        "fraction memorized and fraction of copies": ["Multiline", ["memorization/frac_mem", "memorization/frac_copies"]],
        "Fréchet distance in embedder space (synthetic vs validation)": ["Multiline", ["memorization/fd"]],
        "MS-SSIM between synthetic samples (lower: more diverse)": ["Multiline", ["memorization/ms_ssim"]],
        "threshold τ": ["Multiline", ["memorization/tau"]],
        "loss": ["Multiline", ["train/loss", "val/loss"]],
    }
}


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of `range(n)` that `rank` handles (blocks differ in length by at most 1)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class Stopwatch:
    """Seconds between laps, waiting for queued GPU work so that each lap is charged to the right step."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return round(elapsed, 4)


def paired_shard(n: int, rank: int, world_size: int) -> range:
    """Like `shard`, but every block starts at an even index, so pairs `(2k, 2k + 1)` are never split."""
    pairs = shard((n + 1) // 2, rank, world_size)
    return range(min(2 * pairs.start, n), min(2 * pairs.stop, n))


def gather_rows(pl_module: LightningModule, local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows `[n_rank, ...]`, concatenated in rank order, on every rank.

    Padded to equal length before `all_gather` (unequal tensors abort gloo), unpadded after.
    """
    world_size = pl_module.trainer.world_size
    if world_size == 1:
        return local
    counts = pl_module.all_gather(torch.tensor([len(local)], device=local.device)).flatten().tolist()
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: len(local)] = local
    gathered = pl_module.all_gather(padded)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])


class MemorizationCallback(Callback):
    """Every `every_n_epochs` epochs: sample the LDM, embed, count copies, log `memorization/*`.

    Args:
        embedder_ckpt: checkpoint of a trained `SimCLRModule` (trained on the training images).
        every_n_epochs: epochs between checks; the first check ends the first epoch, so the
            logged keys exist whenever `EarlyStopping` looks.
        n_samples: synthetic images per check; default the training-set size (the paper's N_syn = N_train).
        num_inference_steps: DDIM steps per sample.
        sample_batch_size: images per sampling forward pass.
        percentile: τ is this percentile of the training→validation nearest-neighbour correlations.
        seed: sample `i` of check `k` is seeded by `(seed, k, i)`.
        log_images: also log the most similar copy pairs (training image | synthetic copy) to
            TensorBoard, and put `copies.png` in `output_dir`. Off by default: patient pixels
            leave the dataset only when asked.
        output_dir: write the audit files (`summary.json`, `pairs.csv`, `train_nn.csv`,
            `histogram.png`, with `log_images` also `copies.png`) of every check to
            `output_dir/check_NNN/`.

    Besides the counts it logs two quality metrics that, in the paper, do not reveal
    memorization: `memorization/fd`, the Fréchet distance between synthetic and validation
    embeddings, and `memorization/ms_ssim`, the mean MS-SSIM of sample pairs `(2k, 2k + 1)`.
    """

    def __init__(
        self,
        embedder_ckpt: str,
        every_n_epochs: int = 1,
        n_samples: int | None = None,
        num_inference_steps: int = 50,
        sample_batch_size: int = 16,
        percentile: float = 95.0,
        seed: int = 0,
        log_images: bool = False,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise InputError(f"every_n_epochs={every_n_epochs} must be at least 1")
        if n_samples is not None and n_samples < 1:
            raise InputError(f"n_samples={n_samples} must be at least 1 (or null for the training-set size)")
        if not 0.0 < percentile < 100.0:
            raise InputError(f"percentile={percentile} must lie in (0, 100), e.g. 95")
        self.embedder = SimCLRModule.from_checkpoint(embedder_ckpt, "embedder_ckpt").eval().requires_grad_(False)
        self.every_n_epochs = every_n_epochs
        self.n_samples = n_samples
        self.num_inference_steps = num_inference_steps
        self.sample_batch_size = sample_batch_size
        self.percentile = percentile
        self.seed = seed
        self.log_images = log_images
        self.output_dir = Path(output_dir) if output_dir else None
        self.history: list[dict[str, Any]] = []
        self._train: torch.Tensor | None = None
        self._val: torch.Tensor | None = None
        self.reference_embeddings_computed = 0  # per fit; for the overhead benchmark and tests

    # --- start-up checks ---------------------------------------------------------------

    def check_data(self, datamodule: LightningDataModule) -> None:
        """Raise `InputError` if the embedder was trained on images of another size or dimensionality."""
        size = getattr(datamodule, "spatial_size", None)
        trained_on = self.embedder.image_spatial_size
        if size is not None and trained_on is not None and tuple(size) != tuple(trained_on):
            raise InputError(
                f"the embedder was trained on images of spatial_size={list(trained_on)} but the data has "
                f"{list(size)}: train the embedder on this data (python cli.py fit --config configs/<dataset>_simclr.yaml)"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "sample", None)):
            raise InputError(f"MemorizationCallback needs a model with sample(); {type(pl_module).__name__} has none")
        if trainer.datamodule is not None:
            self.check_data(trainer.datamodule)
        position = next(i for i, callback in enumerate(trainer.callbacks) if callback is self)
        for callback in trainer.callbacks[:position]:
            if isinstance(callback, EarlyStopping) and callback.monitor.startswith("memorization/"):
                raise InputError(
                    f"EarlyStopping(monitor={callback.monitor}) comes before MemorizationCallback in "
                    "trainer.callbacks and would read last epoch's value: list it after the callback"
                )

    # --- reference embeddings, once per fit --------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.embedder.to(pl_module.device)
        datamodule = trainer.datamodule
        self._train = self._embed_split(pl_module, datamodule.reference_dataloader("train"))
        self._val = self._embed_split(pl_module, datamodule.reference_dataloader("val"))
        self.reference_embeddings_computed += 1
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars(TENSORBOARD_LAYOUT)

    def _embed_split(self, pl_module: LightningModule, loader: DataLoader) -> torch.Tensor:
        mine = shard(len(loader.dataset), pl_module.global_rank, pl_module.trainer.world_size)
        local_loader = DataLoader(
            Subset(loader.dataset, mine), batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn
        )
        embeddings = [self.embedder.embed(batch["image"].to(pl_module.device)) for batch in local_loader]
        local = torch.cat(embeddings) if embeddings else torch.empty(0, self.embedder.hparams.embedding_dim, device=pl_module.device)
        return gather_rows(pl_module, local)

    # --- checks ------------------------------------------------------------------------

    def _generator(self, trainer: Trainer, pl_module: LightningModule) -> LightningModule:
        """The EMA copy of the model where a weight-averaging callback keeps one, else the model."""
        for callback in trainer.callbacks:
            averaged = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
            if averaged is not None and averaged.n_averaged > 0:
                averaged.module.image_spatial_size = pl_module.image_spatial_size
                return averaged.module
        return pl_module

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch % self.every_n_epochs == 0 and not self._already_checked(trainer):
            self._check(trainer, pl_module)
        self._log_latest(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_latest(pl_module)

    def _already_checked(self, trainer: Trainer) -> bool:
        return bool(self.history) and self.history[-1]["step"] == trainer.global_step

    def _log_latest(self, pl_module: LightningModule) -> None:
        # Keeps the monitored keys in callback_metrics (what EarlyStopping reads) every epoch;
        # the loggers get a point per check only (`_check`).
        if self.history:
            for key, value in self._scalars(self.history[-1]).items():
                pl_module.log(key, value, logger=False, sync_dist=False)

    @staticmethod
    def _scalars(row: dict[str, Any]) -> dict[str, float]:
        # fd and ms_ssim are None when there are too few samples to compute them.
        return {f"memorization/{key}": float(row[key]) for key in SCALAR_KEYS if row.get(key) is not None}

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        clock = Stopwatch(pl_module.device)
        n_samples = self.n_samples or len(self._train)
        mine = paired_shard(n_samples, pl_module.global_rank, trainer.world_size)
        generator = self._generator(trainer, pl_module)
        check_index = len(self.history)
        local_samples = generator.sample(
            len(mine),
            seed=(self.seed, check_index),
            num_inference_steps=self.num_inference_steps,
            sample_batch_size=self.sample_batch_size,
            start_index=mine.start,
        ).to(pl_module.device)
        sampling = clock.lap()
        if len(mine):
            local = self.embedder.embed(local_samples)
        else:
            local = self._train.new_zeros((0, self._train.shape[1]))
        embedding = clock.lap()
        synthetic = gather_rows(pl_module, local)  # waits for the slowest rank's sampling
        gathering = clock.lap()
        report = detect_copies(self._train, self._val, synthetic, percentile=self.percentile)
        embed_detect = embedding + clock.lap()
        paired = len(local_samples) - len(local_samples) % 2
        pair_scores = gather_rows(pl_module, ms_ssim_diversity(local_samples[0:paired:2], local_samples[1:paired:2]))
        row = {
            "check": check_index,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            **report.scalars(),
            "fd": frechet_distance(synthetic, self._val) if min(len(synthetic), len(self._val)) >= 2 else None,
            "ms_ssim": float(pair_scores.double().mean()) if len(pair_scores) else None,
        }
        # What a check costs this rank, in seconds (the CSV shows it; bench/callback_overhead.py reads it).
        row |= {
            "seconds_sampling": sampling,
            "seconds_gather": gathering,
            "seconds_embed_detect": round(embed_detect, 4),
            "seconds_quality": clock.lap(),
        }
        self.history.append(row)
        for logger in trainer.loggers:
            logger.log_metrics(self._scalars(row), step=trainer.global_step)
        shown = copy_order(report)[:MAX_PAIRS] if self.log_images else []
        copies = self._gather_samples(pl_module, local_samples, mine, shown) if self.log_images else {}
        # trainer.log_dir is a broadcast: every rank must ask. Without a logger, no files.
        log_dir = Path(trainer.log_dir) if trainer.loggers else None
        if not trainer.is_global_zero:
            return
        if log_dir is not None:
            self._write_history(log_dir)
            self._log_histograms(trainer, report)
        if self.log_images:
            self._log_copy_pairs(trainer, report, shown, copies)
        if self.output_dir is not None:
            self._write_report(trainer, report, row, n_samples, copies)

    def _gather_samples(
        self, pl_module: LightningModule, local_samples: torch.Tensor, mine: range, indices: list[int]
    ) -> dict[int, torch.Tensor]:
        """Synthetic images `indices` (global), from whichever rank drew them, on every rank."""
        held = [i for i in sorted(indices) if i in mine]
        local = local_samples[[i - mine.start for i in held]] if held else local_samples[:0]
        gathered = gather_rows(pl_module, local.contiguous())
        return dict(zip(sorted(indices), gathered.cpu(), strict=True))

    def _training_image(self, trainer: Trainer, index: int) -> torch.Tensor:
        return trainer.datamodule.reference_dataloader("train").dataset[index]["image"]

    # --- outputs -----------------------------------------------------------------------

    def _log_histograms(self, trainer: Trainer, report: Any) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("memorization/rho_nn_val", report.nn_val_corr.cpu(), trainer.global_step)
                logger.experiment.add_histogram("memorization/rho_nn_syn", report.nn_syn_corr.cpu(), trainer.global_step)

    def _log_copy_pairs(self, trainer: Trainer, report: Any, shown: list[int], copies: dict[int, torch.Tensor]) -> None:
        if not shown:
            return
        pairs = []
        for j in shown:
            train = torch.from_numpy(viewable(self._training_image(trainer, int(report.nn_train_index[j]))))
            pairs.append(torch.cat([train, torch.from_numpy(viewable(copies[j]))], dim=1).clamp(0, 1))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                images = torch.stack(pairs)[:, None]  # [pairs, 1, H, 2W]: training image | synthetic copy
                logger.experiment.add_images("memorization/copies", images, trainer.global_step, dataformats="NCHW")

    def _write_report(
        self, trainer: Trainer, report: Any, row: dict[str, Any], n_samples: int, copies: dict[int, torch.Tensor]
    ) -> None:
        check = row["check"]
        summary = {
            "n_val": len(self._val),
            **{key: row[key] for key in ("check", "epoch", "step", "fd", "ms_ssim")},
        }
        with staged_output(self.output_dir / f"check_{check:03d}", "output_dir", overwrite=True) as folder:
            write_report(
                folder,
                report,
                trainer.datamodule.train_ids,
                [f"check{check:03d}-sample{i:06d}" for i in range(n_samples)],
                summary,
                train_image=(lambda i: self._training_image(trainer, i)) if self.log_images else None,
                syn_image=copies.__getitem__ if self.log_images else None,
                max_pairs=MAX_PAIRS,
            )

    def _write_history(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "memorization_history.csv").open("w", newline="") as handle:
            columns = dict.fromkeys(key for row in self.history for key in row)  # rows resumed from older runs may lack some
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(self.history)

    # --- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
