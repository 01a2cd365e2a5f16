"""The reference set a check compares samples with, and what one detector finds against it.

Built once per fit (the callback) or per audit, from embeddings alone: the training and held-out
embeddings, their patients, the held-out images' exceedances (from which the chance level of a
generator that copies nobody follows, `memorization.chance`), and the detector's self-check on
varied training images. `ReferenceSet.detect` then counts the copies among synthetic embeddings
under the same percentile and copy rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memwatch.memorization.chance import (
    ChanceLevel,
    DetectorAccuracy,
    chance_level,
    detector_accuracy,
    held_out_exceedances,
)
from memwatch.memorization.detect import CopyReport, detect_copies


@dataclass(frozen=True)
class Detection:
    """What one embedder found: the copy report, its chance level and its self-check."""

    report: CopyReport
    chance: ChanceLevel
    self_check: DetectorAccuracy | None


@dataclass
class ReferenceSet:
    """Training `[N_train, L]` and held-out `[N_val, L]` embeddings with their patients, under one copy rule.

    Attributes:
        self_check: the detector's sensitivity on varied training images and specificity on held-out
            ones, or `None` when no varied images were embedded.
    """

    train: torch.Tensor
    val: torch.Tensor
    train_patients: list[str]
    val_patients: list[str] | None
    percentile: float
    rule: str
    margin: float
    self_check: DetectorAccuracy | None = None
    _chance: dict[int, ChanceLevel] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        train: torch.Tensor,
        val: torch.Tensor,
        train_patients: Sequence[str],
        val_patients: Sequence[str] | None,
        *,
        percentile: float,
        rule: str,
        margin: float,
        varied: torch.Tensor | None = None,
    ) -> ReferenceSet:
        """The reference set, with the self-check when `varied` (embeddings of varied training images) is given."""
        reference = cls(
            train, val, list(train_patients), None if val_patients is None else list(val_patients),
            percentile, rule, margin,
        )  # fmt: skip
        if varied is not None:
            reference.self_check = detector_accuracy(varied, train, reference.exceedances)
        return reference

    def __post_init__(self) -> None:
        self.exceedances = held_out_exceedances(
            self.train, self.val, self.percentile, self.train_patients,
            rule=self.rule, margin=self.margin, val_patients=self.val_patients,
        )  # fmt: skip

    def chance(self, n_syn: int) -> ChanceLevel:
        """The chance level for `n_syn` samples (computed once per size)."""
        if n_syn not in self._chance:
            self._chance[n_syn] = chance_level(self.exceedances, n_syn)
        return self._chance[n_syn]

    def detect(self, synthetic: torch.Tensor) -> Detection:
        """Copies among `synthetic` `[N_syn, L]` embeddings, with the chance level for `N_syn` samples."""
        report = detect_copies(
            self.train, self.val, synthetic, percentile=self.percentile, rule=self.rule, margin=self.margin,
            train_patients=self.train_patients,
        )  # fmt: skip
        return Detection(report, self.chance(len(synthetic)), self.self_check)
