"""The numbers a check or an audit reports: one dict shared by a history row and `summary.json`.

`check_numbers` is what a history row and `summary.json` both carry (rule, headline counts with
intervals and chance level, quality metrics); `summary_numbers` adds what only `summary.json`
carries (held-out count, methods, the self-check). The callback adds where the check ran and what
it cost, the audit every embedder's counts (`detectors_summary`); both add their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from memwatch.memorization.chance import ChanceLevel
from memwatch.memorization.detect import CopyReport
from memwatch.memorization.quality import frechet_distance
from memwatch.memorization.reference import Detection
from memwatch.memorization.report import copy_order
from memwatch.memorization.stats import CI_METHOD, binomial_interval, memorized_patients

# The per-embedder numbers in summary.json's `detectors`, beside the headline (the first embedder's).
DETECTOR_KEYS = (
    "tau", "n_mem", "frac_mem", "frac_mem_ci", "n_mem_patients", "frac_mem_patients", "frac_mem_patients_ci",
    "n_copies", "frac_copies", "frac_copies_ci", "null_frac_mem", "null_frac_mem_patients", "null_frac_copies",
    "excess_frac_mem", "excess_frac_mem_patients", "excess_frac_copies",
)  # fmt: skip


def headline(report: CopyReport, train_patients: Sequence[str], chance: ChanceLevel | None) -> dict[str, Any]:
    """Every count of a check or an audit, per image and per patient, with intervals and chance level.

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


def quality_numbers(
    synthetic: torch.Tensor, val: torch.Tensor, pair_scores: torch.Tensor
) -> tuple[float | None, float | None]:
    """`fd` (Fréchet distance of synthetic `[N_syn, L]` to held-out `[N_val, L]` embeddings) and `ms_ssim` (the mean
    MS-SSIM of sample pairs, in float64); each `None` when there are too few samples to compute it."""
    fd = frechet_distance(synthetic, val) if min(len(synthetic), len(val)) >= 2 else None
    return fd, float(pair_scores.double().mean()) if len(pair_scores) else None


def check_numbers(
    detection: Detection, train_patients: Sequence[str], fd: float | None, ms_ssim: float | None
) -> dict[str, Any]:
    """The copy rule, the headline counts and the two quality metrics (`None` when too few samples)."""
    report = detection.report
    return {
        "rule": report.rule,
        "margin": report.margin,
        **headline(report, train_patients, detection.chance),
        "fd": fd,
        "ms_ssim": ms_ssim,
    }


def summary_numbers(
    detection: Detection, train_patients: Sequence[str], n_val: int, fd: float | None, ms_ssim: float | None
) -> dict[str, Any]:
    """`check_numbers` and what `summary.json` adds: `n_val`, the interval and chance methods, the self-check."""
    return {
        **check_numbers(detection, train_patients, fd, ms_ssim),
        "n_val": n_val,
        "ci_method": CI_METHOD,
        "null_method": detection.chance.method if detection.chance else None,
        "detector": detection.self_check.as_dict() if detection.self_check else None,
    }


def detectors_summary(
    detections: Mapping[str, Detection], syn_ids: Sequence[str], train_patients: Sequence[str]
) -> dict[str, Any]:
    """Each embedder's counts (as in the headline), and where they agree on the synthetic samples."""
    summary: dict[str, Any] = {}
    flagged = {}
    for name, detection in detections.items():
        numbers = headline(detection.report, train_patients, detection.chance)
        flagged[name] = {syn_ids[j] for j in copy_order(detection.report)}
        summary[name] = {
            **{key: numbers[key] for key in DETECTOR_KEYS if key in numbers},
            "detector": detection.self_check.as_dict() if detection.self_check else None,
            "copy_syn_ids": [syn_ids[j] for j in copy_order(detection.report)],
        }
    sets = list(flagged.values())
    union, common = set().union(*sets), set.intersection(*sets)
    pairs = []
    names = list(flagged)
    for a, first in enumerate(names):
        for second in names[a + 1 :]:
            both = len(flagged[first] & flagged[second])
            neither = len(syn_ids) - len(flagged[first] | flagged[second])
            pairs.append({
                "detectors": [first, second], "both": both, "neither": neither,
                "only_first": len(flagged[first] - flagged[second]), "only_second": len(flagged[second] - flagged[first]),
                "agreement": (both + neither) / len(syn_ids) if syn_ids else None,
            })  # fmt: skip
    return {
        "by_embedder": summary,
        "n_copies_any": len(union),
        "n_copies_all": len(common),
        "copies_any": sorted(union),
        "copies_all": sorted(common),
        "pairwise": pairs,
    }
