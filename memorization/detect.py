"""Copy detection: which training samples a generative model reproduced, and which samples are copies.

Implements Algorithm 1 of Dar et al., "Unconditional latent diffusion models memorize patient
imaging data", arXiv 2402.01054, on embedding matrices, with exact nearest neighbours computed
block by block so that memory grows as O(chunk × N), never O(N²).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

from errors import InputError
from memorization.checks import as_real_tensor, check_finite


@dataclass(frozen=True)
class CopyReport:
    """The outcome of `detect_copies`; per-sample tensors live on the CPU.

    Attributes:
        tau: Threshold τ, the `percentile`-th percentile of `nn_val_corr`.
        nn_val_corr: `[N_train]` Pearson correlation of each training sample with its nearest
            validation sample (ρ_NN-val).
        nn_syn_corr: `[N_train]` correlation with the nearest synthetic sample (ρ_NN-syn).
        nn_syn_index: `[N_train]` int64 row of that synthetic sample in `syn`.
        memorized: `[N_train]` bool, `nn_syn_corr >= tau`.
        nn_train_corr: `[N_syn]` correlation of each synthetic sample with its nearest training sample.
        nn_train_index: `[N_syn]` int64 row of that training sample in `train`.
        is_copy: `[N_syn]` bool, `nn_train_corr >= tau`.
        n_mem: Number of memorized training samples.
        n_copies: Number of synthetic samples that are copies.
        frac_mem: `n_mem / N_train`.
        frac_copies: `n_copies / N_syn`.
        percentile: The percentile that set `tau`.
    """

    tau: float
    nn_val_corr: torch.Tensor
    nn_syn_corr: torch.Tensor
    nn_syn_index: torch.Tensor
    memorized: torch.Tensor
    nn_train_corr: torch.Tensor
    nn_train_index: torch.Tensor
    is_copy: torch.Tensor
    n_mem: int
    n_copies: int
    frac_mem: float
    frac_copies: float
    percentile: float

    def scalars(self) -> dict[str, float | int]:
        """The headline numbers as plain Python values: n_mem, n_copies, frac_mem, frac_copies, tau."""
        return {
            "n_mem": self.n_mem,
            "n_copies": self.n_copies,
            "frac_mem": self.frac_mem,
            "frac_copies": self.frac_copies,
            "tau": self.tau,
        }


def detect_copies(
    train: torch.Tensor | np.ndarray,
    val: torch.Tensor | np.ndarray,
    syn: torch.Tensor | np.ndarray,
    percentile: float = 95.0,
    chunk_size: int = 4096,
) -> CopyReport:
    """Find memorized training samples and synthetic copies (Dar et al., arXiv 2402.01054, Algorithm 1).

    Correlations are Pearson's: each embedding is centred over its L entries and L2-normalised,
    then blocks of the train × syn and train × val correlation matrices are matrix products.
    Each block of `chunk_size` training rows × N_syn is computed once and yields both
    directions: its row maxima (training → nearest synthetic) and running column maxima
    (synthetic → nearest training). The train × val blocks give only row maxima. τ is the
    `percentile`-th percentile of ρ_NN-val with linear interpolation (numpy's default);
    a training sample is memorized, and a synthetic sample is a copy, when its nearest-neighbour
    correlation is `>= τ`.

    Ties between equal correlations go to the lowest index, whatever `chunk_size` is.
    The work runs on `train`'s device (the other matrices are moved there) in float64 when any
    input is float64, else in float32; τ is computed and compared in that same precision.

    Args:
        train: `[N_train, L]` training embeddings (torch tensor or numpy array).
        val: `[N_val, L]` embeddings of held-out real samples, which set τ.
        syn: `[N_syn, L]` embeddings of synthetic samples.
        percentile: Percentile of ρ_NN-val that sets τ, in the open interval (0, 100);
            the paper uses 95.
        chunk_size: Training rows per block; peak extra memory is about
            `chunk_size × max(N_syn, N_val)` values.

    Returns:
        A `CopyReport` with per-training-sample `[N_train]` and per-synthetic-sample `[N_syn]`
        tensors on the CPU and plain Python scalars.

    Raises:
        InputError: a matrix is not 2-D, is empty, has NaN/inf or a constant row, the matrices
            disagree on L, or `percentile` / `chunk_size` is out of range.
    """
    percentile = _check_percentile(percentile)
    chunk_size = _check_chunk_size(chunk_size)
    train_t, val_t, syn_t = (
        _as_matrix(x, name) for x, name in ((train, "train"), (val, "val"), (syn, "syn"))
    )
    widths = {name: x.shape[1] for x, name in ((train_t, "train"), (val_t, "val"), (syn_t, "syn"))}
    if len(set(widths.values())) > 1:
        raise InputError(
            f"embedding lengths differ ({', '.join(f'{k}: L={v}' for k, v in widths.items())}); "
            "embed all three sets with the same embedder"
        )
    dtype = torch.float64 if torch.float64 in (train_t.dtype, val_t.dtype, syn_t.dtype) else torch.float32
    device = train_t.device

    with torch.no_grad():
        train_n = _standardise(train_t.to(device=device, dtype=dtype), "train")
        val_n = _standardise(val_t.to(device=device, dtype=dtype), "val")
        syn_n = _standardise(syn_t.to(device=device, dtype=dtype), "syn")
        nn_val_corr, nn_syn_corr, nn_syn_index, nn_train_corr, nn_train_index = _nearest_neighbours(
            train_n, val_n, syn_n, chunk_size
        )
        tau = _percentile(nn_val_corr, percentile)
        memorized = nn_syn_corr >= tau
        is_copy = nn_train_corr >= tau

    n_train, n_syn = train_n.shape[0], syn_n.shape[0]
    n_mem = int(memorized.sum())
    n_copies = int(is_copy.sum())
    return CopyReport(
        tau=float(tau),
        nn_val_corr=nn_val_corr.cpu(),
        nn_syn_corr=nn_syn_corr.cpu(),
        nn_syn_index=nn_syn_index.cpu(),
        memorized=memorized.cpu(),
        nn_train_corr=nn_train_corr.cpu(),
        nn_train_index=nn_train_index.cpu(),
        is_copy=is_copy.cpu(),
        n_mem=n_mem,
        n_copies=n_copies,
        frac_mem=n_mem / n_train,
        frac_copies=n_copies / n_syn,
        percentile=percentile,
    )


def nearest_correlation(queries: torch.Tensor, reference: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """`[N_q]` Pearson correlation of each row of `queries` `[N_q, L]` with its nearest row of `reference` `[N_r, L]`.

    The score `detect_copies` compares with τ (`nn_train_corr` when `reference` is the training
    set), in float64; memory O(chunk_size × N_r).
    """
    if len(queries) == 0:
        return torch.empty(0, device=queries.device)
    reference = _standardise(_as_matrix(reference, "reference").to(torch.float64), "reference")
    queries = _standardise(_as_matrix(queries, "queries").to(device=reference.device, dtype=torch.float64), "queries")
    return torch.cat([(rows @ reference.T).amax(dim=1) for rows in queries.split(chunk_size)])


def _nearest_neighbours(
    train: torch.Tensor, val: torch.Tensor, syn: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, ...]:
    """Exact nearest neighbours by dot product of standardised rows, one block of training rows at a time."""
    n_train, n_val, n_syn = train.shape[0], val.shape[0], syn.shape[0]
    kwargs = {"device": train.device}
    nn_val_corr = torch.empty(n_train, dtype=train.dtype, **kwargs)
    nn_syn_corr = torch.empty(n_train, dtype=train.dtype, **kwargs)
    nn_syn_index = torch.empty(n_train, dtype=torch.int64, **kwargs)
    nn_train_corr = torch.full((n_syn,), -math.inf, dtype=train.dtype, **kwargs)
    nn_train_index = torch.zeros(n_syn, dtype=torch.int64, **kwargs)
    # One reused buffer for every block: no allocation (and no page faults) per block.
    rows_per_block = min(chunk_size, n_train)
    buffer = torch.empty(rows_per_block * max(n_syn, n_val), dtype=train.dtype, **kwargs)

    for start in range(0, n_train, chunk_size):
        rows = train[start : start + chunk_size]
        stop = start + rows.shape[0]
        block = buffer[: rows.shape[0] * n_syn].view(rows.shape[0], n_syn)
        torch.mm(rows, syn.T, out=block)
        nn_syn_corr[start:stop], nn_syn_index[start:stop] = _row_max(block)
        _update_column_max(block, start, nn_train_corr, nn_train_index)

        block = buffer[: rows.shape[0] * n_val].view(rows.shape[0], n_val)
        torch.mm(rows, val.T, out=block)
        torch.amax(block, dim=1, out=nn_val_corr[start:stop])
    return nn_val_corr, nn_syn_corr, nn_syn_index, nn_train_corr, nn_train_index


# Arg-max in two stages, because torch's max-with-index reductions run 3-5x slower than `amax`
# on CPU: the maximum of each tile (fast), then the index inside the winning tile only.
_ROW_TILE = 128  # columns per tile when looking for each row's maximum
_COLUMN_TILE = 32  # rows per tile when looking for each column's maximum


def _row_max(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`block.max(dim=1)` for a contiguous `[m, n]` block: values and lowest index of each row's maximum."""
    n = block.shape[1]
    tile_max = _tile_max(block, _ROW_TILE, dim=1)  # [m, ceil(n / tile)]
    best_tile = tile_max.argmax(dim=1)  # first tile holding the maximum
    cols = best_tile[:, None] * _ROW_TILE + torch.arange(_ROW_TILE, device=block.device)
    # Past the end of a short last tile, clamping repeats column n-1, which already came first.
    candidates = block.gather(1, cols.clamp_(max=n - 1))
    values, within = candidates.max(dim=1)
    return values, best_tile * _ROW_TILE + within


def _update_column_max(block: torch.Tensor, start: int, best: torch.Tensor, best_index: torch.Tensor) -> None:
    """Fold the column maxima of block rows `start...` into the running `best`/`best_index` in place.

    Strict `>`: an equal value in a later block never displaces a lower (earlier) training index.
    Indices are looked up only for the columns that improve, typically few after the first blocks.
    """
    m = block.shape[0]
    tile_max = _tile_max(block, _COLUMN_TILE, dim=0)  # [ceil(m / tile), n]
    cols = (tile_max.amax(dim=0) > best).nonzero().squeeze(1)
    if cols.numel() == 0:
        return
    sub = tile_max[:, cols]
    best_tile = sub.argmax(dim=0)  # first tile holding the maximum
    rows = best_tile * _COLUMN_TILE + torch.arange(_COLUMN_TILE, device=block.device)[:, None]
    candidates = block[rows.clamp_(max=m - 1), cols]  # clamped repeats of row m-1 come after it
    values, within = candidates.max(dim=0)
    best[cols] = values
    best_index[cols] = start + best_tile * _COLUMN_TILE + within


def _tile_max(block: torch.Tensor, tile: int, dim: int) -> torch.Tensor:
    """Maxima of runs of `tile` consecutive entries along `dim` of a 2-D block (the last run may be shorter)."""
    size = block.shape[dim]
    full = size // tile
    parts = []
    if full:  # splitting one dimension is a view, never a copy
        parts.append(block.narrow(dim, 0, full * tile).unflatten(dim, (full, tile)).amax(dim=dim + 1))
    if size > full * tile:
        parts.append(block.narrow(dim, full * tile, size - full * tile).amax(dim=dim, keepdim=True))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def _percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """numpy's default (linear) percentile of a 1-D tensor, in its own dtype.

    Written out rather than `torch.quantile`, which refuses inputs above 2**24 elements.
    """
    ordered = torch.sort(values).values
    position = (ordered.numel() - 1) * (percentile / 100.0)
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return torch.lerp(ordered[low], ordered[high], position - low)


def _standardise(x: torch.Tensor, name: str) -> torch.Tensor:
    """Centre each row over its L entries and scale it to unit L2 norm, so dot products are Pearson's r."""
    centred = x - x.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
    constant = (norms == 0).squeeze(1)
    if bool(constant.any()):
        row = int(constant.nonzero()[0, 0])
        raise InputError(
            f"`{name}` row {row} (and {int(constant.sum()) - 1} more) has all L entries equal, so its "
            "Pearson correlation is undefined; check the embedder (a collapsed embedder outputs constants)"
        )
    return centred / norms


def _as_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """`x` as a floating-point torch tensor, checked to be a non-empty finite 2-D matrix."""
    x = as_real_tensor(x, name, "matrix", "[N, L]")
    if x.ndim != 2:
        raise InputError(f"`{name}` has shape {tuple(x.shape)}; expected a 2-D embedding matrix [N, L]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"`{name}` has shape {tuple(x.shape)}; it needs at least one row and one column")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    check_finite(x, name)
    return x


def _check_percentile(percentile: float) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.integer, np.floating)):
        raise InputError(f"percentile={percentile!r} is not a number; pass a value in (0, 100), e.g. 95")
    percentile = float(percentile)
    if not 0.0 < percentile < 100.0:
        raise InputError(f"percentile={percentile} is outside the open interval (0, 100); the paper uses 95")
    return percentile


def _check_chunk_size(chunk_size: int) -> int:
    try:
        if isinstance(chunk_size, bool):
            raise TypeError
        chunk_size = operator.index(chunk_size)
    except TypeError:
        raise InputError(
            f"chunk_size={chunk_size!r} is not an integer; pass a whole number >= 1, e.g. 4096"
        ) from None
    if chunk_size < 1:
        raise InputError(f"chunk_size={chunk_size} must be >= 1, e.g. 4096")
    return chunk_size
