"""Counts a person can read against their noise: exact binomial intervals and per-patient counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from scipy.stats import beta

if TYPE_CHECKING:
    from memorization.chance import ChanceLevel
    from memorization.detect import CopyReport

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


def headline(report: CopyReport, train_patients: Sequence[str], chance: ChanceLevel | None) -> dict[str, Any]:
    """Every number of a check or an audit, per image and per patient, with intervals and chance level.

    Keys: `n_train`, `n_train_patients`, `n_syn`, `n_mem`, `n_copies`, `frac_mem`, `frac_copies`,
    `tau`, `n_mem_patients`, `frac_mem_patients`, `<fraction>_ci` for the three fractions, and
    with `chance` its `null_*` rates and intervals and `excess_<fraction> = fraction − null`.
    """
    n_train, n_syn = len(report.memorized), len(report.is_copy)
    patients = memorized_patients(report.memorized, train_patients)
    n_patients = len(set(train_patients))
    numbers: dict[str, Any] = {
        "n_train": n_train,
        "n_train_patients": n_patients,
        "n_syn": n_syn,
        **report.scalars(),
        "n_mem_patients": len(patients),
        "frac_mem_patients": len(patients) / n_patients,
        "frac_mem_ci": list(binomial_interval(report.n_mem, n_train)),
        "frac_copies_ci": list(binomial_interval(report.n_copies, n_syn)),
        "frac_mem_patients_ci": list(binomial_interval(len(patients), n_patients)),
    }
    if chance is not None:
        numbers |= chance.scalars()
        for fraction in ("frac_mem", "frac_copies", "frac_mem_patients"):
            numbers[f"excess_{fraction}"] = numbers[fraction] - numbers[f"null_{fraction}"]
    return numbers


def logged_scalars(numbers: dict[str, Any]) -> dict[str, float]:
    """`numbers` as TensorBoard scalars `memorization/<key>`; an interval `<key>_ci` becomes `<key>_low` and `<key>_high`."""
    scalars = {}
    for key, value in numbers.items():
        if isinstance(value, (list, tuple)) and key.endswith("_ci") and len(value) == 2:
            scalars[f"memorization/{key[:-3]}_low"], scalars[f"memorization/{key[:-3]}_high"] = map(float, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[f"memorization/{key}"] = float(value)
    return scalars
