"""Memorization as a training metric: every few epochs, check the generator for copies of training patients.

This callback schedules checks, keeps their history and logs them; the check itself is
`memorization.check.MemorizationCheck`, the one the audit and the watcher run (Dar et al., arXiv 2402.01054,
Algorithm 1). Its companions, each usable alone: `MembershipCallback` (the cheaper per-epoch membership
signal) and `LastSafeCheckpoint` (`last_safe.ckpt`).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from memwatch.callbacks.check_cost import check_cost, cost_warnings
from memwatch.callbacks.evaluation import at_epoch_end_validation, evaluated_model, log_scalars, placement
from memwatch.callbacks.preflight import (
    EMBEDDER_OPTION,
    check_distinct_outputs,
    check_early_stopping,
    check_embedder_fits,
    check_generator,
    check_name,
    check_output_dir,
    check_sampler_options,
    check_schedule,
    load_callback_embedder,
    probe_sampler,
)
from memwatch.callbacks.reference_data import ReferenceData, reference_data
from memwatch.callbacks.tensorboard import add_layout, log_copy_pairs, log_histograms
from memwatch.memorization.chance import extrapolation_notice, weak_detector_warning
from memwatch.memorization.check import CheckOptions, CheckResult, MemorizationCheck, Placement
from memwatch.memorization.detect import DEFAULT_MARGIN, DEFAULT_RULE
from memwatch.memorization.distributed import fail_together
from memwatch.memorization.history import (
    MEMBERSHIP_PREFIX,
    TIMING_PREFIX,
    history_file,
    row_scalars,
    write_history,
)
from memwatch.memorization.output_folders import staged_output
from memwatch.memorization.report import write_report
from memwatch.memorization.stream import Stopwatch

MAX_PAIRS = 8  # copy pairs shown per check (log_images, output_dir)


class MemorizationCallback(Callback):
    """Every `every_n_epochs` epochs: sample the generator, embed, count copies, log `memorization/*`.

    A check ends every epoch `e` with `(e + 1) % every_n_epochs == 0` (when Lightning validates and saves
    checkpoints with the same period): at that epoch's validation end when there is one, before EarlyStopping
    and ModelCheckpoint read it, else at the training epoch's end; a checkpoint saved then carries its row. Every
    rank computes the same numbers from gathered tensors (N_mem is the same on 1 or N processes), and a check
    leaves every random stream as it was. It logs the counts per image and per patient with 95% Clopper-Pearson
    intervals, the chance level of a generator that copies nobody (`null_*`, `excess_*`), τ, FD and MS-SSIM
    (quality metrics that do not reveal memorization), and once per fit the detector's self-check.

    Args:
        embedder_ckpt: checkpoint of a `SimCLRModule` trained on the training images; or `embedder`: any
            `memorization.embedders.Embedder` (`pixel`, or a `{class_path, init_args}` mapping of a class in
            memwatch or in `trust_modules`: importing a module runs its code).
        every_n_epochs: epochs between checks; `check_at_start`: also at the end of the first (a baseline).
        n_samples, num_inference_steps, sample_batch_size, decode_batch_size, sampler_graphs, percentile, rule,
            margin, seed, detector_positives, variation: the check's options, `memorization.check.CheckOptions`.
        log_images: also log the most similar copy pairs (training image | synthetic copy) to TensorBoard and
            put `copies.png` in `output_dir`. Off by default: patient pixels leave the dataset only when asked.
        output_dir: write each check's audit files (`summary.json`, report.html, ...) to `output_dir/check_NNN/`.
        max_overhead: warn when a check takes more than this share of the training time since the previous one.
        progress_seconds: progress lines on rank 0 every this many seconds during long steps; `None` for none.
        name: names this check's results where a Trainer has several (two embedders): its scalars are
            `memorization/<name>/*`, its history `memorization_history_<name>.csv`.
        membership_every_n_epochs, membership_n_ref: deprecated, `MembershipCallback`'s `every_n_epochs` and
            `n_ref` (the CLI's `membership:` section); one FutureWarning.
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
        trust_modules: list[str] | None = None,
        membership_every_n_epochs: int | None = None,
        membership_n_ref: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        check_schedule(every_n_epochs, max_overhead, membership_every_n_epochs, membership_n_ref)
        self.options = CheckOptions(
            n_samples=n_samples, num_inference_steps=num_inference_steps, sample_batch_size=sample_batch_size,
            decode_batch_size=decode_batch_size, sampler_graphs=sampler_graphs, percentile=percentile, rule=rule,
            margin=margin, seed=seed, detector_positives=detector_positives, variation=variation or {},
            keep_copies=MAX_PAIRS if log_images else 0,
        )  # fmt: skip
        self.embedder_ckpt, self.embedder = load_callback_embedder(embedder_ckpt, embedder, trust_modules or ())  # fmt: skip
        self.name, self.prefix = name, check_name(name)
        self.every_n_epochs, self.check_at_start = every_n_epochs, check_at_start
        self.log_images = log_images
        self.output_dir = Path(output_dir) if output_dir else None
        self.max_overhead, self.progress_seconds = max_overhead, progress_seconds
        self.check = MemorizationCheck(self.options, self.embedder)
        self.history: list[dict[str, Any]] = []
        self.result: CheckResult | None = None  # the latest check of this fit
        self.data: ReferenceData | None = None
        self.reference_embeddings_computed = 0  # per fit; for the overhead benchmark and tests
        self._training_since: float | None = None  # when training resumed after the previous check
        self._checked_trainer: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(embedder=self.embedder_ckpt, every_n_epochs=self.every_n_epochs, name=self.name)

    @property
    def reference(self):
        """The reference set of this fit (`memorization.reference.ReferenceSet`), or `None` before it."""
        return self.check.reference

    @property
    def detector(self):
        """The detector's self-check of this fit (`memorization.chance.DetectorAccuracy`), or `None`."""
        return self.reference.self_check if self.reference is not None else None

    def check_data(self, datamodule: Any) -> None:
        """Raise `InputError` if the embedder takes images of another size or dimensionality than the data's."""
        check_embedder_fits(
            self.embedder, *(getattr(datamodule, key, None) for key in ("spatial_size", "train_patients", "val_patients")),
            self.options.percentile,
        )  # fmt: skip

    def check_trainer(self, trainer: Trainer, generator: LightningModule | None = None) -> None:
        """Raise `InputError` for an EarlyStopping on the check's `memorization/*` that would read an old check
        or none (the CLI calls it before training; `setup` when it did not)."""
        check_early_stopping(trainer, self.every_n_epochs, self.check_at_start, self.prefix)
        check_distinct_outputs([c for c in trainer.callbacks if isinstance(c, MemorizationCallback)])
        self._checked_trainer = id(trainer)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_generator(pl_module)
        check_sampler_options(pl_module, trainer.strategy.root_device, self.options)
        self.data = reference_data(trainer.datamodule)
        self.check_data(self.data)
        if self._checked_trainer != id(trainer):
            self.check_trainer(trainer)
        check_output_dir(trainer, self.output_dir, self.embedder_ckpt)
        n_syn, n_val = self.options.n_samples or len(self.data.train_patients), len(self.data.val_patients)
        notice = extrapolation_notice(n_syn, n_val, f"--memorization.n_samples {n_val}")
        if stage == "fit" and notice:
            rank_zero_info(f"memorization: {notice}")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        probe_sampler(trainer, pl_module, self.options, self.embedder.in_channels, self.data.spatial_size)
        self.check.build_reference(
            self.data.reference_dataset("train"), self.data.reference_dataset("val"), self.data.train_patients,
            self.data.val_patients, self._placement(trainer, device, "memorization: "),
        )  # fmt: skip
        self.reference_embeddings_computed += 1
        if self.detector is not None:
            scalars = {f"{self.prefix}detector_{k}": getattr(self.detector, k) for k in ("sensitivity", "specificity")}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
            weak = weak_detector_warning(self.detector.sensitivity, self.detector.n_positive, EMBEDDER_OPTION)
            if weak:
                rank_zero_warn(weak)
        if trainer.is_global_zero:
            add_layout(trainer)

    def _placement(self, trainer: Trainer, device: torch.device, label: str) -> Placement:
        return placement(trainer, device, getattr(self.data, "num_workers", 0), label, self.progress_seconds)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._training_since = Stopwatch(pl_module.device).last

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if at_epoch_end_validation(trainer):  # before EarlyStopping and ModelCheckpoint read it
            self._check_if_due(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_if_due(trainer, pl_module)

    def _check_if_due(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        scheduled = (epoch + 1) % self.every_n_epochs == 0 or (self.check_at_start and epoch == 0)
        if scheduled and self.scalars_at(trainer.global_step) is None:
            self._run_check(trainer, pl_module)

    def scalars_at(self, step: int) -> dict[str, float] | None:
        """The scalars a check logged at `step` (for `LastSafeCheckpoint`), or `None` when none ran then."""
        if not self.history or self.history[-1]["step"] != step:
            return None
        return row_scalars(self.history[-1], self.prefix)

    def _run_check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        training_seconds = (
            Stopwatch(device).last - self._training_since if self._training_since is not None else None
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        index = len(self.history)
        where = f"check {index} (epoch {trainer.current_epoch}, step {trainer.global_step})"
        result = self.check.run(
            evaluated_model(trainer, pl_module, self), self._placement(trainer, device, f"memorization {where}: "),
            index, where=f"training failed at {where}",
        )  # fmt: skip
        self.result = result
        row = {
            "check": index,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            **result.numbers(),
        }
        row |= result.seconds | check_cost(result.elapsed, training_seconds, device)
        self.history.append(row)
        baseline = (trainer.current_epoch + 1) % self.every_n_epochs != 0  # check_at_start's, off the cadence
        block = self.options.decode_batch_size or self.options.sample_batch_size
        for warning in cost_warnings(row, device, self.max_overhead, block, baseline):
            rank_zero_warn(warning)
        log_scalars(trainer, pl_module, row_scalars(row, self.prefix))
        membership = membership_at(trainer, trainer.global_step)
        row |= membership.row if membership else {}  # in the history beside N_mem; logged when evaluated
        log_dir = Path(trainer.log_dir) if trainer.loggers else None  # a broadcast: every rank asks
        with fail_together(device, f"writing the results of {where}"):
            if trainer.is_global_zero:
                if log_dir is not None:
                    write_history(log_dir, self.history, history_file(self.name))
                    log_histograms(trainer, result.detection.report, self.prefix)
                if self.log_images:
                    log_copy_pairs(trainer, result.detection.report, result.copies, self._training_image, self.prefix)
                if self.output_dir is not None:
                    self._write_report(result, row, membership)
        self._training_since = Stopwatch(device).last

    def _training_image(self, index: int) -> torch.Tensor:
        # From the dataset itself: a new DataLoader would reseed torch's global generator.
        return self.data.reference_dataset("train")[index]["image"]

    def _write_report(self, result: CheckResult, row: dict[str, Any], membership) -> None:
        check, n_syn = row["check"], row["n_syn"]
        summary = {
            **result.summary(),
            **{k: v for k, v in row.items() if not k.startswith((TIMING_PREFIX, MEMBERSHIP_PREFIX))},
            "inputs": {"embedder_ckpt": self.embedder_ckpt, "n_samples": n_syn} | {key: getattr(self.options, key) for key in (
                "seed", "num_inference_steps", "sample_batch_size")},
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
        if membership is not None:
            summary["membership"] = membership.summary
        with staged_output(self.output_dir / f"check_{check:03d}", "output_dir", overwrite=True) as folder:
            write_report(
                folder, result.detection.report, self.data.train_ids,
                [f"check{check:03d}-sample{i:06d}" for i in range(n_syn)], summary,
                train_image=self._training_image if self.log_images else None,
                syn_image=result.copies.__getitem__ if self.log_images else None, max_pairs=len(result.copies),
                train_patients=self.reference.train_patients,
            )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
        # 0.1 checkpoints kept the membership history here; MembershipCallback takes it over.
        self.legacy_membership_history = [dict(row) for row in state_dict.get("membership_history", [])]

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A 0.1 checkpoint stored this callback's state under its class name alone.
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states and type(self).__qualname__ in states:
            states[self.state_key] = states.pop(type(self).__qualname__)


def membership_at(trainer: Trainer, step: int):
    """The membership evaluation a `MembershipCallback` of `trainer` made at `step`, or `None`."""
    found = (c.evaluation_at(step) for c in trainer.callbacks if callable(getattr(c, "evaluation_at", None)))
    return next((evaluation for evaluation in found if evaluation is not None), None)
