"""Memorization as a training metric: sample the LDM every few epochs and count copies of training patients.

Lightning glue around `memorization/` (Dar et al., arXiv 2402.01054, Algorithm 1). The
reference embeddings (training and validation images) are computed once per fit; each check
streams the new synthetic images through `memorization.stream.embed_stream` chunk by chunk,
so its memory does not grow with `n_samples`. Every rank computes the same report from
gathered tensors, so N_mem is the same on 1 or N processes. A check leaves every random
stream as it found it: training with and without the callback ends with the same weights.
"""

from __future__ import annotations

import datetime
import inspect
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.transforms import variation_batches, variation_transform
from errors import InputError
from lightning_modules.base import MemwatchModule
from lightning_modules.plugins import embedder_name, load_embedder
from memorization import detect_copies, frechet_distance
from memorization.chance import (
    ChanceLevel,
    DetectorCheck,
    chance_level,
    check_patients,
    detector_check,
    held_out_exceedances,
    positive_rows,
    weak_detector_warning,
)
from memorization.detect import DEFAULT_MARGIN, DEFAULT_RULE, CopyReport, check_rule, nearest_correlation
from memorization.distributed import block_shard, distributed, fail_together, gather_rows
from memorization.embedders import probe_generator
from memorization.history import write_history
from memorization.report import copy_order, staged_output, viewable, write_report
from memorization.stats import CI_METHOD, headline, logged_scalars
from memorization.stream import (
    EmbeddedStream,
    Progress,
    Stopwatch,
    blocks,
    dataset_blocks,
    deterministic_kernels,
    embed_stream,
    rng_preserved,
)

MAX_PAIRS = 8  # copy pairs shown per check (log_images, output_dir)
EMBEDDER_OPTION = "--memorization.embedder_ckpt"  # how cli.py sets embedder_ckpt, named in errors
# One TensorBoard page (the CUSTOM SCALARS tab) with memorization next to the quality metrics
# that do not see it (the paper's over-training finding) and the loss.
TENSORBOARD_LAYOUT = {
    "memwatch": {
        "memorized training samples (N_mem) and copies (N_copies)": [
            "Multiline",
            ["memorization/n_mem", "memorization/n_copies"],
        ],
        "fraction memorized and fraction of copies": [
            "Multiline",
            ["memorization/frac_mem", "memorization/frac_copies"],
        ],
        "fraction of training patients memorized, 95% interval": [
            "Margin",
            [
                "memorization/frac_mem_patients",
                "memorization/frac_mem_patients_low",
                "memorization/frac_mem_patients_high",
            ],
        ],
        "fraction memorized above chance (excess) and chance level": [
            "Multiline",
            ["memorization/excess_frac_mem", "memorization/null_frac_mem", "memorization/frac_mem"],
        ],
        "Fréchet distance in embedder space (synthetic vs validation)": ["Multiline", ["memorization/fd"]],
        "MS-SSIM between synthetic samples (lower: more diverse)": ["Multiline", ["memorization/ms_ssim"]],
        "threshold τ": ["Multiline", ["memorization/tau"]],
        "cost: a check's seconds, and its share of the training time since the previous check": [
            "Multiline",
            ["memorization/check_seconds", "memorization/overhead"],
        ],
        "loss": ["Multiline", ["train/loss", "val/loss"]],
    }
}


class MemorizationCallback(Callback):
    """Every `every_n_epochs` epochs: sample the generator, embed, count copies, log `memorization/*`.

    A check runs at the end of every epoch `e` with `(e + 1) % every_n_epochs == 0`, the epochs
    at which Lightning validates and saves checkpoints with the same period: at the end of that
    epoch's validation when there is one (before EarlyStopping and ModelCheckpoint read it),
    otherwise at the end of the training epoch. A checkpoint saved then carries the check's
    history row.

    Args:
        embedder_ckpt: checkpoint of a trained `SimCLRModule` (trained on the training images).
        embedder: any `memorization.embedders.Embedder`: `pixel`, or a `{class_path, init_args}`
            mapping (`memorization.embedders.TorchScriptEmbedder`, ...); when given, it replaces
            `embedder_ckpt`.
        every_n_epochs: epochs between checks.
        check_at_start: also check at the end of the first epoch (a baseline near chance level,
            and a value for EarlyStopping from the start); off by default, since at the paper's
            scale a check costs 15–30 minutes.
        n_samples: synthetic images per check; default the training-set size (the paper's N_syn = N_train).
        num_inference_steps: DDIM steps per sample.
        sample_batch_size: images per sampling (UNet) and embedding pass; a check holds O(this)
            images. Samples and reference images are drawn in fixed blocks of this many, aligned to
            global indices, and ranks take whole blocks: every image is computed in the same batch
            on any number of GPUs, so the counts are the same bitwise.
        decode_batch_size: latents decoded to images at a time (default: `sample_batch_size`); in 3D
            the decoder's full-resolution activations limit the batch, not the UNet's. Passed to the
            generator's `sample` (memwatch's diffusion modules take it).
        sampler_graphs: replay the sampling step's UNet forward as a CUDA graph (memwatch's diffusion
            modules; a no-op with one notice on a CPU).
        max_overhead: warn when a check takes more than this share of the training time since the
            previous check (`memorization/overhead`, logged with `memorization/check_seconds`).
        percentile: τ is this percentile of the training→validation nearest-neighbour correlations.
        rule: the copy rule (`memorization.detect.RULES`): `paper`, a copy correlates `≥ τ` with a training
            image; `distinct`, also clearly nearer to one training patient than to any other
            (`d1 ≤ margin · d2`). Counts, chance level and self-check all follow it; every history row and
            summary names it.
        margin: the `distinct` rule's margin, in (0, 1] (1 accepts every copy the paper's rule does).
        seed: sample `i` of check `k` is seeded by `(seed, k, i)`.
        log_images: also log the most similar copy pairs (training image | synthetic copy) to
            TensorBoard, and put `copies.png` in `output_dir`. Off by default: patient pixels
            leave the dataset only when asked.
        output_dir: write the audit files (`summary.json`, `pairs.csv`, `train_nn.csv`,
            `histogram.png`, with `log_images` also `copies.png`) of every check to
            `output_dir/check_NNN/`. Checked for writing on every rank at start-up.
        detector_positives: training images whose variations the detector's self-check
            embeds once per fit (evenly spaced; all when fewer); 0 skips the self-check.
        variation: strengths of the self-check's variation (`rotation_degrees`,
            `contrast_gamma`, `noise_std` of `datamodules.transforms.variation_transform`).
        progress_seconds: while embedding the reference images and during each check, a line
            on rank 0 every this many seconds (count, elapsed, time left); `None` for none.

    After every check within the limit of each EarlyStopping on `memorization/*` that has a
    `divergence_threshold` (the value that would stop training, `≤` it in mode `min`), the model
    is saved as `last_safe.ckpt` beside `last.ckpt`: the latest model that memorized no more than
    allowed, the one to share when EarlyStopping fires. Without such a threshold none is saved.

    Every check reports per image and per patient (a patient is memorized when any of their
    images is), with 95% Clopper-Pearson intervals (`memorization/<fraction>_low/_high`), and
    against the chance level of a generator that copies nobody (`memorization/null_*`,
    `memorization/excess_*`; `memorization.chance`), estimated once per fit from the held-out
    images. The self-check (`memorization/detector_sensitivity`, `_specificity`) runs once per
    fit and warns when the embedder flags fewer than 90% of varied training images.

    Besides the counts it logs two quality metrics that, in the paper, do not reveal
    memorization: `memorization/fd`, the Fréchet distance between synthetic and validation
    embeddings, and `memorization/ms_ssim`, the mean MS-SSIM of sample pairs `(2k, 2k + 1)`.
    Sampling and embedding run under the trainer's precision (bf16 autocast under
    `bf16-mixed`). A failure on any rank during a check stops every rank at once.
    """

    def __init__(
        self,
        embedder_ckpt: str | None = None,
        every_n_epochs: int = 1,
        check_at_start: bool = False,
        n_samples: int | None = None,
        num_inference_steps: int = 50,
        sample_batch_size: int = 16,
        percentile: float = 95.0,
        seed: int = 0,
        log_images: bool = False,
        output_dir: str | None = None,
        detector_positives: int = 1000,
        variation: dict[str, Any] | None = None,
        progress_seconds: float | None = 30.0,
        embedder: str | dict[str, Any] | None = None,
        decode_batch_size: int | None = None,
        sampler_graphs: bool = False,
        max_overhead: float = 0.25,
        rule: str = DEFAULT_RULE,
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        super().__init__()
        self.rule, self.margin = check_rule(rule, margin, "--memorization.rule", "--memorization.margin")
        if detector_positives < 0:
            raise InputError(
                f"detector_positives={detector_positives} must be at least 0 (0 skips the self-check)"
            )
        if every_n_epochs < 1:
            raise InputError(f"every_n_epochs={every_n_epochs} must be at least 1")
        if n_samples is not None and n_samples < 1:
            raise InputError(f"n_samples={n_samples} must be at least 1 (or null for the training-set size)")
        if sample_batch_size < 1:
            raise InputError(f"--memorization.sample_batch_size={sample_batch_size} must be at least 1")
        if decode_batch_size is not None and decode_batch_size < 1:
            raise InputError(
                f"--memorization.decode_batch_size={decode_batch_size} must be at least 1 (or null for sample_batch_size)"
            )
        if not 0.0 < max_overhead <= 10.0:
            raise InputError(f"--memorization.max_overhead={max_overhead} must lie in (0, 10], e.g. 0.25")
        if not 0.0 < percentile < 100.0:
            raise InputError(f"percentile={percentile} must lie in (0, 100), e.g. 95")
        if embedder_ckpt is None and embedder is None:
            raise InputError(
                "MemorizationCallback needs its embedder: embedder_ckpt (a SimCLR checkpoint, "
                f"{EMBEDDER_OPTION} PATH) or embedder (pixel, or a class_path/init_args mapping, "
                "--memorization.embedder)"
            )
        self.embedder_ckpt = embedder_name(embedder) if embedder is not None else str(embedder_ckpt)
        if embedder is not None:
            self.embedder = load_embedder(embedder, "memorization.embedder")
        else:
            self.embedder = load_embedder(str(embedder_ckpt), EMBEDDER_OPTION.removeprefix("--"))
        self.every_n_epochs = every_n_epochs
        self.check_at_start = check_at_start
        self.n_samples = n_samples
        self.num_inference_steps = num_inference_steps
        self.sample_batch_size = sample_batch_size
        self.decode_batch_size = decode_batch_size
        self.sampler_graphs = sampler_graphs
        self.max_overhead = max_overhead
        self._training_since: float | None = None  # when training resumed after the previous check
        self.percentile = percentile
        self.seed = seed
        self.log_images = log_images
        self.output_dir = Path(output_dir) if output_dir else None
        self.detector_positives = detector_positives
        self.variation = dict(variation or {})
        self.progress_seconds = progress_seconds
        self._safe_to_save: str | None = None  # why the check just run is within its limits
        try:
            self._variation = variation_transform(self.embedder.spatial_dims, **self.variation)
        except TypeError as error:
            raise InputError(
                f"variation={self.variation} ({error}): use rotation_degrees, contrast_gamma and noise_std"
            ) from None
        self.history: list[dict[str, Any]] = []
        self._train: torch.Tensor | None = None
        self._val: torch.Tensor | None = None
        self._train_patients: list[str] = []
        self._chance: ChanceLevel | None = None
        self.detector: DetectorCheck | None = None
        self.reference_embeddings_computed = 0  # per fit; for the overhead benchmark and tests

    # --- start-up checks ---------------------------------------------------------------

    def check_data(self, datamodule: LightningDataModule) -> None:
        """Raise `InputError` if the embedder was trained on images of another size or dimensionality."""
        size = getattr(datamodule, "spatial_size", None)
        trained_on = self.embedder.image_spatial_size
        if size is not None and len(size) != self.embedder.spatial_dims:
            raise InputError(
                f"the embedder takes {self.embedder.spatial_dims}D images but the data has spatial_size={list(size)}: "
                "pass an embedder of the data's dimensionality"
            )
        if size is not None and trained_on is not None and tuple(size) != tuple(trained_on):
            raise InputError(
                f"the embedder was trained on images of spatial_size={list(trained_on)} but the data has "
                f"{list(size)}: train the embedder on this data (python cli.py fit --config configs/<dataset>_simclr.yaml)"
            )
        if hasattr(datamodule, "train_patients"):
            check_patients(
                self.embedder.training_patients, datamodule.train_patients, datamodule.val_patients, self.percentile,
                "memorization.embedder_ckpt", EMBEDDER_OPTION,
            )  # fmt: skip

    def check_trainer(self, trainer: Trainer) -> None:
        """Raise `InputError` for an EarlyStopping on `memorization/*` that would read an old check or none."""
        for stopper in trainer.callbacks:
            if isinstance(stopper, EarlyStopping) and stopper.monitor.startswith("memorization/"):
                problem = stale_early_stopping(stopper, trainer, self.every_n_epochs, self.check_at_start)
                if problem:
                    raise InputError(problem)

    def check_sampler_options(self, generator: LightningModule, device: torch.device) -> None:
        """Raise `InputError` for a sampler option the generator cannot take; a notice where it does nothing."""
        if self.decode_batch_size is not None and not accepts_keyword(generator.sample, "decode_batch_size"):
            raise InputError(
                f"--memorization.decode_batch_size: {type(generator).__name__}.sample takes no decode_batch_size: "
                "leave it unset, or add the keyword to sample"
            )
        if self.sampler_graphs and not callable(getattr(generator, "sampler_graphs", None)):
            raise InputError(
                f"--memorization.sampler_graphs: {type(generator).__name__} has no sampler_graphs() to capture its "
                "sampling step (memwatch's diffusion modules have one): set --memorization.sampler_graphs false"
            )
        if self.sampler_graphs and device.type != "cuda":
            rank_zero_info(
                "memorization.sampler_graphs: CUDA graphs need a GPU; on this CPU sampling runs as without"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "sample", None)):
            raise InputError(
                f"MemorizationCallback needs a model with sample(); {type(pl_module).__name__} has none: implement "
                "sample(n, seed, num_inference_steps=..., sample_batch_size=..., start_index=...) as "
                "memorization.embedders.Generator describes, returning [n, C, *spatial] images in [0, 1]"
            )
        self.check_sampler_options(pl_module, trainer.strategy.root_device)
        if trainer.datamodule is not None:
            self.check_data(trainer.datamodule)
        self.check_trainer(trainer)
        with fail_together(trainer.strategy.root_device, "checking output_dir"):
            if self.output_dir is not None:
                check_writable(self.output_dir)

    # --- reference embeddings, once per fit --------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with (
            rng_preserved(pl_module.device),
            fail_together(pl_module.device, "checking the generator's samples"),
        ):
            self._check_samples(trainer, pl_module)
            if self.sampler_graphs and pl_module.device.type == "cuda":
                probe = getattr(pl_module, "probe_sampler_graphs", None)
                if probe is not None:
                    with trainer.precision_plugin.forward_context():
                        probe(self.sample_batch_size)
        with (
            rng_preserved(pl_module.device),
            deterministic_kernels(),
            fail_together(pl_module.device, "embedding the reference images"),
        ):
            self.embedder.to(pl_module.device)
            self._train = self._embed_reference(trainer, pl_module, "train")
            self._val = self._embed_reference(trainer, pl_module, "val")
            datamodule = trainer.datamodule
            self._train_patients = list(datamodule.train_patients)
            exceedances = held_out_exceedances(
                self._train, self._val, self.percentile, self._train_patients,
                rule=self.rule, margin=self.margin, val_patients=datamodule.val_patients,
            )  # fmt: skip
            self._chance = chance_level(exceedances, self.n_samples or len(self._train))
            if self.detector_positives:
                varied = self._embed_variations(trainer, pl_module)
                self.detector = detector_check(varied, self._train, exceedances)
        self.reference_embeddings_computed += 1
        if self.detector is not None:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {
                        f"memorization/detector_{key}": getattr(self.detector, key)
                        for key in ("sensitivity", "specificity")
                    },
                    step=trainer.global_step,
                )
            weak = weak_detector_warning(self.detector.sensitivity, self.detector.n_positive, EMBEDDER_OPTION)
            if weak:
                rank_zero_warn(weak)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars(TENSORBOARD_LAYOUT)

    def _check_samples(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse, before training, a user's generator whose samples the embedder cannot take (one cheap draw).

        memwatch's own generators are left out: their samples are tested to fit, and the LDM cannot
        sample before its first training batch has set the latent scale.
        """
        if isinstance(pl_module, MemwatchModule):
            return
        size = getattr(trainer.datamodule, "spatial_size", None)
        probe_generator(pl_module, (self.seed, 0), self.embedder.in_channels, size, type(pl_module).__name__)

    def _embed_reference(self, trainer: Trainer, pl_module: LightningModule, split: str) -> torch.Tensor:
        datamodule = trainer.datamodule
        dataset = datamodule.reference_dataset(split)
        mine = block_shard(len(dataset), self.sample_batch_size, trainer.global_rank, trainer.world_size)
        images = dataset_blocks(dataset, mine, self.sample_batch_size, getattr(datamodule, "num_workers", 0))
        local = embed_stream(
            (block.to(pl_module.device) for block in images),
            self.embedder.embed,
            autocast=trainer.precision_plugin.forward_context,
            device=pl_module.device,
            progress=self._progress(trainer, f"memorization: embedding the {split} images", len(mine)),
        ).embeddings
        return gather_rows(self._as_embeddings(local, pl_module.device))

    def _progress(self, trainer: Trainer, label: str, total: int) -> Progress | None:
        """Progress lines on rank 0 about its share (all ranks share the work evenly)."""
        if self.progress_seconds is None or not trainer.is_global_zero:
            return None
        share = f" (rank 0's share of {trainer.world_size})" if trainer.world_size > 1 else ""
        return Progress(label + share, total, rank_zero_info, self.progress_seconds)

    def _embed_variations(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        """Embeddings of variations of evenly spaced training images (the self-check's positives), on every rank."""
        dataset = trainer.datamodule.reference_dataset("train")
        rows = positive_rows(len(dataset), self.detector_positives)
        mine = block_shard(len(rows), self.sample_batch_size, trainer.global_rank, trainer.world_size)

        def vary_block(block: range) -> torch.Tensor:
            padded = [rows[min(k, len(rows) - 1)] for k in block]  # the last block repeats its last row
            return next(
                variation_batches(dataset, padded, len(block), self.seed, self._variation, block.start)
            )

        local = embed_stream(
            (images.to(pl_module.device) for images in blocks(vary_block, mine, self.sample_batch_size)),
            self.embedder.embed,
            autocast=trainer.precision_plugin.forward_context,
            device=pl_module.device,
        ).embeddings
        return gather_rows(self._as_embeddings(local, pl_module.device))

    def _as_embeddings(self, local: torch.Tensor, device: torch.device) -> torch.Tensor:
        # An empty shard (more ranks than images) still has the embedding length, for the gather.
        return local.to(device) if len(local) else torch.zeros(0, self.embedder.embedding_dim, device=device)

    # --- when to check -----------------------------------------------------------------

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only the validation that ends a training epoch; before EarlyStopping and ModelCheckpoint read it.
        at_epoch_end = (
            trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and trainer.is_last_batch
        )
        if at_epoch_end and self._due(trainer):
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due(trainer):
            self._check(trainer, pl_module)
        # Saved here, never during validation: there an averaging callback's weights are swapped in.
        if self._safe_to_save is not None:
            self._save_last_safe(trainer, self._safe_to_save)
            self._safe_to_save = None

    def _due(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch
        scheduled = (epoch + 1) % self.every_n_epochs == 0 or (self.check_at_start and epoch == 0)
        return scheduled and not self._already_checked(trainer)

    def _already_checked(self, trainer: Trainer) -> bool:
        return bool(self.history) and self.history[-1]["step"] == trainer.global_step

    # --- checks ------------------------------------------------------------------------

    def _generator(self, trainer: Trainer, pl_module: LightningModule) -> LightningModule:
        """The EMA copy of the model where a weight-averaging callback keeps one, else the model."""
        for callback in trainer.callbacks:
            averaged = (
                getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
            )
            if averaged is not None and averaged.n_averaged > 0:
                # During validation the averaging callback swaps its weights into the model until its own
                # on_validation_epoch_end; listed after this callback, it has not swapped them back yet.
                if trainer.validating and trainer.callbacks.index(callback) > trainer.callbacks.index(self):
                    return pl_module
                # memwatch's modules learn their size from the data; a user's generator may not have one
                if hasattr(pl_module, "image_spatial_size"):
                    averaged.module.image_spatial_size = pl_module.image_spatial_size
                return averaged.module
        return pl_module

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with rng_preserved(pl_module.device), deterministic_kernels():
            self._check_without_randomness(trainer, pl_module)

    def _sample_and_embed(
        self, trainer: Trainer, generator: LightningModule, check_index: int, where: str
    ) -> EmbeddedStream:
        """This rank's whole blocks of the check's samples, drawn and embedded one block at a time."""
        device = generator.device
        n_samples = self.n_samples or len(self._train)
        block_size = min(self.sample_batch_size, n_samples)  # a larger block would only sample padding
        mine = block_shard(n_samples, block_size, trainer.global_rank, trainer.world_size)
        options = {} if self.decode_batch_size is None else {"decode_batch_size": self.decode_batch_size}

        def draw(block: range) -> torch.Tensor:
            return generator.sample(
                len(block), seed=(self.seed, check_index), num_inference_steps=self.num_inference_steps,
                sample_batch_size=block_size, start_index=block.start, **options,
            )  # fmt: skip

        graphs = generator.sampler_graphs() if self.sampler_graphs else nullcontext()
        with (
            fail_together(device, "sampling"),
            graphs,
            out_of_memory_named(self.sample_batch_size, self.decode_batch_size),
        ):
            return embed_stream(
                blocks(draw, mine, block_size),
                self.embedder.embed,
                first_index=mine.start,
                score_pairs=True,
                # twice the pairs shown: the running ranking and detect_copies may round near-ties differently
                keep=2 * MAX_PAIRS if self.log_images else 0,
                rank_by=lambda embeddings: nearest_correlation(embeddings, self._train),
                autocast=trainer.precision_plugin.forward_context,
                require_finite=f"training failed at {where}",
                device=device,
                progress=self._progress(trainer, f"memorization {where}: samples", len(mine)),
            )

    def _check_without_randomness(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        started = Stopwatch(device)
        training_seconds = started.last - self._training_since if self._training_since is not None else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        check_index = len(self.history)
        where = f"check {check_index} (epoch {trainer.current_epoch}, step {trainer.global_step})"
        n_samples = self.n_samples or len(self._train)
        local = self._sample_and_embed(trainer, self._generator(trainer, pl_module), check_index, where)
        clock = Stopwatch(device)
        synthetic = gather_rows(self._as_embeddings(local.embeddings, device))  # waits for the slowest rank
        pair_scores = gather_rows(local.pair_scores.to(device))
        gathering = clock.lap()
        report = detect_copies(
            self._train, self._val, synthetic, percentile=self.percentile, rule=self.rule, margin=self.margin,
            train_patients=self._train_patients,
        )
        detecting = clock.lap()
        row = {
            "check": check_index,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "rule": report.rule,
            "margin": report.margin,
            **headline(report, self._train_patients, self._chance),
            "fd": frechet_distance(synthetic, self._val)
            if min(len(synthetic), len(self._val)) >= 2
            else None,
            "ms_ssim": float(pair_scores.double().mean()) if len(pair_scores) else None,
        }
        # What a check costs this rank, in seconds (the CSV shows it; bench/callback_overhead.py reads it).
        row |= {
            "seconds_sampling": round(local.seconds["images"], 4),
            "seconds_gather": round(gathering, 4),
            "seconds_embed_detect": round(local.seconds["embed"] + detecting, 4),
            "seconds_quality": round(local.seconds["pairs"] + clock.lap(), 4),
        }
        row |= self._cost(started.lap(), training_seconds, device)
        self.history.append(row)
        self._warn_if_costly(row, device)
        self._safe_to_save = self._within_limits(trainer, row)
        for key, value in self._scalars(row).items():
            # Into callback_metrics, where EarlyStopping and ModelCheckpoint read it; loggers get it below.
            pl_module.log(key, value, logger=False, sync_dist=False)
        for logger in trainer.loggers:
            logger.log_metrics(self._scalars(row), step=trainer.global_step)
        copies = self._gather_shown(trainer, report, local.kept, device) if self.log_images else {}
        # trainer.log_dir is a broadcast: every rank must ask. Without a logger, no files.
        log_dir = Path(trainer.log_dir) if trainer.loggers else None
        with fail_together(device, f"writing the results of {where}"):
            if trainer.is_global_zero:
                if log_dir is not None:
                    write_history(log_dir, self.history)
                    self._log_histograms(trainer, report)
                if self.log_images:
                    self._log_copy_pairs(trainer, report, copies)
                if self.output_dir is not None:
                    self._write_report(trainer, report, row, n_samples, copies)
        self._training_since = Stopwatch(device).last

    @staticmethod
    def _cost(
        check_seconds: float, training_seconds: float | None, device: torch.device
    ) -> dict[str, float | None]:
        """`check_seconds` and `overhead` (÷ the training seconds since the previous check), the slowest rank's."""
        seconds = torch.tensor(
            [check_seconds, -1.0 if training_seconds is None else training_seconds], device=device
        )
        if distributed():
            torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
        check, training = seconds.tolist()
        return {
            "check_seconds": round(check, 3),
            "overhead": round(check / training, 4) if training > 0 else None,
        }

    def _warn_if_costly(self, row: dict[str, Any], device: torch.device) -> None:
        if row["overhead"] is not None and row["overhead"] > self.max_overhead:
            rank_zero_warn(
                f"memorization check {row['check']} took {row['check_seconds']:.1f} s, {row['overhead']:.2f} of the "
                f"training time since the previous check (max_overhead {self.max_overhead:g}): check less often "
                "(--memorization.every_n_epochs) or fewer samples (--memorization.n_samples); on a GPU sample larger "
                "blocks (--memorization.sample_batch_size, with --memorization.decode_batch_size to keep decoding "
                "within memory) and --memorization.sampler_graphs true"
            )
        if device.type == "cuda":
            peak, total = (
                torch.cuda.max_memory_allocated(device),
                torch.cuda.get_device_properties(device).total_memory,
            )
            if peak > 0.9 * total:
                rank_zero_warn(
                    f"memorization check {row['check']} peaked at {peak / 2**30:.1f} of {total / 2**30:.0f} GiB: "
                    f"a larger block would not fit; lower --memorization.decode_batch_size (now "
                    f"{self.decode_batch_size or self.sample_batch_size}) before --memorization.sample_batch_size"
                )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._training_since = Stopwatch(pl_module.device).last

    def _within_limits(self, trainer: Trainer, row: dict[str, Any]) -> str | None:
        """Why the check in `row` stays within every memorization EarlyStopping's divergence_threshold,
        or `None` when it does not (or no such threshold is set)."""
        scalars, reasons = self._scalars(row), []
        for stopper in trainer.callbacks:
            if not (isinstance(stopper, EarlyStopping) and stopper.monitor.startswith("memorization/")):
                continue
            if stopper.divergence_threshold is None:
                continue
            value = scalars.get(stopper.monitor)
            if value is None or not math.isfinite(value):
                return None
            below = (
                value <= stopper.divergence_threshold
                if stopper.mode == "min"
                else value >= stopper.divergence_threshold
            )
            if not below:
                return None
            reasons.append(
                f"{stopper.monitor} = {value:.4g} {'≤' if stopper.mode == 'min' else '≥'} {stopper.divergence_threshold:g}"
            )
        return ", ".join(reasons) or None

    def _save_last_safe(self, trainer: Trainer, reason: str) -> None:
        """`last_safe.ckpt` beside `last.ckpt` (every rank takes part, as in any checkpoint save)."""
        checkpoint = trainer.checkpoint_callback
        folder = (
            getattr(checkpoint, "dirpath", None)
            or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        )
        path = Path(folder) / "last_safe.ckpt"
        trainer.save_checkpoint(path)
        row = self.history[-1]
        rank_zero_info(
            f"memorization check {row['check']} (step {row['step']}) within the limit ({reason}): saved {path}"
        )

    @staticmethod
    def _scalars(row: dict[str, Any]) -> dict[str, float]:
        # fd and ms_ssim are None when there are too few samples to compute them.
        skip = {
            "check",
            "epoch",
            "step",
            "n_train",
            "n_train_patients",
            "n_syn",
            "rule",
            "margin",
        }  # check_seconds, overhead: logged
        return logged_scalars(
            {k: v for k, v in row.items() if k not in skip and not k.startswith("seconds_")}
        )

    def _gather_shown(
        self, trainer: Trainer, report: CopyReport, kept: dict[int, torch.Tensor], device: torch.device
    ) -> dict[int, torch.Tensor]:
        """The most similar copies (at most `MAX_PAIRS`) among the images the ranks kept, in that order, on every rank."""
        held = gather_rows(torch.tensor(sorted(kept), dtype=torch.long, device=device))
        shown = [j for j in copy_order(report) if j in set(held.tolist())][:MAX_PAIRS]
        mine = [j for j in shown if j in kept]
        shape = (self.embedder.in_channels, *trainer.datamodule.spatial_size)
        local = torch.stack([kept[j] for j in mine]) if mine else torch.zeros(0, *shape)
        images = gather_rows(local.to(device))
        owners = gather_rows(torch.tensor(mine, dtype=torch.long, device=device))
        by_index = dict(zip(owners.tolist(), images.cpu(), strict=True))
        return {j: by_index[j] for j in shown}

    def _training_image(self, trainer: Trainer, index: int) -> torch.Tensor:
        # From the dataset itself: a new DataLoader would reseed torch's global generator.
        return trainer.datamodule.reference_dataset("train")[index]["image"]

    # --- outputs -----------------------------------------------------------------------

    def _log_histograms(self, trainer: Trainer, report: CopyReport) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(
                    "memorization/rho_nn_val", report.nn_val_corr.cpu(), trainer.global_step
                )
                logger.experiment.add_histogram(
                    "memorization/rho_nn_syn", report.nn_syn_corr.cpu(), trainer.global_step
                )

    def _log_copy_pairs(self, trainer: Trainer, report: CopyReport, copies: dict[int, torch.Tensor]) -> None:
        if not copies:
            return
        pairs = []
        for j, copy in copies.items():
            train = torch.from_numpy(viewable(self._training_image(trainer, int(report.nn_train_index[j]))))
            pairs.append(torch.cat([train, torch.from_numpy(viewable(copy))], dim=1).clamp(0, 1))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                images = torch.stack(pairs)[:, None]  # [pairs, 1, H, 2W]: training image | synthetic copy
                logger.experiment.add_images(
                    "memorization/copies", images, trainer.global_step, dataformats="NCHW"
                )

    def _write_report(
        self,
        trainer: Trainer,
        report: CopyReport,
        row: dict[str, Any],
        n_samples: int,
        copies: dict[int, torch.Tensor],
    ) -> None:
        check = row["check"]
        summary = {
            "n_val": len(self._val),
            **{key: value for key, value in row.items() if not key.startswith("seconds_")},
            "ci_method": CI_METHOD,
            "null_method": self._chance.method if self._chance else None,
            "detector": self.detector.as_dict() if self.detector else None,
            "inputs": {
                "embedder_ckpt": self.embedder_ckpt, "n_samples": n_samples, "seed": self.seed,
                "num_inference_steps": self.num_inference_steps, "sample_batch_size": self.sample_batch_size,
            },
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
        with staged_output(self.output_dir / f"check_{check:03d}", "output_dir", overwrite=True) as folder:
            write_report(
                folder,
                report,
                trainer.datamodule.train_ids,
                [f"check{check:03d}-sample{i:06d}" for i in range(n_samples)],
                summary,
                train_image=(lambda i: self._training_image(trainer, i)) if self.log_images else None,
                syn_image=copies.__getitem__ if self.log_images else None,
                max_pairs=len(copies),
                train_patients=self._train_patients,
            )

    # --- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]


def check_writable(folder: Path) -> None:
    """Raise `InputError` unless this process can create files in `folder` (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".memwatch-write-test-"):
            pass
    except OSError as error:
        raise InputError(
            f"output_dir={folder} is not writable ({error.strerror or type(error).__name__}): choose a folder "
            "that every rank can write, or leave output_dir unset"
        ) from None


def stale_early_stopping(
    stopper: EarlyStopping, trainer: Trainer, every_n_epochs: int, check_at_start: bool = False
) -> str | None:
    """Why `stopper` (monitoring `memorization/*`) would not read the check that just ran, or `None` if it would.

    Checks end the epochs `e` with `(e + 1) % every_n_epochs == 0`, at validation end when that
    epoch validates. EarlyStopping reads at train epoch end (after every non-monitoring callback,
    whatever the list order) or at validation end; the latter is current only if every check
    epoch validates at its end.
    """
    name = f"EarlyStopping(monitor={stopper.monitor})"
    on_train_epoch_end = stopper._check_on_train_epoch_end
    if on_train_epoch_end is None:  # what EarlyStopping.setup will choose
        on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
    if not on_train_epoch_end:
        every_k = trainer.check_val_every_n_epoch
        validates_each_check = (
            trainer.limit_val_batches != 0
            and every_k is not None
            and trainer.val_check_interval == 1.0
            and every_n_epochs % every_k == 0
        )
        if not validates_each_check:
            return (
                f"{name} reads at validation end (check_val_every_n_epoch={every_k}, "
                f"val_check_interval={trainer.val_check_interval}), but memorization checks run every "
                f"{every_n_epochs} epochs, so it would read an old check: set check_on_train_epoch_end: true "
                "in its init_args"
            )
        first_read = every_k - 1
    else:
        first_read = 0
    first_check = 0 if check_at_start else every_n_epochs - 1
    if stopper.strict and first_check > first_read:
        return (
            f"{name} with strict: true would stop the run at the end of epoch {first_read}, before the first "
            f"memorization check (end of epoch {first_check}): set strict: false in its init_args, or "
            "check_at_start: true in MemorizationCallback's"
        )
    return None


def accepts_keyword(method: Callable, name: str) -> bool:
    """Whether `method` takes the keyword `name` (named, or through `**kwargs`)."""
    parameters = inspect.signature(method).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@contextmanager
def out_of_memory_named(sample_batch_size: int, decode_batch_size: int | None) -> Iterator[None]:
    """A check that runs out of GPU memory is one line naming the options that size its blocks."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise InputError(
            f"a memorization check ran out of GPU memory with blocks of sample_batch_size={sample_batch_size} "
            f"(decode_batch_size={decode_batch_size or sample_batch_size}): lower --memorization.decode_batch_size "
            "first (decoding to full-size images takes the most), then --memorization.sample_batch_size"
        ) from None
