"""The copy rules: `paper` (ρ1 ≥ τ) and `distinct` (also d1 ≤ margin · d2, nearest patient against any other).

Exact constructions from a Hadamard matrix: its rows (but the first) are balanced ±1, mutually
orthogonal, and every correlation between them and their sums is computed exactly, so τ = 0 from
held-out rows orthogonal to every training row and ties between two patients are ties bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard
from scipy.spatial.distance import cdist

from memwatch.errors import InputError
from memwatch.memorization import detect_copies
from memwatch.memorization.chance import chance_level, held_out_exceedances
from memwatch.memorization.detect import DEFAULT_MARGIN, DEFAULT_RULE, NO_OTHER_PATIENT, RULES, check_rule

H = hadamard(16).astype(np.float64)[1:]  # 15 balanced, mutually orthogonal rows
TRAIN, VAL = H[:6], H[6:]  # every training row correlates 0 with every held-out row: τ = 0
OWN = [f"p{i}" for i in range(len(TRAIN))]  # each training image its own patient


def report_of(syn, rule, margin=0.5, patients=OWN, **kwargs):
    return detect_copies(TRAIN, VAL, np.atleast_2d(syn), rule=rule, margin=margin, train_patients=patients, **kwargs)


def test_a_sample_between_two_patients_is_a_copy_under_paper_only_a_true_copy_under_both():
    between = TRAIN[0] + 0.9 * TRAIN[1]  # ρ ≈ 0.74 with patient 0, ≈ 0.67 with patient 1: d1 ≈ 0.89 d2
    copy = TRAIN[2] + 0.05 * TRAIN[3]  # ρ ≈ 0.999 with patient 2, ≈ 0.05 with patient 3
    syn = np.stack([between, copy])
    paper, distinct = report_of(syn, "paper"), report_of(syn, "distinct", margin=0.5)
    assert paper.tau == distinct.tau == 0.0
    assert paper.is_copy.tolist() == [True, True] and paper.rule == "paper" and paper.margin is None
    assert distinct.is_copy.tolist() == [False, True] and distinct.rule == "distinct" and distinct.margin == 0.5
    assert paper.is_close.tolist() == distinct.is_close.tolist() == [True, True]
    assert paper.nn_other_patient_corr is None
    assert distinct.nn_train_index.tolist() == [0, 2]
    expected_other = [0.9 / np.sqrt(1.81), 0.05 / np.sqrt(1.0025)]
    np.testing.assert_allclose(distinct.nn_other_patient_corr.numpy(), expected_other, atol=1e-12)
    assert (distinct.n_copies, paper.n_copies) == (1, 2)
    # the same sample with a lenient margin: d1 / d2 ≈ 0.89 passes 0.95, not 0.85
    assert report_of(between, "distinct", margin=0.95).is_copy.tolist() == [True]
    assert report_of(between, "distinct", margin=0.85).is_copy.tolist() == [False]


@pytest.mark.parametrize("margin, copy", [(0.5, False), (0.999, False), (1.0, True)])
def test_a_tie_between_two_patients_is_not_distinct_below_margin_one(margin, copy):
    report = report_of(TRAIN[0] + TRAIN[1], "distinct", margin=margin)
    assert float(report.nn_train_corr[0]) == float(report.nn_other_patient_corr[0])  # a tie, bit for bit
    assert report.is_close.tolist() == [True] and report.is_copy.tolist() == [copy]
    # one image in the training set twice, as two patients: its exact copy ties at ρ = 1, both distances 0
    duplicate = detect_copies(np.concatenate([TRAIN, TRAIN[:1]]), VAL, TRAIN[:1], rule="distinct", margin=margin)
    assert float(duplicate.nn_train_corr[0]) == float(duplicate.nn_other_patient_corr[0])
    assert duplicate.is_copy.tolist() == [copy]


def test_two_images_of_one_patient_near_a_sample_keep_it_distinct_two_patients_do_not():
    sample = TRAIN[2] + TRAIN[3]  # ρ = 0.71 with training images 2 and 3, 0 with the others: d1 = 0.54 d2
    one_patient = ["a", "b", "c", "c", "d", "e"]
    grouped = report_of(sample, "distinct", margin=0.75, patients=one_patient)
    apart = report_of(sample, "distinct", margin=0.75, patients=OWN)
    assert float(grouped.nn_other_patient_corr[0]) == pytest.approx(0, abs=1e-12)
    assert grouped.is_copy.tolist() == [True]
    assert apart.is_copy.tolist() == [False]
    # both images of the copied patient are memorized under the distinct rule; no one is when it is not distinct
    assert grouped.memorized.tolist() == [False, False, True, True, False, False]
    assert not apart.memorized.any()
    # the paper's rule needs no attribution: at τ = 0 every training image reaches it (ρ = 0 with the others)
    assert report_of(sample, "paper", patients=OWN).memorized.all()


def test_without_another_patient_the_other_correlation_is_the_lowest_there_is():
    report = report_of(TRAIN[4] + 0.1 * TRAIN[5], "distinct", patients=["x"] * len(TRAIN))
    assert report.nn_other_patient_corr.tolist() == [NO_OTHER_PATIENT] and report.is_copy.tolist() == [True]


def population(seed: int):
    """Patients of 1-3 images, held-out patients, and synthetic copies, averages of two patients and novel samples."""
    rng = np.random.default_rng(seed)
    n_patients, length = 40, 32
    sizes = rng.integers(1, 4, n_patients)
    patients = [f"patient-{p:02d}" for p, size in enumerate(sizes) for _ in range(size)]
    centres = rng.standard_normal((n_patients, length))
    train = np.repeat(centres, sizes, axis=0) + 0.3 * rng.standard_normal((len(patients), length))
    val = rng.standard_normal((60, length))
    pairs = rng.integers(0, len(train), (30, 2))
    averages = train[pairs[:, 0]] + train[pairs[:, 1]] + 0.1 * rng.standard_normal((30, length))
    copies = train[rng.integers(0, len(train), 20)] + 0.2 * rng.standard_normal((20, length))
    syn = np.concatenate([copies, averages, rng.standard_normal((30, length))])
    return train, val, syn, patients


def test_the_distinct_rule_matches_a_brute_force_reference_per_sample_and_per_training_image():
    train, val, syn, patients = population(0)
    margin = 0.5
    report = detect_copies(train, val, syn, rule="distinct", margin=margin, train_patients=patients, chunk_size=16)
    corr = 1.0 - cdist(train, syn, "correlation")  # [N_train, N_syn]
    tau = np.percentile((1.0 - cdist(train, val, "correlation")).max(axis=1), 95.0)
    nearest = corr.argmax(axis=0)
    owner = np.asarray(patients)
    rho1 = corr.max(axis=0)
    rho2 = np.where(owner[:, None] == owner[nearest][None, :], -np.inf, corr).max(axis=0)
    is_copy = (rho1 >= tau) & ((1 - rho1) <= margin**2 * (1 - rho2))
    copied = set(owner[nearest[is_copy]])
    memorized = (corr.max(axis=1) >= tau) & np.isin(owner, sorted(copied))
    np.testing.assert_allclose(report.nn_other_patient_corr.numpy(), rho2, atol=1e-12)
    np.testing.assert_array_equal(report.is_copy.numpy(), is_copy)
    np.testing.assert_array_equal(report.memorized.numpy(), memorized)
    # the data holds each case the definitions tell apart
    close_not_distinct = (rho1 >= tau) & ~is_copy
    assert is_copy.sum() >= 15 and close_not_distinct.sum() >= 5
    near_but_not_attributed = (corr.max(axis=1) >= tau) & ~memorized
    assert near_but_not_attributed.any()  # memorized under the paper's rule, not under distinct
    assert report.n_copies == int(is_copy.sum()) and report.n_mem == int(memorized.sum())
    # every patient with a distinct copy has a memorized image
    assert copied == {patients[i] for i in np.flatnonzero(memorized)}


def test_margin_one_flags_exactly_the_papers_copies():
    for seed in range(3):
        train, val, syn, patients = population(seed)
        for dtype in (np.float64, np.float32):
            inputs = [x.astype(dtype) for x in (train, val, syn)]
            paper = detect_copies(*inputs, rule="paper", train_patients=patients)
            lenient = detect_copies(*inputs, rule="distinct", margin=1.0, train_patients=patients)
            assert torch.equal(paper.is_copy, lenient.is_copy) and paper.n_copies == lenient.n_copies
            assert torch.equal(paper.is_close, lenient.is_close)
            assert not (lenient.memorized & ~paper.memorized).any()  # the per-image rule only asks attribution more


def test_other_patient_correlation_does_not_depend_on_the_chunk_size():
    train, val, syn, patients = population(1)
    train, val, syn = (torch.from_numpy(x).float() for x in (train, val, syn))
    reports = {
        chunk: detect_copies(train, val, syn, chunk_size=chunk, rule="distinct", margin=0.5, train_patients=patients)
        for chunk in (1, 7, 64, 1000)
    }
    base = reports[1000]
    assert 0 < base.n_copies < int(base.is_close.sum())
    for chunk, report in reports.items():
        torch.testing.assert_close(report.nn_other_patient_corr, base.nn_other_patient_corr, atol=1e-6, rtol=0)
        for name in ("is_copy", "memorized", "is_close"):
            assert torch.equal(getattr(report, name), getattr(base, name)), (chunk, name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rule": "strict"}, r"rule 'strict' is not one of paper, distinct"),
        ({"rule": "distinct", "margin": 0}, r"margin 0 must lie in \(0, 1\]"),
        ({"rule": "distinct", "margin": 1.5}, r"margin 1.5 must lie in \(0, 1\]"),
        ({"rule": "distinct", "margin": float("nan")}, r"margin nan must lie in \(0, 1\]"),
        ({"rule": "distinct", "margin": "0.5"}, r"margin '0.5' is not a number"),
        ({"rule": "distinct", "train_patients": ["a", "b"]}, r"train_patients has 2 ids for 6 training embeddings"),
    ],
)
def test_bad_rule_margin_or_patients_raise_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        detect_copies(TRAIN, VAL, TRAIN[:2], **kwargs)


def test_check_rule_names_the_option():
    assert RULES == ("paper", "distinct")
    with pytest.raises(InputError, match=r"^--memorization.rule 'strict' is not one of paper, distinct: "):
        check_rule("strict", 0.5, "--memorization.rule", "--memorization.margin")
    with pytest.raises(InputError, match=r"^--margin 2 must lie in \(0, 1\]"):
        check_rule("distinct", 2, "--rule", "--margin")
    assert check_rule("distinct", 1, "--rule", "--margin") == ("distinct", 1.0)


@pytest.mark.parametrize("rule", RULES)
def test_average_samples_stay_within_the_chance_interval_of_the_default_rule_only(rule):
    """Novel samples that are the mean of two training patients (a generator's "average" output) against the
    false-positive rate the chance level predicts for them; the paper's rule flags most of them."""
    generator = torch.Generator().manual_seed(0)
    train, val = torch.randn(200, 32, generator=generator), torch.randn(200, 32, generator=generator)
    train = train - train.mean(dim=1, keepdim=True)
    train = train / train.norm(dim=1, keepdim=True)  # both patients of an average weigh the same in it
    pairs = torch.randperm(200, generator=generator)[:160].view(80, 2)
    averages = train[pairs[:, 0]] + train[pairs[:, 1]] + 0.01 * torch.randn(80, 32, generator=generator)
    patients = [f"p{i}" for i in range(200)]
    exceedances = held_out_exceedances(train, val, 95.0, patients, rule=rule, margin=DEFAULT_MARGIN)
    low, high = chance_level(exceedances, len(averages)).null_frac_copies_ci
    observed = detect_copies(train, val, averages, rule=rule, margin=DEFAULT_MARGIN, train_patients=patients).frac_copies
    assert (observed <= high) == (rule == DEFAULT_RULE), (rule, observed, low, high)
