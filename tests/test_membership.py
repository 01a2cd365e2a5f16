"""The membership statistics: AUC against a pairwise reference, its interval, and the control's halves."""

from __future__ import annotations

import numpy as np
import pytest

from memwatch.errors import InputError
from memwatch.memorization.membership import control_halves, membership_signal


def pairwise_auc(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x[:, None] > y[None]) + 0.5 * (x[:, None] == y[None])).mean())


@pytest.mark.parametrize(("m", "n"), [(12, 10), (50, 80), (200, 30)])
def test_auc_equals_the_pairwise_definition_with_ties(m, n):
    rng = np.random.default_rng(m * n)
    x, y = rng.integers(0, 6, m).astype(float), rng.integers(0, 5, n).astype(float)  # many ties
    signal = membership_signal(x, y)
    assert signal.auc == pytest.approx(pairwise_auc(x, y), abs=1e-12)
    assert signal.auc_ci[0] <= signal.auc <= signal.auc_ci[1]


def test_a_model_that_scores_training_images_higher_is_near_1_and_one_that_does_not_covers_half():
    rng = np.random.default_rng(0)
    held_out = rng.normal(size=100)
    remembered = membership_signal(rng.normal(loc=3.0, size=100), held_out)
    assert remembered.auc > 0.95 and remembered.auc_ci[0] > 0.9 and remembered.tpr_at_5fpr > 0.8
    alike = membership_signal(rng.normal(size=100), held_out)
    assert alike.auc_ci[0] < 0.5 < alike.auc_ci[1] and alike.tpr_at_5fpr < 0.2


def test_too_few_held_out_images_is_one_line_naming_the_option():
    with pytest.raises(InputError, match=r"give at least 10 held-out images \(--data.init_args.val_fraction\)"):
        membership_signal(np.arange(20.0), np.arange(9.0), option="--data.init_args.val_fraction")


def test_control_halves_are_disjoint_equal_and_seeded():
    first, second = control_halves(21, seed=3)
    assert len(first) == len(second) == 10 and not set(first) & set(second)
    assert all(np.array_equal(a, b) for a, b in zip(control_halves(21, seed=3), (first, second), strict=True))
