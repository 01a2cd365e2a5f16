"""Membership signal from a model's own scores: do training images score higher than held-out ones?

A generator that memorizes fits its training patients better than held-out ones; a per-image
membership score (higher = more likely a training image, e.g. the negative denoising loss) shows it
before samples can be counted (PIA, ICLR 2024). This module holds the statistics only, free of any
model: the Mann–Whitney AUC of training versus held-out scores with DeLong's 95% interval (normal
approximation, clipped to [0, 1]), and the share of training images scored above the held-out
95th percentile (the true-positive rate at 5% false positives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm, rankdata

from errors import InputError
from memorization.detect import linear_percentile

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
    members: torch.Tensor | np.ndarray, non_members: torch.Tensor | np.ndarray, option: str = "the held-out images"
) -> MembershipSignal:
    """The AUC of `members` `[M]` against `non_members` `[N]` scores, its interval and the TPR at 5% FPR.

    `option` names what sets the held-out count, in the error when there are fewer than `MIN_HELD_OUT`.
    """
    x, y = _scores(members, "training"), _scores(non_members, "held-out")
    if len(y) < MIN_HELD_OUT or len(x) < 2:
        raise InputError(
            f"{len(y)} held-out and {len(x)} training scores are too few for a membership interval: "
            f"give at least {MIN_HELD_OUT} held-out images ({option})"
        )
    m, n = len(x), len(y)
    combined = rankdata(np.concatenate([x, y]))  # ties share their mean rank: a tie counts one half
    auc = (combined[:m].sum() - m * (m + 1) / 2) / (m * n)
    # DeLong's structural components from ranks: V10_i = P(x_i > Y), V01_j = P(X > y_j).
    v10 = (combined[:m] - rankdata(x)) / n
    v01 = 1.0 - (combined[m:] - rankdata(y)) / m
    se = float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))
    z = norm.ppf(0.975)
    interval = (max(0.0, auc - z * se), min(1.0, auc + z * se))
    threshold = float(linear_percentile(torch.from_numpy(y), 95.0))
    return MembershipSignal(float(auc), interval, float((x > threshold).mean()), m, n)


def control_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of `n` training images (seeded): both members, so their AUC is what a model reaches
    without any membership signal (a data split that differs in its images shows here too)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 : 2 * (n // 2)])
