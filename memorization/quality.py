"""Sample quality beside memorization: Fréchet distance in embedder space, and MS-SSIM diversity.

`frechet_distance` compares Gaussian fits of synthetic and validation embeddings (the logged
`memorization/fd`); `ms_ssim_diversity` scores pairs of synthetic images (`memorization/ms_ssim`),
where a lower mean means more diverse samples, as in Dar et al., arXiv 2402.01054.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_ms_ssim

from memwatch.errors import InputError
from memwatch.memorization.arrays import as_real_tensor, check_finite

# MONAI's (Wang et al.'s) MS-SSIM weights, finest scale first; fewer scales use a renormalised prefix.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_DEFAULT_KERNEL = 11  # MONAI's default window, with its default sigma 1.5


def frechet_distance(syn: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two embedding sets, in float64.

    FD = ||mu_s - mu_r||^2 + tr(S_s) + tr(S_r) - 2 tr((S_s S_r)^(1/2)), with unbiased (N - 1)
    covariances, the quantity MONAI's `FIDMetric` computes. The trace of the square root is
    taken exactly without a matrix square root: with centred data X_s, X_r and their QR
    factors R_s, R_r, the eigenvalues of S_s S_r are the squared singular values of
    X_s X_r^T / sqrt((N_s - 1)(N_r - 1)), so tr((S_s S_r)^(1/2)) = ||R_s R_r^T||_* / sqrt((N_s - 1)(N_r - 1)).
    This stays exact and real when N < L makes both covariances singular. For identical sets
    rounding leaves about ±1e-15 × tr(S); negative results are clamped to 0.

    Hand-written rather than MONAI's `get_fid_score` (used as the reference in the tests): its
    scipy `sqrtm` raises "Imaginary component too high" on singular covariances of raw, large
    embeddings (N < L), fails for L = 1, returns small negative values for identical sets and
    costs seconds at L = 512.

    Args:
        syn: `[N_syn, L]` synthetic embeddings (torch tensor or numpy array), N_syn >= 2.
        ref: `[N_ref, L]` reference (validation) embeddings, N_ref >= 2.

    Returns:
        The distance, a finite float >= 0 (0 up to rounding for identical sets; `||mu_s - mu_r||^2` when one
        set is the other shifted by a constant vector).

    Raises:
        InputError: a set is not a 2-D real matrix, has fewer than 2 rows or NaN/inf entries,
            or the sets disagree on L.
    """
    syn_t = _as_embeddings(syn, "syn")
    ref_t = _as_embeddings(ref, "ref").to(syn_t.device)
    if syn_t.shape[1] != ref_t.shape[1]:
        raise InputError(
            f"embedding lengths differ (syn: L={syn_t.shape[1]}, ref: L={ref_t.shape[1]}); "
            "embed both sets with the same embedder"
        )
    with torch.no_grad():
        syn_c = syn_t - syn_t.mean(dim=0)
        ref_c = ref_t - ref_t.mean(dim=0)
        diff = syn_t.mean(dim=0) - ref_t.mean(dim=0)
        n_syn, n_ref = syn_t.shape[0], ref_t.shape[0]
        trace_syn = syn_c.square().sum() / (n_syn - 1)
        trace_ref = ref_c.square().sum() / (n_ref - 1)
        r_syn = torch.linalg.qr(syn_c, mode="r").R  # [min(N_syn, L), L]
        r_ref = torch.linalg.qr(ref_c, mode="r").R
        trace_sqrt = torch.linalg.svdvals(r_syn @ r_ref.T).sum() / ((n_syn - 1) * (n_ref - 1)) ** 0.5
        distance = diff.dot(diff) + trace_syn + trace_ref - 2.0 * trace_sqrt
    return max(float(distance), 0.0)


def ms_ssim_diversity(first: torch.Tensor | np.ndarray, second: torch.Tensor | np.ndarray) -> torch.Tensor:
    """MS-SSIM of each pair `(first[i], second[i])` of images in `[0, 1]` (data range 1), 2D or 3D.

    The diversity of a set of samples is the mean over disjoint pairs (see `diversity_pairs`):
    1 when the pairs are identical, lower for more diverse samples. Scores are per pair and
    independent of each other, so a caller may score pieces of a large set and average the
    concatenation. Scales and window follow `ms_ssim_settings` for the smallest spatial axis;
    MONAI's `compute_ms_ssim` (what `MultiScaleSSIMMetric` calls) does the work, in float32 on
    the inputs' device. Memory grows with `P × C × prod(spatial)`: score large 3D sets in pieces.

    Args:
        first: `[P, C, H, W]` or `[P, C, H, W, D]` images (torch tensor or numpy array).
        second: Images of the same shape; `second[i]` is compared with `first[i]`.

    Returns:
        `[P]` float32 scores in `[0, 1]` on `first`'s device; empty when P = 0.

    Raises:
        InputError: the shapes differ or are not `[P, C, *spatial]` with 2 or 3 spatial axes,
            an axis is shorter than 3, or a value is NaN/inf or outside `[0, 1]`.
    """
    first_t = _as_images(first, "first")
    second_t = _as_images(second, "second")
    if first_t.shape != second_t.shape:
        raise InputError(
            f"image pairs differ in shape (first: {list(first_t.shape)}, second: {list(second_t.shape)}); "
            "pass two batches of the same shape [P, C, *spatial]"
        )
    kernel_size, weights = ms_ssim_settings(first_t.shape[2:])
    if first_t.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=first_t.device)
    with torch.no_grad():
        scores = compute_ms_ssim(
            first_t.to(torch.float32),
            second_t.to(device=first_t.device, dtype=torch.float32),
            spatial_dims=first_t.ndim - 2,
            data_range=1.0,
            kernel_size=kernel_size,
            weights=weights,
        )
    return scores.reshape(-1)


def ms_ssim_settings(spatial_shape: Sequence[int]) -> tuple[int, tuple[float, ...]]:
    """Window size and per-scale weights of MS-SSIM for images of `spatial_shape`; scales = len(weights).

    Each scale halves the image and the window must fit the coarsest one (MONAI also demands
    `n // max(1, scales - 1)**2 >= kernel` of the smallest axis n). Rule: the most scales, up to 5,
    that fit MONAI's 11-voxel window; below 3 such scales (n < 44), 3 scales with the largest odd
    window that fits, and on tiny axes (n < 12) 2 or 1 scales; the window never shrinks below 3
    and keeps sigma 1.5. Weights are the first `scales` of `MS_SSIM_WEIGHTS` renormalised to sum 1.
    So 16×16 → 3 scales, window 3; 32×32 and 256×256×32 → 3 scales, window 7;
    64×64 → 3 scales, window 11; 128×128 → 4; 256×256 → 5 (MONAI's defaults).

    Args:
        spatial_shape: `(H, W)` or `(H, W, D)`.

    Returns:
        `(kernel_size, weights)`.

    Raises:
        InputError: an axis is shorter than 3 voxels.
    """
    n = min(int(s) for s in spatial_shape)

    def largest_window(scales: int) -> int:
        limit = min(_DEFAULT_KERNEL, n // 2 ** (scales - 1), n // max(1, scales - 1) ** 2)
        return limit if limit % 2 else limit - 1

    scales = next((s for s in (5, 4, 3) if largest_window(s) == _DEFAULT_KERNEL), None)
    if scales is None:
        scales = next((s for s in (3, 2, 1) if largest_window(s) >= 3), None)
    if scales is None:
        raise InputError(
            f"images of spatial shape {tuple(int(s) for s in spatial_shape)} are too small for MS-SSIM; "
            "every spatial axis needs at least 3 voxels"
        )
    total = sum(MS_SSIM_WEIGHTS[:scales])
    return largest_window(scales), tuple(w / total for w in MS_SSIM_WEIGHTS[:scales])


def diversity_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint pairs of `n` samples, sample 2k with sample 2k+1: `(first_index, second_index)`, each `[n // 2]`.

    With an odd `n` the last sample is left out. `ms_ssim_diversity(x[first], x[second])` scores them.

    Raises:
        InputError: `n` is not a whole number >= 0.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n={n!r} is not a number of samples; pass a whole number >= 0")
    first = torch.arange(0, 2 * (int(n) // 2), 2)
    return first, first + 1


def _as_embeddings(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """`x` as a float64 torch tensor, checked to be a finite 2-D matrix with at least 2 rows."""
    x = as_real_tensor(x, name, "embedding matrix", "[N, L]")
    if x.ndim != 2:
        raise InputError(f"`{name}` has shape {tuple(x.shape)}; expected a 2-D embedding matrix [N, L]")
    if x.shape[0] < 2 or x.shape[1] == 0:
        raise InputError(
            f"`{name}` has shape {tuple(x.shape)}; a Gaussian fit needs at least 2 rows and 1 column"
        )
    x = x.to(torch.float64)
    check_finite(x, name)
    return x


def _as_images(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """`x` as a floating-point torch tensor `[P, C, *spatial]` (2 or 3 spatial axes), finite and in `[0, 1]`."""
    x = as_real_tensor(x, name, "image batch", "[P, C, *spatial]")
    if x.ndim not in (4, 5) or x.shape[1] == 0:
        raise InputError(
            f"`{name}` has shape {tuple(x.shape)}; expected images [P, C, H, W] or [P, C, H, W, D] with C >= 1"
        )
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if x.numel():
        check_finite(x, name)
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise InputError(
                f"`{name}` has values in [{low:.4g}, {high:.4g}]; MS-SSIM expects [0, 1] (clip decoder output first)"
            )
    return x
