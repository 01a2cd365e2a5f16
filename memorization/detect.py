"""Copy detection: which training samples a generative model reproduced, and which samples are copies.

Implements Algorithm 1 of Dar et al., "Unconditional latent diffusion models memorize patient
imaging data", arXiv 2402.01054, on embedding matrices, with exact nearest neighbours computed
block by block so that memory grows as O(chunk × N), never O(N²).

Two copy rules (`RULES`):

- `paper`: a synthetic sample is a copy when its correlation ρ1 with the nearest training image is `≥ τ`.
- `distinct`: also, it must be clearly nearer to one patient than to any other (after Gu et al., TMLR
  2025, whose nearest training image is less than a third as far as the second). With P1 the patient
  of the nearest training image and ρ2 the best correlation with an image of any other patient, and
  d = sqrt(2(1 − ρ)) the distance between standardised embeddings, a copy needs `d1 ≤ margin · d2`,
  i.e. `(1 − ρ1) ≤ margin² (1 − ρ2)`. An "average" sample close to many patients at once passes τ
  but is a copy of none of them. A tie between two patients (ρ1 = ρ2) is never distinct for
  `margin < 1`; `margin = 1` accepts every copy the paper's rule accepts. Several images of one
  patient near a sample do not make it less distinct: the rule compares patients, not images.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memwatch.errors import InputError
from memwatch.memorization.arrays import as_real_tensor, check_finite

RULES = ("paper", "distinct")
DEFAULT_RULE = "distinct"
DEFAULT_MARGIN = (
    0.75  # the distinct rule's d1 ≤ margin · d2; chosen by bench/detector_quality.py (BENCHMARKS.md)
)
# ρ2 where the training set has no patient other than P1: the lowest correlation there is, so the
# sample counts as distinct unless it is far from P1 too (1 − ρ1 > 2 margin²). A number, not -inf:
# it goes into pairs.csv.
NO_OTHER_PATIENT = -1.0


@dataclass(frozen=True)
class CopyReport:
    """The outcome of `detect_copies`; per-sample tensors live on the CPU.

    Attributes:
        tau: Threshold τ, the `percentile`-th percentile of `nn_val_corr`.
        nn_val_corr: `[N_train]` Pearson correlation of each training sample with its nearest
            validation sample (ρ_NN-val).
        nn_syn_corr: `[N_train]` correlation with the nearest synthetic sample (ρ_NN-syn).
        nn_syn_index: `[N_train]` int64 row of that synthetic sample in `syn`.
        memorized: `[N_train]` bool. Rule `paper`: `nn_syn_corr >= tau`. Rule `distinct`: that, and the
            image's patient is the nearest patient (P1) of at least one copy, so every patient with a
            copy has a memorized image and a patient only near "average" samples has none.
        nn_train_corr: `[N_syn]` correlation of each synthetic sample with its nearest training sample (ρ1).
        nn_train_index: `[N_syn]` int64 row of that training sample in `train`.
        is_copy: `[N_syn]` bool, a copy under `rule`: `is_close`, and under `distinct` also
            `(1 − ρ1) ≤ margin² (1 − ρ2)` (and ρ1 > ρ2 when `margin < 1`).
        n_mem: Number of memorized training samples.
        n_copies: Number of synthetic samples that are copies.
        frac_mem: `n_mem / N_train`.
        frac_copies: `n_copies / N_syn`.
        percentile: The percentile that set `tau`.
        rule: The copy rule, one of `RULES`.
        margin: The `distinct` rule's margin; `None` under `paper`.
        nn_other_patient_corr: `[N_syn]` ρ2, the best correlation with a training image of a patient
            other than the nearest one's (`NO_OTHER_PATIENT` = -1.0 where there is none); computed under
            `distinct` only (it takes a second pass), `None` under `paper`.
        is_close: `[N_syn]` bool, `nn_train_corr >= tau`: the paper's flag, whichever rule is in use.
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
    rule: str
    margin: float | None
    nn_other_patient_corr: torch.Tensor | None
    is_close: torch.Tensor

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
    *,
    rule: str = DEFAULT_RULE,
    margin: float = DEFAULT_MARGIN,
    train_patients: Sequence[str] | None = None,
) -> CopyReport:
    """Find memorized training samples and synthetic copies (Dar et al., arXiv 2402.01054, Algorithm 1).

    Correlations are Pearson's: each embedding is centred over its L entries and L2-normalised,
    then blocks of the train × syn and train × val correlation matrices are matrix products.
    Each block of `chunk_size` training rows × N_syn is computed once and yields both
    directions: its row maxima (training → nearest synthetic) and running column maxima
    (synthetic → nearest training). The train × val blocks give only row maxima. τ is the
    `percentile`-th percentile of ρ_NN-val with linear interpolation (numpy's default);
    a training sample is memorized, and a synthetic sample is a copy, when its nearest-neighbour
    correlation is `>= τ`. Under `rule="distinct"` a second pass over the same blocks, with each
    column's entries of its nearest patient masked, gives ρ2, and a copy must also be distinct
    (module docstring); memory stays O(chunk × N).

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
        rule: `paper` (ρ1 ≥ τ) or `distinct` (also d1 ≤ margin · d2); see the module docstring.
        margin: The `distinct` rule's margin, in (0, 1]; ignored under `paper`.
        train_patients: The patient of each training row (default: every row its own patient).

    Returns:
        A `CopyReport` with per-training-sample `[N_train]` and per-synthetic-sample `[N_syn]`
        tensors on the CPU and plain Python scalars.

    Raises:
        InputError: a matrix is not 2-D, is empty, has NaN/inf or a constant row, the matrices
            disagree on L, `percentile` / `chunk_size` / `rule` / `margin` is out of range, or
            `train_patients` does not give one patient per training row.
    """
    percentile = check_percentile(percentile)
    chunk_size = _check_chunk_size(chunk_size)
    rule, margin = check_rule(rule, margin)
    train_t, val_t, syn_t = (as_matrix(x, name) for x, name in ((train, "train"), (val, "val"), (syn, "syn")))
    widths = {name: x.shape[1] for x, name in ((train_t, "train"), (val_t, "val"), (syn_t, "syn"))}
    if len(set(widths.values())) > 1:
        raise InputError(
            f"embedding lengths differ ({', '.join(f'{k}: L={v}' for k, v in widths.items())}); "
            "embed all three sets with the same embedder"
        )
    dtype = torch.float64 if torch.float64 in (train_t.dtype, val_t.dtype, syn_t.dtype) else torch.float32
    device = train_t.device
    patient_of = patient_codes(train_patients, train_t.shape[0]).to(device)

    with torch.no_grad():
        train_n = standardise(train_t.to(device=device, dtype=dtype), "train")
        val_n = standardise(val_t.to(device=device, dtype=dtype), "val")
        syn_n = standardise(syn_t.to(device=device, dtype=dtype), "syn")
        nn_val_corr, nn_syn_corr, nn_syn_index, nn_train_corr, nn_train_index = _nearest_neighbours(
            train_n, val_n, syn_n, chunk_size
        )
        tau = linear_percentile(nn_val_corr, percentile)
        memorized = nn_syn_corr >= tau
        is_close = nn_train_corr >= tau
        is_copy, other = is_close.clone(), None
        if rule == "distinct":
            nearest_patient = patient_of[nn_train_index]
            other = _other_patient_corr(train_n, syn_n, patient_of, nearest_patient, chunk_size)
            is_copy = is_close & is_distinct(nn_train_corr, other, margin)
            copied = torch.zeros(int(patient_of.max()) + 1, dtype=torch.bool, device=device)
            copied[nearest_patient[is_copy]] = True
            memorized = memorized & copied[patient_of]

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
        rule=rule,
        margin=margin if rule == "distinct" else None,
        nn_other_patient_corr=other.cpu() if other is not None else None,
        is_close=is_close.cpu(),
    )


def check_rule(
    rule: str, margin: float, rule_option: str = "rule", margin_option: str = "margin"
) -> tuple[str, float]:
    """`(rule, margin)` checked (margin as a float); else `InputError` naming the option at fault."""
    if rule not in RULES:
        raise InputError(
            f"{rule_option} {rule!r} is not one of {', '.join(RULES)}: pass paper (a copy is ρ ≥ τ) or "
            "distinct (also clearly nearer to one training patient than to any other)"
        )
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)):
        raise InputError(
            f"{margin_option} {margin!r} is not a number: pass a value in (0, 1], e.g. {DEFAULT_MARGIN}"
        )
    if not 0.0 < margin <= 1.0:
        raise InputError(
            f"{margin_option} {margin} must lie in (0, 1] (a copy is at most margin × as far from its "
            f"patient as from any other; 1 accepts every copy the paper's rule does), e.g. {DEFAULT_MARGIN}"
        )
    return rule, float(margin)


def is_distinct(nearest: torch.Tensor, other: torch.Tensor, margin: float) -> torch.Tensor:
    """Whether each sample is clearly nearer its nearest patient (ρ1 = `nearest`) than another (ρ2 = `other`).

    `d1 ≤ margin · d2` with `d = sqrt(2(1 − ρ))`, compared squared: `(1 − ρ1) ≤ margin² (1 − ρ2)`.
    Rounding can put ρ a hair above 1; such distances count as 0. A tie (ρ1 = ρ2) is not distinct
    for `margin < 1`, even at ρ = 1, where both distances are 0.
    """
    far_nearest = (1.0 - nearest).clamp(min=0.0)
    far_other = (1.0 - other).clamp(min=0.0)
    distinct = far_nearest <= (margin * margin) * far_other
    if margin < 1.0:
        distinct &= nearest > other
    return distinct


def patient_codes(train_patients: Sequence[str] | None, n_train: int) -> torch.Tensor:
    """`[n_train]` int64 code of each training row's patient, names in sorted order (default: one per row)."""
    if train_patients is None:
        return torch.arange(n_train)
    patients = [str(p) for p in train_patients]
    if len(patients) != n_train:
        raise InputError(
            f"train_patients has {len(patients)} ids for {n_train} training embeddings: "
            "give one patient id per row"
        )
    code = {name: k for k, name in enumerate(sorted(set(patients)))}
    return torch.tensor([code[p] for p in patients], dtype=torch.int64)


def nearest_patient_correlations(
    queries: torch.Tensor, reference: torch.Tensor, reference_patients: torch.Tensor, chunk_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row of `queries` `[N_q, L]`: ρ1 with its nearest row of `reference` `[N_r, L]`, that row's
    patient code (P1, from `reference_patients` `[N_r]`), and ρ2, the best correlation with a row of
    another patient (`NO_OTHER_PATIENT` where none). In float64 on `reference`'s device, memory
    O(chunk_size × N_r); the results on the CPU.
    """
    reference = standardise(as_matrix(reference, "reference").to(torch.float64), "reference")
    queries = as_matrix(queries, "queries").to(device=reference.device, dtype=torch.float64)
    queries = standardise(queries, "queries")
    reference_patients = reference_patients.to(reference.device)
    nearest, nearest_patient, other = [], [], []
    for rows in queries.split(chunk_size):
        block = rows @ reference.T
        values, index = block.max(dim=1)
        patient = reference_patients[index]
        block.masked_fill_(reference_patients[None, :] == patient[:, None], -math.inf)
        nearest.append(values)
        nearest_patient.append(patient)
        other.append(block.amax(dim=1))
    other_t = torch.cat(other)
    other_t[other_t == -math.inf] = NO_OTHER_PATIENT
    return torch.cat(nearest).cpu(), torch.cat(nearest_patient).cpu(), other_t.cpu()


def nearest_correlation(
    queries: torch.Tensor, reference: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """`[N_q]` Pearson correlation of each row of `queries` `[N_q, L]` with its nearest row of `reference` `[N_r, L]`.

    The score `detect_copies` compares with τ (`nn_train_corr` when `reference` is the training
    set), in float64; memory O(chunk_size × N_r).
    """
    if len(queries) == 0:
        return torch.empty(0, device=queries.device)
    reference = standardise(as_matrix(reference, "reference").to(torch.float64), "reference")
    queries = standardise(
        as_matrix(queries, "queries").to(device=reference.device, dtype=torch.float64), "queries"
    )
    return torch.cat([(rows @ reference.T).amax(dim=1) for rows in queries.split(chunk_size)])


def _other_patient_corr(
    train: torch.Tensor,
    syn: torch.Tensor,
    patient_of: torch.Tensor,
    nearest_patient: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """`[N_syn]` ρ2: each column's best correlation with a training row of a patient not `nearest_patient`.

    The blocks are those of `_nearest_neighbours`, computed alike, so ρ2 ≤ ρ1 holds bit for bit.
    """
    n_train, n_syn = train.shape[0], syn.shape[0]
    other = torch.full((n_syn,), -math.inf, dtype=train.dtype, device=train.device)
    buffer = torch.empty(min(chunk_size, n_train) * n_syn, dtype=train.dtype, device=train.device)
    for start in range(0, n_train, chunk_size):
        rows = train[start : start + chunk_size]
        block = buffer[: rows.shape[0] * n_syn].view(rows.shape[0], n_syn)
        torch.mm(rows, syn.T, out=block)
        same_patient = patient_of[start : start + rows.shape[0], None] == nearest_patient[None, :]
        block.masked_fill_(same_patient, -math.inf)
        torch.maximum(other, block.amax(dim=0), out=other)
    return other.masked_fill_(other == -math.inf, NO_OTHER_PATIENT)


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


def linear_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """numpy's default (linear) percentile of a 1-D tensor, in its own dtype.

    Written out rather than `torch.quantile`, which refuses inputs above 2**24 elements.
    """
    ordered = torch.sort(values).values
    position = (ordered.numel() - 1) * (percentile / 100.0)
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return torch.lerp(ordered[low], ordered[high], position - low)


def standardise(x: torch.Tensor, name: str) -> torch.Tensor:
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


def as_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
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


def check_percentile(percentile: float, name: str = "percentile") -> float:
    """`percentile` as a float, or `InputError` naming the option `name` unless it lies in (0, 100)."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.integer, np.floating)):
        raise InputError(f"{name}={percentile!r} is not a number; pass a value in (0, 100), e.g. 95")
    percentile = float(percentile)
    if not 0.0 < percentile < 100.0:
        raise InputError(f"{name}={percentile} is outside the open interval (0, 100); the paper uses 95")
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
