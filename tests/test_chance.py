"""Counts a hospital can trust: per patient, exact intervals, chance level and the detector's self-check."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from memwatch.errors import InputError
from memwatch.memorization import detect_copies as detect_copies_by_default_rule
from memwatch.memorization.chance import (
    chance_level,
    check_patients,
    detector_accuracy,
    prediction_interval,
    weak_detector_warning,
)
from memwatch.memorization.chance import (
    held_out_exceedances as held_out_exceedances_by_default_rule,
)
from memwatch.memorization.detect import linear_percentile, standardise
from memwatch.memorization.stats import binomial_interval, logged_scalars
from memwatch.memorization.summary import headline

# The chance level's arithmetic under the paper's rule unless a test names another
detect_copies = functools.partial(detect_copies_by_default_rule, rule="paper")
held_out_exceedances = functools.partial(held_out_exceedances_by_default_rule, rule="paper")

L = 16


def random_patients(n: int, generator: torch.Generator, length: int = L) -> torch.Tensor:
    """`n` embeddings of distinct "patients": independent random directions."""
    return torch.randn(n, length, generator=generator, dtype=torch.float64)


def orthogonal_patients(n: int, generator: torch.Generator, length: int = L) -> torch.Tensor:
    """`n` centred, mutually orthogonal unit embeddings: any two correlate 0 (up to rounding)."""
    rows = random_patients(n, generator, length)
    basis, _ = torch.linalg.qr((rows - rows.mean(dim=1, keepdim=True)).T)
    return basis.T


def unrelated_to(rows: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` random embeddings that correlate 0 with every row of `orthogonal_patients` output `rows`."""
    draws = random_patients(n, generator, rows.shape[1])
    draws = draws - draws.mean(dim=1, keepdim=True)
    return draws - (draws @ rows.T) @ rows


# --- per patient ---------------------------------------------------------------------------


@pytest.mark.parametrize("copied, images_memorized", [([0], 1), ([0, 1], 2)])
def test_a_patient_is_memorized_once_however_many_of_their_images_are(copied, images_memorized):
    generator = torch.Generator().manual_seed(0)
    # Built so that only the copies can pass τ (about 0.2, the best of 40 random held-out images): the
    # training images are orthogonal, so a copy correlates about 1 with its own and about 0.002 with the
    # others, and the novel images correlate 0 with all. With independent random training images, a
    # non-copied one passed τ by chance on one seed in six.
    train = orthogonal_patients(8, generator, 256)  # 4 patients, 2 images each
    patients = ["a", "a", "b", "b", "c", "c", "d", "d"]
    val = random_patients(40, generator, 256)
    syn = torch.cat([train[copied] + 1e-3 * random_patients(len(copied), generator, 256),
                     unrelated_to(train, 6, generator)])  # fmt: skip
    numbers = headline(detect_copies(train, val, syn), patients, None)
    assert numbers["n_mem"] == images_memorized
    assert numbers["n_mem_patients"] == 1 and numbers["frac_mem_patients"] == 1 / 4
    assert numbers["n_train_patients"] == 4 and numbers["frac_mem"] == images_memorized / 8
    low, high = numbers["frac_mem_patients_ci"]
    assert low < 1 / 4 < high


def test_intervals_are_logged_as_low_and_high():
    scalars = logged_scalars({"frac_mem": 0.25, "frac_mem_ci": [0.1, 0.4], "n_mem": 3, "method": "text"})
    assert scalars == {
        "memorization/frac_mem": 0.25,
        "memorization/frac_mem_low": 0.1,
        "memorization/frac_mem_high": 0.4,
        "memorization/n_mem": 3.0,
    }


# --- intervals -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, rate", [(200, 0.3), (400, 0.1)])
def test_intervals_cover_the_true_rate_at_the_stated_level(n, rate):
    draws = np.random.default_rng(0).binomial(n, rate, size=2000)
    covered = np.mean([low <= rate <= high for low, high in (binomial_interval(int(k), n) for k in draws)])
    assert abs(covered - 0.95) <= 0.02, covered


def test_intervals_shrink_with_n_and_reach_the_bounds():
    widths = [np.subtract(*binomial_interval(n // 4, n)[::-1]) for n in (16, 64, 256, 1024)]
    assert all(a > b for a, b in zip(widths, widths[1:], strict=False))
    assert binomial_interval(0, 16)[0] == 0.0 and binomial_interval(16, 16)[1] == 1.0
    assert binomial_interval(0, 16)[1] == pytest.approx(1 - 0.025 ** (1 / 16))  # exact at k = 0


# --- chance level ----------------------------------------------------------------------------


def test_leave_one_out_tau_is_tau_without_that_held_out_image():
    generator = torch.Generator().manual_seed(3)
    train, val = random_patients(30, generator), random_patients(12, generator)
    exceedances = held_out_exceedances(train, val, 90.0)
    correlations = standardise(train, "t") @ standardise(val, "v").T
    for j in range(len(val)):
        others = torch.cat([correlations[:, :j], correlations[:, j + 1 :]], dim=1)
        assert float(exceedances.loo_tau[j]) == pytest.approx(float(linear_percentile(others.amax(dim=1), 90.0)), abs=1e-12)
    assert exceedances.tau == pytest.approx(detect_copies(train, val, val, percentile=90.0).tau, abs=1e-12)
    flagged = correlations.amax(dim=0) >= exceedances.loo_tau
    assert torch.equal(exceedances.val_flagged, flagged)
    assert torch.equal(exceedances.train_counts, (correlations >= exceedances.loo_tau).sum(dim=1))


@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_leave_one_patient_out_tau_is_tau_without_any_image_of_that_patient(chunk_size):
    generator = torch.Generator().manual_seed(4)
    train, val = random_patients(40, generator), random_patients(15, generator)
    val_patients = ["a", "a", "a", "b", "c", "c", "d", "e", "e", "f", "g", "g", "g", "h", "i"]
    exceedances = held_out_exceedances(train, val, 90.0, chunk_size=chunk_size, val_patients=val_patients)
    correlations = standardise(train, "t") @ standardise(val, "v").T
    for j, patient in enumerate(val_patients):
        others = correlations[:, [k for k, q in enumerate(val_patients) if q != patient]]
        assert float(exceedances.loo_tau[j]) == pytest.approx(float(linear_percentile(others.amax(dim=1), 90.0)), abs=1e-12)
    one_each = held_out_exceedances(train, val, 90.0, val_patients=[str(j) for j in range(15)])
    assert torch.equal(one_each.loo_tau, held_out_exceedances(train, val, 90.0).loo_tau)
    with pytest.raises(ValueError, match="2 held-out patients"):
        held_out_exceedances(train, val, 90.0, val_patients=["a"] * 15)
    with pytest.raises(ValueError, match="14 patient ids for 15 held-out"):
        held_out_exceedances(train, val, 90.0, val_patients=val_patients[:-1])


def test_held_out_images_used_as_synthetic_score_within_the_estimated_null():
    inside, means = 0, []
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        train, val, stand_ins = random_patients(120, generator), random_patients(100, generator), random_patients(60, generator)
        chance = chance_level(held_out_exceedances(train, val, 95.0), len(stand_ins))
        observed = detect_copies(train, val, stand_ins)
        low, high = chance.null_frac_mem_ci
        inside += low <= observed.frac_mem <= high
        means.append((observed.frac_mem, chance.null_frac_mem, observed.frac_copies, chance.null_frac_copies))
    assert inside >= 17, inside
    observed_mem, null_mem, observed_copies, null_copies = np.mean(means, axis=0)
    assert null_mem == pytest.approx(observed_mem, abs=0.01)
    assert null_copies == pytest.approx(observed_copies, abs=0.02)
    assert 0.0 < null_mem < 0.2  # a copy-nobody generator scores above zero: chance is not 0


def test_chance_level_grows_with_the_number_of_synthetic_samples():
    generator = torch.Generator().manual_seed(5)
    exceedances = held_out_exceedances(random_patients(100, generator), random_patients(50, generator), 95.0)
    levels = [chance_level(exceedances, n).null_frac_mem for n in (10, 50, 200, 800)]
    assert all(a < b for a, b in zip(levels, levels[1:], strict=False)), levels
    assert "beta-binomial" in chance_level(exceedances, 200).method
    assert "exact subsets" in chance_level(exceedances, 50).method


def test_per_patient_chance_counts_a_patient_once():
    generator = torch.Generator().manual_seed(6)
    one = random_patients(40, generator)
    train = torch.cat([one, one + 1e-4 * torch.randn(40, L, generator=generator, dtype=torch.float64)])
    patients = [f"p{i:02d}" for i in range(40)] * 2  # every patient has two near-identical images
    exceedances = held_out_exceedances(train, random_patients(60, generator), 95.0, patients, chunk_size=7)
    assert len(exceedances.patient_counts) == 40
    per_image = exceedances.train_counts[:40].maximum(exceedances.train_counts[40:])
    assert torch.equal(exceedances.patient_counts, per_image)


# --- the detector checks itself ----------------------------------------------------------------


def test_a_perfect_embedder_has_sensitivity_one_and_a_random_one_scores_chance():
    generator = torch.Generator().manual_seed(7)
    train, val = random_patients(200, generator), random_patients(200, generator)
    exceedances = held_out_exceedances(train, val, 95.0)
    perfect = detector_accuracy(train[:100].clone(), train, exceedances)  # variation embedded exactly as its original
    assert perfect.sensitivity == 1.0 and perfect.n_positive == 100 and perfect.n_negative == 200
    random = detector_accuracy(random_patients(400, generator), train, exceedances)
    chance = 1.0 - random.specificity  # the share of held-out images flagged
    assert random.sensitivity < 0.2
    low, high = random.sensitivity_ci
    assert low <= chance <= high or abs(random.sensitivity - chance) < 0.03
    assert weak_detector_warning(random.sensitivity, random.n_positive, "--embedder").endswith("as --embedder")
    assert weak_detector_warning(perfect.sensitivity, perfect.n_positive, "--embedder") is None


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recorded, train, val, percentile, message",
    [
        (None, ["a"], ["b", "c"], 95.0, "1 training and 2 validation patient"),
        (None, ["a", "b"], ["c"], 95.0, "2 training and 1 validation patient"),
        (None, ["a", "b"], ["c", "d", "e"], 95.0, "lower the percentile to at most 66.67"),
        (["a", "c"], ["a", "b"], [f"v{i}" for i in range(20)] + ["c"], 95.0, "held out here"),
        (["x", "y"], ["a", "b"], [f"v{i}" for i in range(20)], 95.0, "none of them among"),
    ],
)
def test_data_and_embedders_that_would_bias_the_count_are_refused(recorded, train, val, percentile, message):
    with pytest.raises(InputError, match=message):
        check_patients(recorded, train, val, percentile, "--embedder", "--embedder")


def test_matching_patients_pass():
    check_patients(["a", "b", "z"], ["a", "b"], [f"v{i}" for i in range(20)], 95.0, "--embedder", "--embedder")


def test_held_out_images_between_two_patients_are_passed_under_the_distinct_rule():
    generator = torch.Generator().manual_seed(0)
    train = orthogonal_patients(40, generator, 256)
    # each held-out image mixes two training patients (weights 1 and 0.8 to 1): close to both, a copy of neither
    weights = 0.8 + 0.2 * torch.rand(20, 1, generator=generator, dtype=torch.float64)
    val = train[0::2] + weights * train[1::2] + 0.01 * random_patients(20, generator, 256)
    varied = train[:10] + 0.01 * random_patients(10, generator, 256)
    paper = held_out_exceedances(train, val, 80.0, rule="paper")
    distinct = held_out_exceedances(train, val, 80.0, rule="distinct", margin=0.5)
    assert paper.rule == "paper" and distinct.rule == "distinct" and distinct.margin == 0.5
    paper_check, distinct_check = detector_accuracy(varied, train, paper), detector_accuracy(varied, train, distinct)
    assert paper_check.specificity < 1.0  # the paper's rule flags some of them
    assert distinct_check.specificity > paper_check.specificity and distinct_check.specificity == 1.0
    assert distinct_check.sensitivity == paper_check.sensitivity == 1.0  # true copies stay copies
    assert int(distinct.train_counts.sum()) == int(distinct.patient_counts.sum()) == 0 < int(paper.train_counts.sum())
    assert chance_level(distinct, 20).null_frac_copies < chance_level(paper, 20).null_frac_copies


def test_under_the_distinct_rule_a_held_out_image_counts_only_for_its_nearest_patients_images():
    generator = torch.Generator().manual_seed(1)
    train = orthogonal_patients(40, generator, 256)
    # one held-out image near training images 0 (ρ 0.76) and 1 (ρ 0.64) and uncorrelated with the others; 30
    # random ones uncorrelated with images 0 and 1, which put τ near 0.2
    noise = unrelated_to(train, 1, generator)
    near = 0.6 * train[0] + 0.5 * train[1] + 0.1 * noise / noise.norm()
    others = random_patients(30, generator, 256)
    others = others - others.mean(dim=1, keepdim=True)
    others = others - (others @ train[:2].T) @ train[:2]
    val = torch.cat([near, others])
    grouped = ["p00", "p00", *(f"p{i:02d}" for i in range(2, 40))]  # images 0 and 1: one patient

    def counts(patients, rule, margin):
        found = held_out_exceedances(train, val, 95.0, patients, chunk_size=7, rule=rule, margin=margin)
        assert found.loo_tau[0] > 0.1
        first_two = found.patient_counts[found.train_patient_codes[:2]].tolist()
        return found.val_flagged[0].item(), found.train_counts[:2].tolist(), first_two

    assert counts(grouped, "paper", 0.5) == (True, [1, 1], [1, 1])
    assert counts(grouped, "distinct", 0.5) == (True, [1, 1], [1, 1])  # one patient's two images: distinct
    assert counts(None, "paper", 0.5) == (True, [1, 1], [1, 1])
    assert counts(None, "distinct", 0.5) == (False, [0, 0], [0, 0])  # two patients, d1 = 0.8 d2: not distinct
    assert counts(None, "distinct", 1.0) == (True, [1, 0], [1, 0])  # it counts for its nearest patient only


def test_a_chance_level_estimated_as_zero_still_predicts_false_positives_from_few_held_out_images():
    # 0 of 160 held-out images above τ does not make 0 of 96 novel samples certain; 0 of a million nearly does
    assert prediction_interval(0.0, 96) == (0.0, 0.0)
    few = prediction_interval(0.0, 96, estimated_from=160)
    many = prediction_interval(0.0, 96, estimated_from=1_000_000)
    assert few[0] == 0.0 and few[1] >= 1 / 96
    assert many == (0.0, 0.0)
    wide, narrow = prediction_interval(0.05, 96, estimated_from=160), prediction_interval(0.05, 96)
    assert wide[0] <= narrow[0] and wide[1] > narrow[1]
