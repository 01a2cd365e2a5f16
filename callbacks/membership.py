"""The membership signal as a callback: every few epochs, the generator's own scores of training versus
held-out images (`memorization.membership`), far cheaper than a check and ahead of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from memwatch.callbacks.evaluation import at_epoch_end_validation, evaluated_model, log_scalars, placement
from memwatch.callbacks.memorization import MemorizationCallback
from memwatch.callbacks.preflight import (
    check_membership_data,
    check_membership_stopping,
    warn_without_membership_scores,
)
from memwatch.callbacks.reference_data import ReferenceData, reference_data
from memwatch.errors import InputError
from memwatch.memorization.distributed import fail_together
from memwatch.memorization.embedders import membership_scorer
from memwatch.memorization.history import MEMBERSHIP_HISTORY_FILE, MEMBERSHIP_PREFIX, write_history
from memwatch.memorization.membership import AUC_METHOD, MIN_HELD_OUT, MembershipEvaluation
from memwatch.memorization.pipeline import score_membership
from memwatch.memorization.stream import Stopwatch, deterministic_kernels, rng_preserved


@dataclass(frozen=True)
class MembershipAt:
    """One evaluation: its history columns (`membership_*`) and its `summary.json` section."""

    row: dict[str, Any]
    summary: dict[str, Any]


class MembershipCallback(Callback):
    """Every `every_n_epochs` epochs: score `n_ref` training and held-out images with the generator's own
    `membership_scores(images, ids)` and log how well they separate.

    For memwatch's diffusion models a score is minus the denoising loss at t = T/10 with noise seeded by each
    image's id, for the autoencoder minus the reconstruction error: one forward pass per image. Logs
    `memorization/membership_auc` (training vs held-out; Mann–Whitney, DeLong 95% interval `_low`/`_high`),
    `memorization/membership_tpr_at_5fpr` and `memorization/membership_auc_control` (two halves of the training
    images: the AUC without any membership), to the loggers and `membership_history.csv`. Evaluated at the
    same epoch ends as `MemorizationCallback`'s checks (list this callback first, and a check's history row
    carries the evaluation of its step). A model without `membership_scores` gets one warning and no signal.

    Args:
        every_n_epochs: epochs between evaluations (0: off).
        n_ref: held-out images scored (evenly spaced; default all), and as many training images.
        batch_size: images scored per forward pass, in fixed blocks: the same scores on any number of processes
            (`None`: the `sample_batch_size` of a `MemorizationCallback` in the same Trainer, else 16).
        seed: seeds the control's split of the training images (`None`: that callback's `seed`, else 0).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        n_ref: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if every_n_epochs < 0:
            raise InputError(
                f"--membership.every_n_epochs={every_n_epochs} must be at least 0 (0 turns the membership signal off)"
            )
        if n_ref is not None and n_ref < MIN_HELD_OUT:
            raise InputError(
                f"--membership.n_ref={n_ref} is too few for a membership interval: give at least {MIN_HELD_OUT} "
                "(or null for every held-out image)"
            )
        if batch_size is not None and batch_size < 1:
            raise InputError(f"--membership.batch_size={batch_size} must be at least 1")
        self.every_n_epochs, self.n_ref, self.batch_size, self.seed = every_n_epochs, n_ref, batch_size, seed
        self.history: list[dict[str, Any]] = []
        self.evaluation: MembershipEvaluation | None = None  # the latest, with its scores
        self.data: ReferenceData | None = None
        self._period = 0  # every_n_epochs where the model has membership_scores, else 0
        self._checked_trainer: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, n_ref=self.n_ref)

    def period(self, generator: LightningModule) -> int:
        """Epochs between evaluations of `generator` (0 when it has no `membership_scores`)."""
        return self.every_n_epochs if membership_scorer(generator) is not None else 0

    def check_trainer(self, trainer: Trainer, generator: LightningModule) -> None:
        """Raise `InputError` for an EarlyStopping on `memorization/membership_*` that would read an old
        evaluation or none."""
        check_membership_stopping(trainer, self.period(generator))
        self._checked_trainer = id(trainer)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        warn_without_membership_scores(pl_module, self.every_n_epochs)
        self._period = self.period(pl_module)
        if self._checked_trainer != id(trainer):
            self.check_trainer(trainer, pl_module)
        check_options = next(
            (c.options for c in trainer.callbacks if isinstance(c, MemorizationCallback)), None
        )
        self._batch_size = self.batch_size or (check_options.sample_batch_size if check_options else 16)
        self._seed = self.seed if self.seed is not None else (check_options.seed if check_options else 0)
        if self._period:
            self.data = reference_data(trainer.datamodule)
            check_membership_data(len(self.data.val_patients), self.n_ref)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history:  # a 0.1 checkpoint kept this history in MemorizationCallback's state
            for callback in trainer.callbacks:
                self.history = self.history or list(getattr(callback, "legacy_membership_history", []))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if at_epoch_end_validation(trainer):
            self._evaluate_if_due(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate_if_due(trainer, pl_module)

    def _evaluate_if_due(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._period or (trainer.current_epoch + 1) % self._period:
            return
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return
        device = pl_module.device
        generator = evaluated_model(trainer, pl_module, self)
        started = Stopwatch(device)
        where = f"scoring membership (epoch {trainer.current_epoch}, step {trainer.global_step})"
        with rng_preserved(device), deterministic_kernels(), fail_together(device, where):
            evaluation = score_membership(
                self.data.reference_dataset("train"), self.data.reference_dataset("val"), generator.membership_scores,
                self._batch_size, placement(trainer, device, getattr(self.data, "num_workers", 0), "", None),
                n_ref=self.n_ref, seed=self._seed, option="--membership.n_ref",
            )  # fmt: skip
        numbers = evaluation.scalars() | {"membership_seconds": started.lap()}
        self.evaluation = evaluation
        self.history.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, **numbers,
             "membership_above_control": evaluation.above_control, "membership_method": AUC_METHOD}
        )  # fmt: skip
        log_scalars(trainer, pl_module, self.scalars_at(trainer.global_step))
        log_dir = Path(trainer.log_dir) if trainer.loggers else None  # a broadcast: every rank asks
        with fail_together(device, f"writing {MEMBERSHIP_HISTORY_FILE}"):
            if trainer.is_global_zero and log_dir is not None:
                write_history(log_dir, self.history, MEMBERSHIP_HISTORY_FILE)

    def scalars_at(self, step: int) -> dict[str, float] | None:
        """The scalars an evaluation logged at `step` (for `LastSafeCheckpoint`), or `None` when none ran then."""
        if not self.history or self.history[-1]["step"] != step:
            return None
        row = self.history[-1]
        not_logged = ("membership_above_control", "membership_method")
        return {
            f"memorization/{key}": float(value)
            for key, value in row.items()
            if key.startswith(MEMBERSHIP_PREFIX) and key not in not_logged
        }

    def evaluation_at(self, step: int) -> MembershipAt | None:
        """The evaluation made at `step` in this fit, or `None`."""
        if self.evaluation is None or not self.history or self.history[-1]["step"] != step:
            return None
        row = {key: value for key, value in self.history[-1].items() if key.startswith(MEMBERSHIP_PREFIX)}
        return MembershipAt(row, self.evaluation.summary())

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
