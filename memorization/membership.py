"""Membership signal from a model's own scores: do training images score higher than held-out ones?

A generator that memorizes fits its training patients better than held-out ones; a per-image
membership score (higher = more likely a training image, e.g. the negative denoising loss) shows it
before samples can be counted (PIA, ICLR 2024). This module holds the statistics only, free of any
model: the Mann–Whitney AUC of training versus held-out scores with DeLong's 95% interval (normal
approximation, clipped to [0, 1]), and the share of training images scored above the held-out
95th percentile (the true-positive rate at 5% false positives), and its control: two disjoint halves of
the scored training images against each other, the AUC a model reaches without any membership (a
split whose images differ shows there too: "Membership Inference or Data Split Bias?", 2026).

Which images are scored (`reference_rows`) and the id that seeds each image's noise (`score_ids`)
are fixed here, so the callback and the audit score the same images with the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import norm, rankdata

from memwatch.errors import InputError
from memwatch.memorization.chance import positive_rows as evenly_spaced
from memwatch.memorization.detect import linear_percentile

MIN_HELD_OUT = 10  # fewer held-out scores give no useful interval
AUC_METHOD = "Mann-Whitney AUC, DeLong 95% interval (normal approximation)"


@dataclass(frozen=True)
class MembershipSignal:
    """Training (members) versus held-out (non-members) scores of one model."""

    auc: float
    auc_ci: tuple[float, float]
    tpr_at_5fpr: float
    n_members: int
    n_non_members: int

    def scalars(self, prefix: str = "membership") -> dict[str, float]:
        return {
            f"{prefix}_auc": self.auc,
            f"{prefix}_auc_low": self.auc_ci[0],
            f"{prefix}_auc_high": self.auc_ci[1],
            f"{prefix}_tpr_at_5fpr": self.tpr_at_5fpr,
        }


def _scores(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(torch.as_tensor(x).detach().double().cpu()).reshape(-1)
    if not np.isfinite(values).all():
        raise InputError(f"{name} membership scores hold NaN or inf: the model's scores diverged")
    return values


def membership_signal(
    members: torch.Tensor | np.ndarray,
    non_members: torch.Tensor | np.ndarray,
    option: str = "the held-out images",
    min_non_members: int = MIN_HELD_OUT,
) -> MembershipSignal:
    """The AUC of `members` `[M]` against `non_members` `[N]` scores, its interval and the TPR at 5% FPR.

    `option` names what sets the held-out count, in the error when there are fewer than `min_non_members`.
    """
    x, y = _scores(members, "training"), _scores(non_members, "held-out")
    if len(y) < max(2, min_non_members) or len(x) < 2:
        raise InputError(
            f"{len(y)} held-out and {len(x)} training scores are too few for a membership interval: "
            f"give at least {min_non_members} held-out images ({option})"
        )
    m, n = len(x), len(y)
    combined = rankdata(np.concatenate([x, y]))  # ties share their mean rank: a tie counts one half
    auc = (combined[:m].sum() - m * (m + 1) / 2) / (m * n)
    # DeLong's structural components from ranks: V10_i = P(x_i > Y), V01_j = P(X > y_j).
    v10 = (combined[:m] - rankdata(x)) / n
    v01 = 1.0 - (combined[m:] - rankdata(y)) / m
    se = float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))
    z = norm.ppf(0.975)
    interval = (float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se)))
    threshold = float(linear_percentile(torch.from_numpy(y), 95.0))
    return MembershipSignal(float(auc), interval, float((x > threshold).mean()), m, n)


def control_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of `n` training images (seeded): both members, so their AUC is what a model reaches
    without any membership signal (a data split that differs in its images shows here too)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 : 2 * (n // 2)])


# Below, two halves are perfectly separated too often (2 in 252 at 5 + 5) for a usable interval.
MIN_CONTROL_HALF = 5


@dataclass(frozen=True)
class MembershipEvaluation:
    """One evaluation: training vs held-out (`signal`) and training half vs training half (`control`, `None`
    with fewer than `2 * MIN_CONTROL_HALF` training images)."""

    signal: MembershipSignal
    control: MembershipSignal | None
    train_scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    val_scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    @property
    def above_control(self) -> bool:
        """Whether the signal's interval lies wholly above the control's (no control: above 0.5)."""
        ceiling = max(0.5, self.control.auc_ci[1]) if self.control is not None else 0.5
        return bool(self.signal.auc_ci[0] > ceiling)

    def scalars(self) -> dict[str, float]:
        """`membership_auc(_low, _high)`, `membership_tpr_at_5fpr`, `membership_auc_control(_low, _high)`."""
        scalars = self.signal.scalars("membership")
        if self.control is not None:
            scalars |= {
                "membership_auc_control": self.control.auc,
                "membership_auc_control_low": self.control.auc_ci[0],
                "membership_auc_control_high": self.control.auc_ci[1],
            }
        return scalars

    def summary(self) -> dict:
        """The `membership` section of `summary.json`."""
        control = self.control
        return {
            "auc": self.signal.auc, "auc_ci": list(self.signal.auc_ci), "tpr_at_5fpr": self.signal.tpr_at_5fpr,
            "n_train": self.signal.n_members, "n_held_out": self.signal.n_non_members,
            "auc_control": control.auc if control else None, "auc_control_ci": list(control.auc_ci) if control else None,
            "above_control": self.above_control, "method": AUC_METHOD,
        }  # fmt: skip


def evaluate_membership(
    train_scores: torch.Tensor | np.ndarray,
    val_scores: torch.Tensor | np.ndarray,
    seed: int = 0,
    option: str = "",
) -> MembershipEvaluation:
    """The signal of `train_scores` against `val_scores`, and the control of two seeded halves of `train_scores`."""
    signal = membership_signal(train_scores, val_scores, option or "the held-out images")
    train = _scores(train_scores, "training")
    control = None
    if len(train) >= 2 * MIN_CONTROL_HALF:
        first, second = control_halves(len(train), seed)
        control = membership_signal(train[first], train[second], option, min_non_members=MIN_CONTROL_HALF)
    return MembershipEvaluation(signal, control, train, _scores(val_scores, "held-out"))


def reference_rows(n_train: int, n_val: int, n_ref: int | None) -> tuple[list[int], list[int]]:
    """The training and held-out rows scored: `n_ref` evenly spaced held-out images (all by default) and as many
    evenly spaced training images (all when fewer)."""
    val = evenly_spaced(n_val, n_val if n_ref is None else n_ref)
    return evenly_spaced(n_train, len(val)), val


def score_ids(split: str, rows: list[int], n_train: int) -> list[int]:
    """The id that seeds each scored image's noise: training image `i` is `i`, held-out image `j` is `n_train + j`."""
    return list(rows) if split == "train" else [n_train + j for j in rows]
