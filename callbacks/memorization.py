"""Memorization as a training metric: every few epochs, sample the generator and count copies of training patients.

Lightning glue around `memorization/` (Dar et al., arXiv 2402.01054, Algorithm 1): when to check,
what to collect from the ranks, where to log. The science is Lightning-free and shared with the
audit: the reference set (`memorization.reference`), the streams of images in fixed blocks
(`memorization.pipeline`), the numbers (`memorization.summary`) and the history
(`memorization.history`). Start-up checks live in `callbacks/startup_checks.py`, `last_safe.ckpt`
in `callbacks/last_safe.py`, the TensorBoard extras in `callbacks/tensorboard.py`, and what the
callback needs of the data (memwatch's DataModules or any LightningDataModule) in
`callbacks/reference_data.py`. Between checks, every `membership_every_n_epochs`, the cheaper membership
signal (`memorization.membership`): the generator's own scores of training versus held-out images.
Every rank computes the same report from gathered tensors, so N_mem
is the same on 1 or N processes; a check leaves every random stream as it found it.
"""

from __future__ import annotations

import datetime
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from memwatch.callbacks.check_cost import check_cost, cost_warnings
from memwatch.callbacks.last_safe import save_last_safe, within_limits
from memwatch.callbacks.reference_data import ReferenceData, reference_data
from memwatch.callbacks.startup_checks import (
    EMBEDDER_OPTION,
    check_early_stopping,
    check_embedder_fits,
    check_generator,
    check_membership_data,
    check_options,
    check_sampler_options,
    checked_variation,
    load_callback_embedder,
    memorization_stoppers,
    out_of_memory_named,
    warn_without_membership_scores,
)
from memwatch.callbacks.tensorboard import add_layout, log_copy_pairs, log_histograms
from memwatch.lightning_modules.base import MemwatchModule
from memwatch.lightning_private import averaged_model
from memwatch.memorization.chance import extrapolation_notice, weak_detector_warning
from memwatch.memorization.detect import DEFAULT_MARGIN, DEFAULT_RULE, check_rule, nearest_correlation
from memwatch.memorization.distributed import block_shard, fail_together, gather_kept
from memwatch.memorization.embedders import membership_scorer, probe_generator
from memwatch.memorization.history import MEMBERSHIP_HISTORY_FILE, PLACE_KEYS, TIMING_PREFIX, write_history
from memwatch.memorization.membership import AUC_METHOD, MembershipEvaluation
from memwatch.memorization.output_folders import check_output_folders, data_paths, staged_output
from memwatch.memorization.pipeline import (
    embed_dataset,
    embed_variations,
    gathered,
    sample_block_size,
    sample_blocks,
    score_membership,
)
from memwatch.memorization.reference import ReferenceSet
from memwatch.memorization.report import copy_order, write_report
from memwatch.memorization.stats import logged_scalars
from memwatch.memorization.stream import (
    EmbeddedStream,
    Progress,
    Stopwatch,
    deterministic_kernels,
    embed_stream,
    rng_preserved,
)
from memwatch.memorization.summary import check_numbers, quality_numbers, summary_numbers

MAX_PAIRS = 8  # copy pairs shown per check (log_images, output_dir)
MEMBERSHIP_KEY = "membership_"  # the membership signal's columns and scalars


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
        trust_modules: modules (with their submodules) whose classes `embedder` may name besides memwatch's
            own: importing a module runs its code, so any other class path is refused before it is imported.
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
        membership_every_n_epochs: epochs between evaluations of the membership signal (0: off): the
            generator's `membership_scores` of `membership_n_ref` training and held-out images (for
            memwatch's diffusion models minus the denoising loss at t = T/10 with noise seeded by each
            image's id; for the autoencoder minus the reconstruction error), one forward pass per image.
            Logs `memorization/membership_auc` (training vs held-out; Mann–Whitney, DeLong 95% interval
            `_low`/`_high`), `memorization/membership_tpr_at_5fpr` (training images above the held-out
            95th percentile) and `memorization/membership_auc_control` (two halves of the training
            images: the AUC without any membership), to the loggers and `membership_history.csv`. A
            model without `membership_scores` gets one warning and no signal.
        membership_n_ref: held-out images scored (evenly spaced; default all), and as many training images.

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
        membership_every_n_epochs: int = 1,
        membership_n_ref: int | None = None,
        trust_modules: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.rule, self.margin = check_rule(rule, margin, "--memorization.rule", "--memorization.margin")
        check_options(
            every_n_epochs=every_n_epochs, n_samples=n_samples, sample_batch_size=sample_batch_size,
            decode_batch_size=decode_batch_size, max_overhead=max_overhead, percentile=percentile,
            detector_positives=detector_positives, membership_every_n_epochs=membership_every_n_epochs,
            membership_n_ref=membership_n_ref,
        )  # fmt: skip
        self.embedder_ckpt, self.embedder = load_callback_embedder(embedder_ckpt, embedder, trust_modules or ())
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
        self.membership_every_n_epochs = membership_every_n_epochs
        self.membership_n_ref = membership_n_ref
        self._membership_period = 0  # membership_every_n_epochs where the model has membership_scores, else 0
        self.membership_history: list[dict[str, Any]] = []
        self.membership: MembershipEvaluation | None = None  # the latest evaluation, with its scores
        # this epoch's scalars, judged for last_safe.ckpt at its end
        self._epoch_scalars: dict[str, float] = {}
        self._variation = checked_variation(self.embedder.spatial_dims, self.variation)
        self.history: list[dict[str, Any]] = []
        self.data: ReferenceData | None = None
        self.reference: ReferenceSet | None = None
        self.reference_embeddings_computed = 0  # per fit; for the overhead benchmark and tests

    # --- start-up ----------------------------------------------------------------------

    def check_data(self, datamodule: Any) -> None:
        """Raise `InputError` if the embedder takes images of another size or dimensionality than the data's."""
        check_embedder_fits(
            self.embedder, *(getattr(datamodule, key, None) for key in ("spatial_size", "train_patients", "val_patients")),
            self.percentile,
        )  # fmt: skip

    def check_trainer(self, trainer: Trainer, generator: LightningModule | None = None) -> None:
        """Raise `InputError` for an EarlyStopping on `memorization/*` that would read an old evaluation or none
        (the membership signal's period is `generator`'s, when given, else the one `setup` found)."""
        period = self._membership_period if generator is None else self._membership_period_of(generator)
        check_early_stopping(trainer, self.every_n_epochs, self.check_at_start, period)

    def _membership_period_of(self, generator: LightningModule) -> int:
        return self.membership_every_n_epochs if membership_scorer(generator) is not None else 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_generator(pl_module)
        warn_without_membership_scores(pl_module, self.membership_every_n_epochs)
        self._membership_period = self._membership_period_of(pl_module)
        check_sampler_options(
            pl_module, trainer.strategy.root_device, self.decode_batch_size, self.sampler_graphs
        )
        self.data = reference_data(trainer.datamodule)
        self.check_data(self.data)
        if self._membership_period:
            check_membership_data(len(self.data.val_patients), self.membership_n_ref)
        self.check_trainer(trainer)
        with fail_together(trainer.strategy.root_device, "checking output_dir"):
            if self.output_dir is not None:
                checkpoint = [("embedder_ckpt", self.embedder_ckpt)] if Path(self.embedder_ckpt).is_file() else []
                inputs = [*data_paths(trainer.datamodule).items(), *checkpoint]
                check_output_folders({"output_dir": self.output_dir}, inputs, replaces=False)
        n_syn = self.n_samples or len(self.data.train_patients)
        n_val = len(self.data.val_patients)
        notice = extrapolation_notice(n_syn, n_val, f"--memorization.n_samples {n_val}")
        if stage == "fit" and notice:
            rank_zero_info(f"memorization: {notice}")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        with rng_preserved(device), fail_together(device, "checking the generator's samples"):
            # memwatch's own generators are tested to fit (and the LDM cannot sample before its first batch).
            if not isinstance(pl_module, MemwatchModule):
                probe_generator(
                    pl_module,
                    (self.seed, 0),
                    self.embedder.in_channels,
                    self.data.spatial_size,
                    type(pl_module).__name__,
                    self._sample_options(),
                )
            probe = getattr(pl_module, "probe_sampler_graphs", None)
            if self.sampler_graphs and device.type == "cuda" and probe is not None:
                with trainer.precision_plugin.forward_context():
                    probe(self.sample_batch_size)
        with (
            rng_preserved(device),
            deterministic_kernels(),
            fail_together(device, "embedding the reference images"),
        ):
            self.embedder.to(device)
            shared = {
                "device": device, "rank": trainer.global_rank, "world_size": trainer.world_size,
                "autocast": trainer.precision_plugin.forward_context,
            }  # fmt: skip
            train, val = (
                embed_dataset(
                    self.data.reference_dataset(split), self.embedder.embed, self.sample_batch_size,
                    self.embedder.embedding_dim, num_workers=getattr(self.data, "num_workers", 0),
                    progress=self._progress(trainer, f"memorization: embedding the {split} images"), **shared,
                ).embeddings
                for split in ("train", "val")
            )  # fmt: skip
            varied = None
            if self.detector_positives:
                varied = embed_variations(
                    self.data.reference_dataset("train"), self.detector_positives, self.embedder.embed,
                    self.sample_batch_size, self.embedder.embedding_dim, seed=self.seed, variation=self._variation,
                    **shared,
                )  # fmt: skip
            self.reference = ReferenceSet.build(
                train, val, self.data.train_patients, self.data.val_patients, percentile=self.percentile,
                rule=self.rule, margin=self.margin, varied=varied,
            )  # fmt: skip
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
            add_layout(trainer)

    @property
    def detector(self):
        """The detector's self-check of this fit (`memwatch.memorization.chance.DetectorCheck`), or `None`."""
        return self.reference.self_check if self.reference is not None else None

    def _progress(self, trainer: Trainer, label: str):
        """Progress lines on rank 0 about its share (all ranks share the work evenly)."""
        if self.progress_seconds is None or not trainer.is_global_zero:
            return None
        share = f" (rank 0's share of {trainer.world_size})" if trainer.world_size > 1 else ""
        return lambda total: Progress(label + share, total, rank_zero_info, self.progress_seconds)

    # --- when to check -----------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._training_since = Stopwatch(pl_module.device).last

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only the validation that ends a training epoch; before EarlyStopping and ModelCheckpoint read it.
        at_epoch_end = (
            trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and trainer.is_last_batch
        )
        if at_epoch_end:
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module)
        # Saved here, never during validation: there an averaging callback's weights are swapped in.
        if self._epoch_scalars:
            reason = within_limits(memorization_stoppers(trainer), self._epoch_scalars)
            if reason is not None:
                save_last_safe(trainer, reason)
            self._epoch_scalars = {}

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """What is due at the end of this epoch: the membership signal (cheap) first, then the check."""
        if self._membership_due(trainer):
            self._membership(trainer, pl_module)
        if self._due(trainer):
            self._check(trainer, pl_module)

    def _membership_due(self, trainer: Trainer) -> bool:
        if not self._membership_period or (trainer.current_epoch + 1) % self._membership_period:
            return False
        return not (self.membership_history and self.membership_history[-1]["step"] == trainer.global_step)

    def _due(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch
        scheduled = (epoch + 1) % self.every_n_epochs == 0 or (self.check_at_start and epoch == 0)
        already_checked = bool(self.history) and self.history[-1]["step"] == trainer.global_step
        return scheduled and not already_checked

    def _generator(self, trainer: Trainer, pl_module: LightningModule) -> LightningModule:
        """The EMA copy of the model where a weight-averaging callback keeps one, else the model."""
        for callback in trainer.callbacks:
            averaged = averaged_model(callback) if isinstance(callback, WeightAveraging) else None
            if averaged is not None and averaged.n_averaged > 0:
                # During validation the averaging callback swaps its weights into the model until its own
                # on_validation_epoch_end; listed after this callback, it has not swapped them back yet.
                if trainer.validating and trainer.callbacks.index(callback) > trainer.callbacks.index(self):
                    return pl_module
                if hasattr(
                    pl_module, "image_spatial_size"
                ):  # memwatch's modules learn their size from the data
                    averaged.module.image_spatial_size = pl_module.image_spatial_size
                return averaged.module
        return pl_module

    # --- the membership signal ---------------------------------------------------------

    def _membership(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        generator = self._generator(trainer, pl_module)
        started = Stopwatch(device)
        where = f"scoring membership (epoch {trainer.current_epoch}, step {trainer.global_step})"
        with rng_preserved(device), deterministic_kernels(), fail_together(device, where):
            evaluation = score_membership(
                self.data.reference_dataset("train"), self.data.reference_dataset("val"), generator.membership_scores,
                self.sample_batch_size, n_ref=self.membership_n_ref, seed=self.seed,
                option="--memorization.membership_n_ref", device=device, rank=trainer.global_rank,
                world_size=trainer.world_size, num_workers=getattr(self.data, "num_workers", 0),
                autocast=trainer.precision_plugin.forward_context,
            )  # fmt: skip
        numbers = evaluation.scalars() | {"membership_seconds": started.lap()}
        self.membership = evaluation
        self.membership_history.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, **numbers,
             "membership_above_control": evaluation.above_control, "membership_method": AUC_METHOD}
        )  # fmt: skip
        self._log({f"memorization/{key}": float(value) for key, value in numbers.items()}, trainer, pl_module)
        log_dir = Path(trainer.log_dir) if trainer.loggers else None  # a broadcast: every rank asks
        with fail_together(device, f"writing {MEMBERSHIP_HISTORY_FILE}"):
            if trainer.is_global_zero and log_dir is not None:
                write_history(log_dir, self.membership_history, MEMBERSHIP_HISTORY_FILE)

    def _log(self, scalars: dict[str, float], trainer: Trainer, pl_module: LightningModule) -> None:
        """Into callback_metrics (where EarlyStopping and ModelCheckpoint read them) and to every logger."""
        for key, value in scalars.items():
            pl_module.log(key, value, logger=False, sync_dist=False)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        self._epoch_scalars |= scalars

    def _membership_now(self, step: int) -> dict[str, Any]:
        """The membership columns evaluated at `step`, for the check's row (empty when none was)."""
        if not self.membership_history or self.membership_history[-1]["step"] != step:
            return {}
        return {k: v for k, v in self.membership_history[-1].items() if k.startswith(MEMBERSHIP_KEY)}

    # --- a check -----------------------------------------------------------------------

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with rng_preserved(pl_module.device), deterministic_kernels():
            self._check_without_randomness(trainer, pl_module)

    def _sample_and_embed(
        self, trainer: Trainer, generator: LightningModule, check: int, where: str
    ) -> EmbeddedStream:
        """This rank's whole blocks of the check's samples, drawn and embedded one block at a time."""
        n_samples = self.n_samples or len(self.reference.train)
        block_size = sample_block_size(n_samples, self.sample_batch_size)
        mine = block_shard(n_samples, block_size, trainer.global_rank, trainer.world_size)
        graphs = generator.sampler_graphs() if self.sampler_graphs else nullcontext()
        progress = self._progress(trainer, f"memorization {where}: samples")
        with (
            fail_together(generator.device, "sampling"),
            graphs,
            out_of_memory_named(self.sample_batch_size, self.decode_batch_size),
        ):
            return embed_stream(
                sample_blocks(
                    generator, mine, block_size, seed=(self.seed, check), num_inference_steps=self.num_inference_steps,
                    options=self._sample_options(),
                ),
                self.embedder.embed, first_index=mine.start, score_pairs=True,
                # twice the pairs shown: the running ranking and detect_copies may round near-ties differently
                keep=2 * MAX_PAIRS if self.log_images else 0,
                rank_by=lambda embeddings: nearest_correlation(embeddings, self.reference.train),
                autocast=trainer.precision_plugin.forward_context, require_finite=f"training failed at {where}",
                device=generator.device, progress=progress(len(mine)) if progress else None,
            )  # fmt: skip

    def _sample_options(self) -> dict[str, Any]:
        """The keywords of `sample` beyond the contract's that a check passes."""
        return {} if self.decode_batch_size is None else {"decode_batch_size": self.decode_batch_size}

    def _check_without_randomness(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        started = Stopwatch(device)
        training_seconds = started.last - self._training_since if self._training_since is not None else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        check = len(self.history)
        where = f"check {check} (epoch {trainer.current_epoch}, step {trainer.global_step})"
        local = self._sample_and_embed(trainer, self._generator(trainer, pl_module), check, where)
        clock = Stopwatch(device)
        synthetic = gathered(local, self.embedder.embedding_dim, device)  # waits for the slowest rank
        gathering = clock.lap()
        detection = self.reference.detect(synthetic.embeddings)
        detecting = clock.lap()
        fd, ms_ssim = quality_numbers(synthetic.embeddings, self.reference.val, synthetic.pair_scores)
        row = {
            "check": check, "epoch": trainer.current_epoch, "step": trainer.global_step,
            **check_numbers(detection, self.reference.train_patients, fd, ms_ssim),
            # What a check costs this rank, in seconds (the CSV shows it; bench/callback_overhead.py reads it).
            "seconds_sampling": round(local.seconds["images"], 4), "seconds_gather": round(gathering, 4),
            "seconds_embed_detect": round(local.seconds["embed"] + detecting, 4),
            "seconds_quality": round(local.seconds["pairs"] + clock.lap(), 4),
        }  # fmt: skip
        row |= check_cost(started.lap(), training_seconds, device)
        self.history.append(row)
        baseline = (trainer.current_epoch + 1) % self.every_n_epochs != 0  # check_at_start's, off the cadence
        for warning in cost_warnings(
            row, device, self.max_overhead, self.decode_batch_size or self.sample_batch_size, baseline
        ):
            rank_zero_warn(warning)
        self._log(row_scalars(row), trainer, pl_module)
        row |= self._membership_now(
            trainer.global_step
        )  # in the history beside N_mem; logged when it was evaluated
        shape = (self.embedder.in_channels, *self.data.spatial_size)
        copies = (
            gather_kept(local.kept, copy_order(detection.report), MAX_PAIRS, shape, device)
            if self.log_images
            else {}
        )
        log_dir = Path(trainer.log_dir) if trainer.loggers else None  # a broadcast: every rank asks
        with fail_together(device, f"writing the results of {where}"):
            if trainer.is_global_zero:
                if log_dir is not None:
                    write_history(log_dir, self.history)
                    log_histograms(trainer, detection.report)
                if self.log_images:
                    log_copy_pairs(trainer, detection.report, copies, self._training_image)
                if self.output_dir is not None:
                    self._write_report(detection, row, fd, ms_ssim, copies)
        self._training_since = Stopwatch(device).last

    def _training_image(self, index: int) -> torch.Tensor:
        # From the dataset itself: a new DataLoader would reseed torch's global generator.
        return self.data.reference_dataset("train")[index]["image"]

    def _write_report(
        self, detection, row: dict[str, Any], fd, ms_ssim, copies: dict[int, torch.Tensor]
    ) -> None:
        check, n_syn = row["check"], row["n_syn"]
        summary = {
            **summary_numbers(detection, self.reference.train_patients, len(self.reference.val), fd, ms_ssim),
            **{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIX) and not k.startswith(MEMBERSHIP_KEY)},
            "inputs": {
                "embedder_ckpt": self.embedder_ckpt, "n_samples": n_syn, "seed": self.seed,
                "num_inference_steps": self.num_inference_steps, "sample_batch_size": self.sample_batch_size,
            },
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
        if self._membership_now(row["step"]):
            summary["membership"] = self.membership.summary()
        with staged_output(self.output_dir / f"check_{check:03d}", "output_dir", overwrite=True) as folder:
            write_report(
                folder, detection.report, self.data.train_ids, [f"check{check:03d}-sample{i:06d}" for i in range(n_syn)],
                summary, train_image=self._training_image if self.log_images else None,
                syn_image=copies.__getitem__ if self.log_images else None, max_pairs=len(copies),
                train_patients=self.reference.train_patients,
            )  # fmt: skip

    # --- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(row) for row in self.history],
            "membership_history": [dict(row) for row in self.membership_history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self.membership_history = [dict(row) for row in state_dict.get("membership_history", [])]


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A history row's logged scalars `memorization/<key>` (`fd` and `ms_ssim` left out when `None`)."""
    return logged_scalars(
        {k: v for k, v in row.items() if k not in PLACE_KEYS and not k.startswith(TIMING_PREFIX)}
    )
