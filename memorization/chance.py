"""Chance level and the detector's self-check, estimated from the user's own held-out images.

**Chance level.** A generator that copies nobody draws new patients from the same
distribution as the held-out (validation) images. Each held-out image `v_j` is therefore a
stand-in for one such synthetic sample, judged against the threshold `τ_{-j}` computed from
the held-out images of the *other patients* (leave one patient out: the image never sets its own
threshold, nor do the other images of its patient, which a new patient's sample would not have
beside it in the held-out set; with one image per patient this is leave one out). From the N_val
splits:

- `null_frac_copies` = share of held-out images whose nearest training embedding correlates
  `≥ τ_{-j}`: the expected share of a copy-nobody generator's samples called copies (it does
  not depend on N_syn).
- For every training image `i` (or patient: any of their images), `k_i` = number of held-out
  images above `τ_{-j}`. With N_syn draws the image is called memorized when at least one
  draw is above τ. For N_syn ≤ N_val, `1 − C(N_val − k_i, N_syn) / C(N_val, N_syn)` is the
  exact unbiased estimate of that probability (the share of N_syn-subsets of the held-out
  images holding one); `null_frac_mem` is its mean over training images. For N_syn > N_val
  no unbiased estimate exists: the per-image exceedance probabilities are modelled as a Beta
  distribution fitted to the `k_i` (beta-binomial maximum likelihood) and
  `1 − E[(1 − p)^{N_syn}]` is taken under it.

Assumptions: held-out and copy-nobody synthetic images are exchangeable (same distribution,
independent of the training images); τ from N_val − 1 images equals τ from N_val. The
intervals `*_ci` are 95% prediction intervals of the rate such a generator would show *at
this τ*, binomial over the training images (patients, samples). They leave out how τ itself
varies with the held-out sample, which the held-out images cannot reveal: on simulated
embeddings with N_syn ≤ N_val they cover the observed null rate at about the stated level,
but with N_syn = 3 N_val (beta-binomial extrapolation) the observed rate varied about twice
as much as the interval says. Hold out at least N_syn images for a chance level to rely on.

**Self-check.** Sensitivity is the share of variations `v(x)` of training images (flip,
rotation, contrast, noise: new images that never enter τ) whose nearest training embedding
correlates `≥ τ`. Specificity is the share of held-out images not flagged, each at its
leave-one-out `τ_{-j}`, so no negative sets its own threshold; it is `1 − null_frac_copies`.

**Copy rule.** Both follow the rule `detect_copies` counts with (`memorization.detect.RULES`).
Under `distinct` a held-out or varied image is flagged only when it is also distinct: its nearest
training patient P1 clearly nearer than any other patient, `(1 − ρ1) ≤ margin² (1 − ρ2)`. A
held-out image `j` then counts for training image `i` (in `k_i`) only when `ρ(i, j) ≥ τ_{-j}`, `j`
is distinct and P1(j) is `i`'s patient, as a copy makes only its nearest patient's images memorized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import betaln, gammaln
from scipy.stats import betabinom, binom

from memwatch.errors import InputError
from memwatch.memorization.detect import (
    DEFAULT_MARGIN,
    DEFAULT_RULE,
    as_matrix,
    check_rule,
    is_distinct,
    linear_percentile,
    nearest_correlation,
    nearest_patient_correlations,
    standardise,
)
from memwatch.memorization.stats import CI_LEVEL, binomial_interval

MIN_SENSITIVITY = 0.9  # below this the self-check warns that the embedder misses copies


@dataclass(frozen=True)
class HeldOutExceedances:
    """Leave-one-out exceedances of the held-out images over τ.

    Attributes:
        tau: τ from all held-out images (as `detect_copies`).
        loo_tau: `[N_val]` τ without held-out image `j` and the other images of its patient.
        val_flagged: `[N_val]` bool, held-out image `j`'s nearest training correlation `≥ loo_tau[j]`
            (and, under `distinct`, `j` distinct).
        train_counts: `[N_train]` held-out images above their `loo_tau` for each training image (under
            `distinct` only distinct ones whose nearest patient is the image's).
        patient_counts: `[N_patients]` the same for each patient (any of their images), `patients` order.
        patients: the sorted patients of `patient_counts`.
        rule: the copy rule the flags follow; `detector_accuracy` flags the varied images by it too.
        margin: the `distinct` rule's margin; `None` under `paper`.
        train_patient_codes: `[N_train]` int64 position of each training row's patient in `patients`.
    """

    tau: float
    loo_tau: torch.Tensor
    val_flagged: torch.Tensor
    train_counts: torch.Tensor
    patient_counts: torch.Tensor
    patients: list[str]
    rule: str
    margin: float | None
    train_patient_codes: torch.Tensor

    @property
    def n_val(self) -> int:
        return len(self.loo_tau)


def held_out_exceedances(
    train: torch.Tensor,
    val: torch.Tensor,
    percentile: float,
    train_patients: Sequence[str] | None = None,
    chunk_size: int = 1024,
    *,
    rule: str = DEFAULT_RULE,
    margin: float = DEFAULT_MARGIN,
    val_patients: Sequence[str] | None = None,
) -> HeldOutExceedances:
    """Two chunked passes over train × val in float64 (memory O(chunk_size × N_val)): nearest neighbours, then exceedances.

    `train_patients` names the patient of each training row, `val_patients` of each held-out row
    (default: one patient per row); `loo_tau[j]` leaves out every held-out image of `j`'s patient. Under
    `rule="distinct"` a pass over val × train (memory O(chunk_size × N_train)) first finds each held-out
    image's nearest patient and whether it is distinct by `margin` (module docstring).
    """
    rule, margin = check_rule(rule, margin)
    train_n = standardise(as_matrix(train, "train").double(), "train")
    val_n = standardise(as_matrix(val, "val").to(device=train_n.device, dtype=torch.float64), "val")
    n_train, n_val = len(train_n), len(val_n)
    if n_val < 2:
        raise ValueError("the chance level needs at least 2 held-out images")
    patients = list(train_patients) if train_patients is not None else [str(i) for i in range(n_train)]
    if len(patients) != n_train:
        raise ValueError(f"{len(patients)} patient ids for {n_train} training embeddings")
    held_out = list(val_patients) if val_patients is not None else [str(j) for j in range(n_val)]
    if len(held_out) != n_val:
        raise ValueError(f"{len(held_out)} patient ids for {n_val} held-out embeddings")
    held_out_names = sorted(set(held_out))
    if len(held_out_names) < 2:
        raise ValueError("the chance level needs at least 2 held-out patients")
    val_patient_of = torch.tensor(_codes(held_out, held_out_names), dtype=torch.int64, device=train_n.device)
    # Without all images of one patient, a training image's nearest held-out image is among its
    # (largest patient + 1) nearest.
    k = min(n_val, int(torch.bincount(val_patient_of).max()) + 1)

    with torch.no_grad():
        values, indices = [], []
        for start in range(0, n_train, chunk_size):
            top = torch.topk(train_n[start : start + chunk_size] @ val_n.T, k, dim=1)
            values.append(top.values)
            indices.append(top.indices)
        neighbours, neighbour_index = torch.cat(values), torch.cat(indices)
        nearest = neighbours[:, 0]
        tau = linear_percentile(nearest, percentile)
        loo_tau = _leave_one_patient_out_tau(
            neighbours, val_patient_of[neighbour_index], val_patient_of, percentile, tau
        )

        names = sorted(set(patients))
        patient_of = torch.tensor(_codes(patients, names), dtype=torch.int64)
        attributed_to = None  # under distinct: each held-out image's nearest patient, -1 where not distinct
        if rule == "distinct":
            closest = nearest_patient_correlations(val_n, train_n, patient_of, chunk_size)
            distinct = is_distinct(closest[0], closest[2], margin)
            attributed_to = torch.where(distinct, closest[1], -1).to(train_n.device)
        order = torch.argsort(patient_of, stable=True)
        train_counts = torch.zeros(n_train, dtype=torch.int64)
        patient_counts = torch.zeros(len(names), dtype=torch.int64)
        val_flagged = torch.zeros(n_val, dtype=torch.bool, device=train_n.device)
        for rows in _patient_chunks(patient_of[order], order, chunk_size):
            above = (train_n[rows.to(train_n.device)] @ val_n.T) >= loo_tau
            local = patient_of[rows]
            if attributed_to is not None:
                above &= local.to(above.device)[:, None] == attributed_to[None, :]
            val_flagged |= above.any(dim=0)
            train_counts[rows] = above.sum(dim=1).cpu()
            first_patient = int(local[0])
            by_patient = torch.zeros(int(local[-1]) - first_patient + 1, n_val, device=above.device)
            by_patient.index_add_(0, (local - first_patient).to(above.device), above.to(by_patient.dtype))
            patient_counts[first_patient : int(local[-1]) + 1] = (by_patient > 0).sum(dim=1).cpu()
    return HeldOutExceedances(
        tau=float(tau),
        loo_tau=loo_tau.cpu(),
        val_flagged=val_flagged.cpu(),
        train_counts=train_counts,
        patient_counts=patient_counts,
        patients=names,
        rule=rule,
        margin=margin if rule == "distinct" else None,
        train_patient_codes=patient_of,
    )


def _codes(patients: Sequence[str], names: list[str]) -> list[int]:
    code = {name: k for k, name in enumerate(names)}
    return [code[p] for p in patients]


def _patient_chunks(sorted_patient: torch.Tensor, order: torch.Tensor, chunk_size: int):
    """Row indices in chunks of about `chunk_size` that never split a patient's rows."""
    start, n = 0, len(order)
    while start < n:
        stop = min(start + chunk_size, n)
        while stop < n and sorted_patient[stop] == sorted_patient[stop - 1]:
            stop += 1
        yield order[start:stop]
        start = stop


def _leave_one_patient_out_tau(
    neighbours: torch.Tensor,
    neighbour_patient: torch.Tensor,
    val_patient_of: torch.Tensor,
    percentile: float,
    tau,
) -> torch.Tensor:
    """`[N_val]` τ recomputed without each held-out patient: its training images fall back to their nearest other.

    `neighbours` `[N_train, k]` are each training image's k nearest held-out correlations, descending,
    `neighbour_patient` their patients' codes, k more than any patient's images. Only the patients
    nearest to some training image at or above the lower order statistic of the percentile can move
    τ; τ is recomputed for those alone.
    """
    loo_tau = torch.full((len(val_patient_of),), float(tau), dtype=neighbours.dtype, device=neighbours.device)
    nearest = neighbours[:, 0]
    position = (len(nearest) - 1) * (percentile / 100.0)
    lower = torch.sort(nearest).values[math.floor(position)]
    for patient in torch.unique(neighbour_patient[nearest >= lower, 0]).tolist():
        outside = neighbour_patient != patient
        first_outside = outside.to(torch.int8).argmax(dim=1, keepdim=True)
        without = neighbours.gather(1, first_outside).squeeze(1)
        loo_tau[val_patient_of == patient] = linear_percentile(without, percentile)
    return loo_tau


@dataclass(frozen=True)
class ChanceLevel:
    """What a generator that copies nobody would score at these sizes; see the module docstring."""

    null_frac_mem: float
    null_frac_copies: float
    null_frac_mem_patients: float
    null_frac_mem_ci: tuple[float, float]
    null_frac_copies_ci: tuple[float, float]
    null_frac_mem_patients_ci: tuple[float, float]
    method: str

    def scalars(self) -> dict[str, float | list[float]]:
        return {
            "null_frac_mem": self.null_frac_mem,
            "null_frac_copies": self.null_frac_copies,
            "null_frac_mem_patients": self.null_frac_mem_patients,
            "null_frac_mem_ci": list(self.null_frac_mem_ci),
            "null_frac_copies_ci": list(self.null_frac_copies_ci),
            "null_frac_mem_patients_ci": list(self.null_frac_mem_patients_ci),
        }


def chance_level(exceedances: HeldOutExceedances, n_syn: int) -> ChanceLevel:
    """The null rates for `n_syn` synthetic samples, with 95% prediction intervals."""
    n_val = exceedances.n_val
    per_image, method = at_least_one_of(exceedances.train_counts, n_val, n_syn)
    per_patient, _ = at_least_one_of(exceedances.patient_counts, n_val, n_syn)
    copies = float(exceedances.val_flagged.double().mean())
    return ChanceLevel(
        null_frac_mem=per_image,
        null_frac_copies=copies,
        null_frac_mem_patients=per_patient,
        null_frac_mem_ci=prediction_interval(per_image, len(exceedances.train_counts)),
        null_frac_copies_ci=prediction_interval(copies, n_syn, estimated_from=n_val),
        null_frac_mem_patients_ci=prediction_interval(per_patient, len(exceedances.patient_counts)),
        method=f"held-out images as copy-nobody samples, leave one patient out; {method}",
    )


def at_least_one_of(counts: torch.Tensor, n_val: int, n_syn: int) -> tuple[float, str]:
    """Mean over units of P(at least one of `n_syn` fresh draws exceeds), from `counts` of `n_val`; and the method."""
    counts = counts.double().numpy()
    if not counts.any():
        return 0.0, "no held-out image exceeded τ"
    if n_syn <= n_val:
        # C(n_val - k, n_syn) / C(n_val, n_syn), zero where fewer than n_syn draws stay below τ
        stays = n_val - counts
        log_none = (
            gammaln(stays + 1)
            - gammaln(np.maximum(stays - n_syn, 0) + 1)
            - gammaln(n_val + 1)
            + gammaln(n_val - n_syn + 1)
        )
        none = np.where(stays >= n_syn, np.exp(log_none), 0.0)
        return float(np.mean(1.0 - none)), "exact subsets (N_syn <= N_val)"
    a, b = _fit_beta_binomial(counts, n_val)
    return float(
        1.0 - np.exp(betaln(a, b + n_syn) - betaln(a, b))
    ), f"beta-binomial extrapolation (N_syn {n_syn} > N_val {n_val})"


def extrapolation_notice(n_syn: int, n_val: int, fewer: str) -> str | None:
    """One line when `n_syn` samples outnumber the `n_val` held-out images, whose chance level is then
    extrapolated (`at_least_one_of`), else `None`; `fewer` says how to compare fewer samples."""
    if n_syn <= n_val:
        return None
    return (
        f"{n_syn} samples outnumber the {n_val} held-out images, so the chance level is extrapolated "
        f"(beta-binomial) and its interval understates how much it varies; for a chance level to rely on, "
        f"hold out at least {n_syn} images or compare at most {n_val} samples ({fewer})"
    )


def _fit_beta_binomial(counts: np.ndarray, n: int) -> tuple[float, float]:
    """Maximum-likelihood Beta(a, b) of per-unit exceedance probabilities from binomial `counts` out of `n`."""
    values, multiplicity = np.unique(counts.astype(int), return_counts=True)
    mean = counts.mean() / n

    def negative_log_likelihood(log_ab: np.ndarray) -> float:
        a, b = np.exp(np.clip(log_ab, -12, 18))
        return -float(np.sum(multiplicity * betabinom.logpmf(values, n, a, b)))

    start = np.log([mean * 10.0, (1.0 - mean) * 10.0])
    fit = minimize(
        negative_log_likelihood, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9}
    )
    a, b = np.exp(np.clip(fit.x, -12, 18))
    return float(a), float(b)


def prediction_interval(
    rate: float, n: int, level: float = CI_LEVEL, estimated_from: int | None = None
) -> tuple[float, float]:
    """Central `level` range of an observed share out of `n` when each unit hits with probability `rate`.

    `estimated_from`: `rate` is itself a share observed in that many trials, so the range also carries
    its uncertainty: the rate's Jeffreys posterior Beta(k + ½, m − k + ½) with k = rate·m, and the share
    of `n` drawn from the beta-binomial it predicts. Without it, a rate estimated as 0 would predict
    exactly 0 however few trials it came from.
    """
    alpha = 1.0 - level
    if estimated_from is None:
        return float(binom.ppf(alpha / 2, n, rate) / n), float(binom.ppf(1 - alpha / 2, n, rate) / n)
    hits = rate * estimated_from
    a, b = hits + 0.5, estimated_from - hits + 0.5
    return float(betabinom.ppf(alpha / 2, n, a, b) / n), float(betabinom.ppf(1 - alpha / 2, n, a, b) / n)


@dataclass(frozen=True)
class DetectorAccuracy:
    """The embedder's self-check on the user's data: sensitivity on varied training images, specificity on held-out ones."""

    sensitivity: float
    specificity: float
    n_positive: int
    n_negative: int
    sensitivity_ci: tuple[float, float]
    specificity_ci: tuple[float, float]

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "sensitivity_ci": list(self.sensitivity_ci),
            "specificity_ci": list(self.specificity_ci),
        }


def detector_accuracy(
    varied: torch.Tensor, train: torch.Tensor, exceedances: HeldOutExceedances
) -> DetectorAccuracy:
    """Sensitivity on `varied` `[N_pos, L]` (embeddings of variations of training images) at τ; specificity
    from `exceedances`.

    The varied images are flagged by the rule of `exceedances` (its rule, margin and training patients),
    so both rates describe one detector.
    """
    if exceedances.rule == "distinct":
        nearest, _, other = nearest_patient_correlations(varied, train, exceedances.train_patient_codes)
        flagged = int(((nearest >= exceedances.tau) & is_distinct(nearest, other, exceedances.margin)).sum())
    else:
        flagged = int((nearest_correlation(varied, train).cpu() >= exceedances.tau).sum())
    n_positive, n_negative = len(varied), exceedances.n_val
    clear = n_negative - int(exceedances.val_flagged.sum())
    return DetectorAccuracy(
        sensitivity=flagged / n_positive,
        specificity=clear / n_negative,
        n_positive=n_positive,
        n_negative=n_negative,
        sensitivity_ci=binomial_interval(flagged, n_positive),
        specificity_ci=binomial_interval(clear, n_negative),
    )


def positive_rows(n_train: int, n_positives: int) -> list[int]:
    """`n_positives` evenly spaced training rows (all of them when there are fewer)."""
    if n_positives >= n_train:
        return list(range(n_train))
    return sorted({round(k * (n_train - 1) / max(1, n_positives - 1)) for k in range(n_positives)})


def weak_detector_warning(sensitivity: float, n_positive: int, option: str) -> str | None:
    """What to do when the self-check's sensitivity is below `MIN_SENSITIVITY`, or `None`."""
    if sensitivity >= MIN_SENSITIVITY:
        return None
    return (
        f"the embedder flags only {sensitivity:.0%} of varied training images (sensitivity < "
        f"{MIN_SENSITIVITY:.0%}, {n_positive} positives), so copies will be missed: train it longer or "
        f"on more images (configs/<dataset>_simclr.yaml) and pass the new checkpoint as {option}"
    )


def check_patients(
    recorded: Sequence[str] | None,
    train_patients: list[str],
    val_patients: list[str],
    percentile: float,
    argument: str,
    option: str,
) -> None:
    """Raise `InputError` when the data or the embedder cannot give an unbiased count.

    Fewer than 2 patients on a side; a percentile leaving fewer than one held-out image above
    τ; an embedder whose `recorded` training patients that are held out here (τ would be biased), or are none
    of the training patients (the recorded ids do not match the data's).
    """
    train, val = set(train_patients), set(val_patients)
    if len(train) < 2 or len(val) < 2:
        raise InputError(
            f"the data has {len(train)} training and {len(val)} validation patient(s): copy detection needs at "
            "least 2 on each side (τ comes from the held-out patients): add images or change the split"
        )
    if len(val_patients) * (100.0 - percentile) / 100.0 < 1.0:
        raise InputError(
            f"percentile={percentile} leaves fewer than one of the {len(val_patients)} held-out images above τ: "
            f"lower the percentile to at most {100.0 * (1 - 1 / len(val_patients)):.4g} or hold out more images"
        )
    if recorded is None:  # an embedder from before patients were recorded
        return
    recorded = set(recorded)
    leaked = sorted(recorded & val)
    if leaked:
        raise InputError(
            f"{argument} was trained on {len(leaked)} patient(s) held out here (e.g. {leaked[0]!r}), so τ would be "
            f"biased: train the embedder on this split's training images only and pass it as {option}"
        )
    if not recorded & train:
        raise InputError(
            f"{argument} was trained on {len(recorded)} patient(s), none of them among this data's "
            f"{len(train)} training patients: pass the embedder trained on this data as {option}"
        )
