"""Counts a person can read against their noise: exact binomial intervals, per-patient counts, and the
scalars a logger receives (an interval as `_low`/`_high`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from scipy.stats import beta

CI_LEVEL = 0.95
CI_METHOD = "Clopper-Pearson exact binomial, 95%"


def binomial_interval(k: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate from `k` successes in `n` trials.

    Exact rather than Wald or Wilson: it covers the true rate with probability at least
    `level` for every rate and every `n`, including the small counts (16 patients, 0 copies)
    where the approximations fail; a release decision should err on the wide side.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"k={k}, n={n}: need 0 <= k <= n and n >= 1")
    alpha = 1.0 - level
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def memorized_patients(memorized: torch.Tensor, patients: Sequence[str]) -> list[str]:
    """The patients (sorted) with at least one memorized image; `memorized` is `[N_train]` bool in `patients` order."""
    if len(memorized) != len(patients):
        raise ValueError(f"{len(memorized)} training images but {len(patients)} patient ids")
    return sorted({patient for patient, hit in zip(patients, memorized.tolist(), strict=True) if hit})


def logged_scalars(numbers: dict[str, Any], prefix: str = "memorization/") -> dict[str, float]:
    """`numbers` as TensorBoard scalars `<prefix><key>`; an interval `<key>_ci` becomes `<key>_low` and `<key>_high`."""
    scalars = {}
    for key, value in numbers.items():
        if isinstance(value, (list, tuple)) and key.endswith("_ci") and len(value) == 2:
            scalars[f"{prefix}{key[:-3]}_low"], scalars[f"{prefix}{key[:-3]}_high"] = map(float, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[f"{prefix}{key}"] = float(value)
    return scalars
