"""Quality metrics: Fréchet distance against closed forms and MONAI, MS-SSIM diversity on phantoms, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_ms_ssim
from monai.metrics.fid import get_fid_score

from memwatch.datamodules.phantom import render_phantom
from memwatch.errors import InputError
from memwatch.memorization import frechet_distance, ms_ssim_diversity
from memwatch.memorization.quality import MS_SSIM_WEIGHTS, diversity_pairs, ms_ssim_settings


def whitened(rng: np.random.Generator, n: int, length: int, rank: int) -> np.ndarray:
    """`[n, length]` rows with zero column means whose sample covariance is exactly diag(1 × rank, 0 × rest)."""
    z = rng.standard_normal((n, rank))
    z -= z.mean(axis=0)
    q, _ = np.linalg.qr(z)  # orthonormal columns, still orthogonal to the ones vector
    out = np.zeros((n, length))
    out[:, :rank] = q * np.sqrt(n - 1)
    return out


def phantoms(ids: list[str], size: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(render_phantom(i, size)) for i in ids])


# --- Fréchet distance -------------------------------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero():
    x = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-10)  # against tr(S) + tr(S) = 32
    assert frechet_distance(x, x + 1e-3) == pytest.approx(16e-6, rel=1e-6)


@pytest.mark.parametrize("n, length", [(200, 8), (6, 32)], ids=["N>L", "N<L"])
def test_fd_of_a_pure_shift_is_the_squared_mean_difference(n, length):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, length))
    shift = rng.standard_normal(length)
    fd = frechet_distance(x + shift, x)
    assert fd == pytest.approx(float(shift @ shift), rel=1e-9)
    assert frechet_distance(x + 2 * shift, x) == pytest.approx(4 * fd, rel=1e-9)


@pytest.mark.parametrize(
    "n_syn, n_ref, length, rank", [(50, 30, 8, 8), (6, 9, 32, 5)], ids=["full", "singular"]
)
def test_fd_matches_the_closed_form_for_diagonal_covariances(n_syn, n_ref, length, rank):
    """Covariances diag(a²) and diag(b²), exactly: FD = ||mu_s - mu_r||² + sum((a - b)²), singular ones included."""
    rng = np.random.default_rng(2)
    a = rng.uniform(0.5, 3.0, length)
    b = rng.uniform(0.5, 3.0, length)
    mu_s, mu_r = rng.standard_normal(length), rng.standard_normal(length)
    syn = whitened(rng, n_syn, length, rank) * a + mu_s
    ref = whitened(rng, n_ref, length, rank) * b + mu_r
    a[rank:] = b[rank:] = 0.0
    expected = float(np.sum((mu_s - mu_r) ** 2) + np.sum((a - b) ** 2))
    assert frechet_distance(syn, ref) == pytest.approx(expected, rel=1e-9)


def test_fd_agrees_with_monai_where_monai_is_well_posed():
    g = torch.Generator().manual_seed(3)
    syn = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g)
    ref = torch.randn(250, 12, generator=g) + 0.5
    expected = float(get_fid_score(syn, ref))
    assert expected > 1.0
    assert frechet_distance(syn, ref) == pytest.approx(expected, rel=1e-8)


def test_fd_is_symmetric():
    g = torch.Generator().manual_seed(4)
    syn, ref = torch.randn(30, 10, generator=g), 2 * torch.randn(45, 10, generator=g) + 1
    assert frechet_distance(syn, ref) == pytest.approx(frechet_distance(ref, syn), rel=1e-12)


def test_fd_with_fewer_samples_than_dimensions_is_finite_and_scales_quadratically():
    """N < L makes both covariances singular; MONAI's sqrtm path raises on such raw, large embeddings."""
    g = torch.Generator().manual_seed(5)
    syn, ref = torch.randn(20, 128, generator=g), torch.randn(20, 128, generator=g)
    fd = frechet_distance(syn, ref)
    assert np.isfinite(fd) and fd > 0.0
    assert frechet_distance(1e3 * syn, 1e3 * ref) == pytest.approx(1e6 * fd, rel=1e-9)
    assert frechet_distance(syn[:2], ref[:3]) > 0.0  # the fewest rows allowed
    # L = 1, where MONAI's covariance squeezes to a scalar and its matrix product fails.
    assert frechet_distance(syn[:, :1], ref[:, :1]) > 0.0


@pytest.mark.parametrize(
    "syn, ref, match",
    [
        (torch.zeros(5), torch.zeros(5, 3), "2-D"),
        (torch.randn(5, 3), torch.randn(5, 4), "lengths differ"),
        (torch.randn(1, 3), torch.randn(5, 3), "at least 2 rows"),
        (torch.randn(5, 3), torch.tensor([[0.0, 1.0, float("nan")]] * 5), "NaN"),
        (torch.randn(5, 3), torch.full((5, 3), float("inf")), "NaN/inf"),
        (torch.ones(5, 3, dtype=torch.bool), torch.randn(5, 3), "dtype"),
    ],
)
def test_fd_rejects_bad_input_with_a_one_line_message(syn, ref, match):
    with pytest.raises(InputError, match=match) as info:
        frechet_distance(syn, ref)
    assert "\n" not in str(info.value)


# --- MS-SSIM diversity ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (32, 32, 16)], ids=["16", "32", "32x32x16"])
def test_ms_ssim_is_one_for_identical_images_and_low_against_noise(size):
    images = phantoms(["p0", "p1"], size)
    same = ms_ssim_diversity(images, images.clone())
    assert same.shape == (2,) and same.dtype == torch.float32
    assert torch.allclose(same, torch.ones(2), atol=1e-5)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(6))
    assert float(ms_ssim_diversity(images, noise).max()) < 0.3


@pytest.mark.parametrize("size", [(32, 32), (32, 32, 16)], ids=["2D", "3D"])
def test_identical_pairs_score_higher_than_different_patients(size):
    a = phantoms([f"patient-{i}" for i in range(4)], size)
    b = phantoms([f"patient-{i}" for i in range(4, 8)], size)
    different = ms_ssim_diversity(a, b)
    assert float(different.max()) < 0.95
    assert float(ms_ssim_diversity(a, a).mean()) > float(different.mean()) + 0.1
    # A batch mixing copies and distinct patients is more similar (less diverse) than distinct patients only.
    half_copied = torch.cat([a[:2], b[2:]])
    assert float(ms_ssim_diversity(a, half_copied).mean()) > float(different.mean())


def test_scores_are_per_pair_so_pieces_can_be_averaged_later():
    a = phantoms([f"a{i}" for i in range(5)], (16, 16))
    b = phantoms([f"b{i}" for i in range(5)], (16, 16))
    whole = ms_ssim_diversity(a, b)
    pieces = torch.cat([ms_ssim_diversity(a[:2], b[:2]), ms_ssim_diversity(a[2:], b[2:])])
    assert torch.allclose(whole, pieces, atol=1e-6)


def test_empty_batch_gives_empty_scores():
    empty = torch.zeros(0, 1, 16, 16)
    out = ms_ssim_diversity(empty, empty)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "shape, window, scales",
    [
        ((16, 16), 3, 3),
        ((32, 32), 7, 3),
        ((256, 256, 32), 7, 3),
        ((64, 64), 11, 3),
        ((128, 128), 11, 4),
        ((256, 256), 11, 5),
    ],
)
def test_settings_follow_the_smallest_axis(shape, window, scales):
    kernel_size, weights = ms_ssim_settings(shape)
    assert (kernel_size, len(weights)) == (window, scales)
    assert sum(weights) == pytest.approx(1.0)
    assert np.allclose(
        np.array(weights) / weights[0], np.array(MS_SSIM_WEIGHTS[:scales]) / MS_SSIM_WEIGHTS[0]
    )


@pytest.mark.parametrize("n", [3, 5, 6, 11, 12, 16, 43, 44, 87, 88, 175, 176])
def test_settings_are_accepted_by_monai_at_the_boundaries(n):
    """Every chosen window fits the coarsest scale and passes MONAI's own size check."""
    kernel_size, weights = ms_ssim_settings((n, n + 1))
    assert kernel_size % 2 == 1 and 3 <= kernel_size <= 11
    assert n // 2 ** (len(weights) - 1) >= kernel_size
    image = torch.rand(1, 1, n, n + 1, generator=torch.Generator().manual_seed(n))
    score = compute_ms_ssim(image, image, spatial_dims=2, kernel_size=kernel_size, weights=weights)
    assert float(score) == pytest.approx(1.0, abs=1e-5)


def test_diversity_pairs_pair_2k_with_2k_plus_1():
    first, second = diversity_pairs(5)
    assert first.tolist() == [0, 2] and second.tolist() == [1, 3]
    assert diversity_pairs(0)[0].numel() == 0 and diversity_pairs(1)[1].numel() == 0
    with pytest.raises(InputError):
        diversity_pairs(-1)


@pytest.mark.parametrize(
    "first, second, match",
    [
        (torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 17), "differ in shape"),
        (torch.zeros(2, 16, 16), torch.zeros(2, 16, 16), r"\[P, C, H, W\]"),
        (torch.zeros(2, 1, 16, 16), torch.full((2, 1, 16, 16), 1.5), r"\[0, 1\]"),
        (torch.zeros(2, 1, 16, 16), torch.full((2, 1, 16, 16), float("nan")), "NaN"),
        (torch.zeros(2, 1, 16, 2), torch.zeros(2, 1, 16, 2), "at least 3 voxels"),
    ],
)
def test_ms_ssim_rejects_bad_input_with_a_one_line_message(first, second, match):
    with pytest.raises(InputError, match=match) as info:
        ms_ssim_diversity(first, second)
    assert "\n" not in str(info.value)
