"""Copy detection (Dar et al. Algorithm 1): planted copies, the `>=` boundary, a scipy reference,
chunking, ties and bad input."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from memwatch.errors import InputError
from memwatch.memorization import CopyReport
from memwatch.memorization import detect_copies as detect_copies_by_default_rule

# This file checks the paper's Algorithm 1 against a reference implementation; the distinct rule is
# tests/test_copy_rule.py's.
detect_copies = functools.partial(detect_copies_by_default_rule, rule="paper")


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float = 0.5) -> np.ndarray:
    """Embeddings of a population: each sample near one of a few cluster centres."""
    pick = rng.integers(0, len(centres), size=n)
    return centres[pick] + spread * rng.standard_normal((n, centres.shape[1]))


def balanced_signs(rng: np.random.Generator, n: int, length: int = 16) -> np.ndarray:
    """Rows of ±1 with equal counts of each sign.

    Centred they stay ±1, normalised they are ±1/4 (L=16), so every Pearson correlation is
    a multiple of 1/4 computed exactly in float32 in any summation order: exact ties.
    """
    rows = np.tile(np.repeat([1.0, -1.0], length // 2), (n, 1))
    return rng.permuted(rows, axis=1).astype(np.float32)


def reference(train: np.ndarray, val: np.ndarray, syn: np.ndarray, percentile: float) -> dict:
    """Brute force in float64 with full scipy correlation matrices, as the authors compute it."""
    corr_syn = 1.0 - cdist(train.astype(np.float64), syn.astype(np.float64), "correlation")
    corr_val = 1.0 - cdist(train.astype(np.float64), val.astype(np.float64), "correlation")
    nn_val = corr_val.max(axis=1)
    tau = np.percentile(nn_val, percentile)
    nn_syn, nn_train = corr_syn.max(axis=1), corr_syn.max(axis=0)
    return {
        "tau": tau,
        "nn_val_corr": nn_val,
        "nn_syn_corr": nn_syn,
        "nn_syn_index": corr_syn.argmax(axis=1),  # first maximum: lowest index
        "nn_train_corr": nn_train,
        "nn_train_index": corr_syn.argmax(axis=0),
        "n_mem": int((nn_syn >= tau).sum()),
        "n_copies": int((nn_train >= tau).sum()),
    }


def test_planted_exact_and_augmented_copies_are_found_novel_samples_are_not():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 128))
    train, val = clustered(rng, 300, centres), clustered(rng, 300, centres)
    exact_src = np.arange(0, 40, 2)
    noisy_src = np.arange(100, 140, 2)
    exact = train[exact_src]
    noisy = train[noisy_src] + 0.05 * rng.standard_normal((len(noisy_src), 128))
    novel = rng.standard_normal((60, 128))
    syn = np.concatenate([exact, noisy, novel]).astype(np.float32)

    report = detect_copies(
        torch.from_numpy(train).float(), torch.from_numpy(val).float(), torch.from_numpy(syn)
    )

    planted = np.concatenate([exact_src, noisy_src])
    n_planted = len(planted)
    assert report.memorized[planted].all()
    assert report.is_copy[:n_planted].all()
    assert torch.equal(report.nn_train_index[:n_planted], torch.from_numpy(planted))
    assert not report.is_copy[n_planted:].any()
    assert report.n_copies == n_planted
    assert report.frac_copies == pytest.approx(n_planted / len(syn))
    assert report.frac_mem == pytest.approx(report.n_mem / len(train))

    only_novel = detect_copies(train, val, novel)
    assert only_novel.n_mem == 0
    assert only_novel.n_copies == 0


def test_report_fields_shapes_and_scalars():
    rng = np.random.default_rng(1)
    report = detect_copies(
        rng.standard_normal((30, 8)), rng.standard_normal((20, 8)), rng.standard_normal((12, 8))
    )
    assert isinstance(report, CopyReport)
    for name in ("nn_val_corr", "nn_syn_corr", "nn_syn_index", "memorized"):
        assert getattr(report, name).shape == (30,), name
    for name in ("nn_train_corr", "nn_train_index", "is_copy"):
        assert getattr(report, name).shape == (12,), name
    assert report.memorized.dtype == torch.bool and report.nn_syn_index.dtype == torch.int64
    scalars = report.scalars()
    assert set(scalars) == {"n_mem", "n_copies", "frac_mem", "frac_copies", "tau"}
    assert all(type(v) in (int, float) for v in scalars.values())
    assert report.percentile == 95.0


def test_correlation_equal_to_tau_counts():
    rng = np.random.default_rng(2)
    train, val, syn = balanced_signs(rng, 21), balanced_signs(rng, 30), balanced_signs(rng, 25)
    ref = reference(train, val, syn, 50.0)  # (21 - 1) * 0.5 = 10: τ is exactly the 11th smallest ρ_NN-val
    report = detect_copies(train, val, syn, percentile=50.0)

    assert report.tau == ref["tau"]
    at_tau = ref["nn_syn_corr"] == ref["tau"]
    copy_at_tau = ref["nn_train_corr"] == ref["tau"]
    assert at_tau.any() and copy_at_tau.any()  # the data really put samples on the boundary
    assert report.memorized[torch.from_numpy(at_tau)].all()
    assert report.is_copy[torch.from_numpy(copy_at_tau)].all()
    assert report.n_mem == ref["n_mem"] > int((ref["nn_syn_corr"] > ref["tau"]).sum())
    assert report.n_copies == ref["n_copies"] > int((ref["nn_train_corr"] > ref["tau"]).sum())


def test_correlation_just_below_tau_does_not_count():
    rng = np.random.default_rng(2)
    train, val, syn = balanced_signs(rng, 21), balanced_signs(rng, 30), balanced_signs(rng, 25)
    ordered = np.sort(reference(train, val, syn, 50.0)["nn_val_corr"])
    k = int(np.flatnonzero(ordered == ordered[10])[-1])  # last of the values equal to τ at 50%
    assert ordered[k + 1] > ordered[k]
    percentile = 100.0 * (k + 1e-3) / (len(ordered) - 1)  # τ a hair above ordered[k]
    report = detect_copies(train, val, syn, percentile=percentile)
    ref = reference(train, val, syn, percentile)

    assert ordered[k] < report.tau < ordered[k] + 1e-3
    below = ref["nn_syn_corr"] == ordered[k]
    copy_below = ref["nn_train_corr"] == ordered[k]
    assert below.any() and copy_below.any()
    assert not report.memorized[torch.from_numpy(below)].any()
    assert not report.is_copy[torch.from_numpy(copy_below)].any()
    assert report.n_mem == ref["n_mem"]
    assert report.n_copies == ref["n_copies"]


@pytest.mark.parametrize(
    ("n_train", "n_val", "n_syn", "length", "percentile"),
    [
        (50, 40, 30, 8, 95.0),
        (200, 150, 333, 32, 95.0),
        (97, 97, 11, 128, 80.0),
        (1, 3, 5, 4, 50.0),
        (64, 5, 64, 16, 99.9),
    ],
)
def test_matches_scipy_brute_force(n_train, n_val, n_syn, length, percentile):
    rng = np.random.default_rng(n_train * 1000 + n_syn)
    train = rng.standard_normal((n_train, length)) + rng.normal(
        size=(n_train, 1)
    )  # per-row offsets: centring matters
    val = rng.standard_normal((n_val, length))
    syn = np.concatenate(
        [
            train[: n_syn // 3] + 0.1 * rng.standard_normal((n_syn // 3, length)),
            rng.standard_normal((n_syn - n_syn // 3, length)),
        ]
    )
    ref = reference(train, val, syn, percentile)

    for inputs, tol in (
        ((train, val, syn), 1e-12),
        (tuple(x.astype(np.float32) for x in (train, val, syn)), 1e-6),
    ):
        report = detect_copies(*(torch.from_numpy(x) for x in inputs), percentile=percentile, chunk_size=16)
        assert report.tau == pytest.approx(ref["tau"], abs=tol)
        for name in ("nn_val_corr", "nn_syn_corr", "nn_train_corr"):
            np.testing.assert_allclose(getattr(report, name).numpy(), ref[name], atol=tol, err_msg=name)
        for name in ("nn_syn_index", "nn_train_index", "n_mem", "n_copies"):
            np.testing.assert_array_equal(np.asarray(getattr(report, name)), ref[name], err_msg=name)
        assert torch.equal(report.memorized, report.nn_syn_corr >= report.tau)
        assert torch.equal(report.is_copy, report.nn_train_corr >= report.tau)


def test_independent_of_chunk_size():
    rng = np.random.default_rng(3)
    train = torch.from_numpy(rng.standard_normal((150, 32))).float()
    val = torch.from_numpy(rng.standard_normal((120, 32))).float()
    syn = torch.cat(
        [
            train[:40] + 0.2 * torch.randn(40, 32, generator=torch.Generator().manual_seed(0)),
            torch.from_numpy(rng.standard_normal((60, 32))).float(),
        ]
    )
    reports = {chunk: detect_copies(train, val, syn, chunk_size=chunk) for chunk in (1, 7, 64, 150, 1000)}
    base = reports[1000]
    assert base.n_copies >= 40
    for chunk, report in reports.items():
        for name in ("nn_syn_index", "nn_train_index", "memorized", "is_copy"):
            assert torch.equal(getattr(report, name), getattr(base, name)), (chunk, name)
        for name in ("nn_val_corr", "nn_syn_corr", "nn_train_corr"):
            torch.testing.assert_close(
                getattr(report, name), getattr(base, name), atol=1e-6, rtol=0, msg=name
            )
        assert report.tau == pytest.approx(base.tau, abs=1e-6)
        assert (report.n_mem, report.n_copies) == (base.n_mem, base.n_copies)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 10_000])
def test_ties_resolve_to_lowest_index(chunk_size):
    rng = np.random.default_rng(4)
    train, val, syn = balanced_signs(rng, 90), balanced_signs(rng, 40), balanced_signs(rng, 70)
    train[61] = train[2]  # duplicate training rows in different chunks (for chunk_size < 59)
    syn[9] = syn[3] = train[2]  # two copies of it: the first wins
    ref = reference(train, val, syn, 95.0)
    report = detect_copies(train, val, syn, chunk_size=chunk_size)

    assert report.nn_train_index[3] == report.nn_train_index[9] == 2
    assert report.nn_syn_index[2] == report.nn_syn_index[61] == 3
    np.testing.assert_array_equal(report.nn_syn_index.numpy(), ref["nn_syn_index"])
    np.testing.assert_array_equal(report.nn_train_index.numpy(), ref["nn_train_index"])
    # the exact construction really produces ties beyond the planted ones
    assert (
        cdist(train, syn, "correlation") == cdist(train, syn, "correlation").min(axis=1, keepdims=True)
    ).sum() > 90


@pytest.mark.parametrize("shape", [(1, 1), (5, 127), (33, 128), (64, 129), (31, 257), (100, 1000)])
def test_two_stage_argmax_matches_first_maximum(shape):
    """The tiled arg-max helpers agree with numpy's first-maximum rule on blocks full of ties."""
    from memwatch.memorization.detect import _row_max, _update_column_max

    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    block = rng.integers(0, 4, size=shape).astype(np.float32)
    values, index = _row_max(torch.from_numpy(block))
    np.testing.assert_array_equal(index.numpy(), block.argmax(axis=1))
    np.testing.assert_array_equal(values.numpy(), block.max(axis=1))

    start = 1000  # block rows are training rows 1000...; earlier rows already hold some maxima
    best = rng.integers(0, 4, size=shape[1]).astype(np.float32)
    best_index = rng.integers(0, start, size=shape[1])
    new_best, new_index = torch.from_numpy(best.copy()), torch.from_numpy(best_index.copy())
    _update_column_max(torch.from_numpy(block), start, new_best, new_index)
    improves = block.max(axis=0) > best
    assert shape[1] == 1 or (improves.any() and (~improves).any())
    np.testing.assert_array_equal(new_best.numpy(), np.maximum(best, block.max(axis=0)))
    np.testing.assert_array_equal(
        new_index.numpy(), np.where(improves, start + block.argmax(axis=0), best_index)
    )


def test_float64_and_numpy_inputs():
    rng = np.random.default_rng(5)
    train, val = rng.standard_normal((40, 16)), rng.standard_normal((30, 16))
    syn = np.concatenate([train[:5], rng.standard_normal((10, 16))])

    from_numpy64 = detect_copies(train, val, syn)
    from_torch64 = detect_copies(*(torch.from_numpy(x) for x in (train, val, syn)))
    from_numpy32 = detect_copies(*(x.astype(np.float32) for x in (train, val, syn)))
    assert from_numpy64.nn_syn_corr.dtype == torch.float64
    assert from_numpy32.nn_syn_corr.dtype == torch.float32
    assert torch.equal(from_numpy64.nn_train_corr, from_torch64.nn_train_corr)
    for report in (from_numpy64, from_numpy32):
        assert report.is_copy[:5].all()
        assert torch.equal(report.nn_train_index[:5], torch.arange(5))
    assert torch.equal(from_numpy32.nn_syn_index, from_numpy64.nn_syn_index)
    mixed = detect_copies(train.astype(np.float32), torch.from_numpy(val), syn.astype(np.float32))
    assert mixed.nn_syn_corr.dtype == torch.float64  # any float64 input promotes the computation


def _ok() -> dict:
    rng = np.random.default_rng(6)
    return {
        "train": rng.standard_normal((10, 4)),
        "val": rng.standard_normal((8, 4)),
        "syn": rng.standard_normal((6, 4)),
    }


def _with(**changes) -> dict:
    return {**_ok(), **changes}


def _nan_in(name: str) -> dict:
    data = _ok()
    data[name][3, 1] = np.nan
    return data


def _constant_row_in_syn() -> dict:
    data = _ok()
    data["syn"][2] = 0.7
    return data


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (_with(train=np.zeros(4) + np.arange(4)), r"`train` has shape \(4,\); expected a 2-D"),
        (_with(syn=np.ones((2, 3, 4))), r"`syn` has shape \(2, 3, 4\); expected a 2-D"),
        (_with(val=np.ones((5, 3))), r"embedding lengths differ .*val: L=3"),
        (_with(syn=np.ones((0, 4))), r"`syn` has shape \(0, 4\); it needs at least one row"),
        (_with(train=np.ones((10, 0))), r"`train` has shape \(10, 0\)"),
        (_nan_in("train"), r"`train` has 1 NaN/inf entries \(first in row 3\)"),
        (_nan_in("val"), r"`val` has 1 NaN/inf"),
        (_with(syn=np.full((6, 4), np.inf)), r"`syn` has 24 NaN/inf"),
        (_constant_row_in_syn(), r"`syn` row 2 .* all L entries equal"),
        (_with(syn=[["a", "b"]]), r"`syn` is not a numeric matrix"),
        ({**_ok(), "percentile": 0}, r"percentile=0.0 is outside the open interval \(0, 100\)"),
        ({**_ok(), "percentile": 100.0}, r"percentile=100.0 is outside"),
        ({**_ok(), "percentile": -5}, r"percentile=-5.0 is outside"),
        ({**_ok(), "percentile": float("nan")}, r"percentile=nan is outside"),
        ({**_ok(), "percentile": "95"}, r"percentile='95' is not a number"),
        ({**_ok(), "chunk_size": 0}, r"chunk_size=0 must be >= 1"),
        ({**_ok(), "chunk_size": -3}, r"chunk_size=-3 must be >= 1"),
        ({**_ok(), "chunk_size": 2.5}, r"chunk_size=2.5 is not an integer"),
    ],
)
def test_bad_input_raises_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        detect_copies(**kwargs)


def test_package_imports_no_lightning():
    code = "import sys, memorization; bad = [m for m in sys.modules if m.split('.')[0] in {'lightning', 'pytorch_lightning', 'lightning_modules', 'callbacks'}]; print(bad); sys.exit(bool(bad))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
