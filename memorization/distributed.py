"""Splitting a check's work over ranks and putting it back together, identically on every rank.

Plain `torch.distributed` (no Lightning): with no process group every helper is the
one-process case. Unequal pieces are gathered with torchmetrics' `gather_all_tensors`,
which pads before `all_gather` (unequal tensors abort gloo) and trims after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors

from memwatch.errors import FAILURE_KINDS, SharedFailure, classify_failure, one_line


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of `range(n)` that `rank` handles (blocks differ in length by at most 1)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def block_shard(n: int, block_size: int, rank: int, world_size: int) -> range:
    """The indices of `range(n)` that `rank` handles: a contiguous run of whole blocks `[kB, (k + 1)B)`.

    Blocks are aligned to global indices, so every image is computed in the same block (the same
    batch) on any number of ranks: on a GPU a batch's arithmetic depends on its composition. With
    an odd `block_size` ranks take blocks two at a time, so every share starts at an even index and
    pairs `(2k, 2k + 1)` are never split.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be at least 1")
    unit = block_size if block_size % 2 == 0 else 2 * block_size
    units = shard(-(-n // unit), rank, world_size)
    share = range(min(units.start * unit, n), min(units.stop * unit, n))
    return share if len(share) else range(0)  # an empty share starts aligned too


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows `[n_rank, ...]` (`n_rank` may differ, even be 0), concatenated in rank order, on every rank."""
    if not distributed():
        return local
    return torch.cat(gather_all_tensors(local.contiguous()))


def gather_kept(
    kept: dict[int, torch.Tensor], order: list[int], limit: int, shape: tuple[int, ...], device: torch.device
) -> dict[int, torch.Tensor]:
    """The first `limit` images of `order` that any rank kept (`kept`: global index → image `[C, *spatial]`),
    in that order, on every rank."""
    held = set(gather_rows(torch.tensor(sorted(kept), dtype=torch.long, device=device)).tolist())
    shown = [j for j in order if j in held][:limit]
    mine = [j for j in shown if j in kept]
    local = torch.stack([kept[j] for j in mine]) if mine else torch.zeros(0, *shape)
    images = gather_rows(local.to(device))
    owners = gather_rows(torch.tensor(mine, dtype=torch.long, device=device))
    by_index = dict(zip(owners.tolist(), images.cpu(), strict=True))
    return {j: by_index[j] for j in shown}


@contextmanager
def fail_together(device: torch.device, doing: str) -> Iterator[None]:
    """Run a block on every rank; if it raises on any rank, raise on every rank.

    Without this, one rank's failure (a full disk, a diverged model) leaves the others
    waiting in their next collective until the backend's timeout (30 min for NCCL). Every
    rank calls the same reduction at the end of the block, so all learn of a failure at
    once: the failing rank re-raises its own error, the others a `SharedFailure` carrying
    its message, which the CLI prints once, on rank 0.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as raised:  # noqa: BLE001 - any failure must reach the other ranks
        error = raised
    if distributed():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        kinds = torch.zeros(world_size, dtype=torch.int32, device=device)
        kinds[rank] = 0 if error is None else FAILURE_KINDS.index(classify_failure(error)[1]) + 1
        dist.all_reduce(kinds)
        if bool(kinds.any()):
            messages: list[str | None] = [None] * world_size
            dist.all_gather_object(messages, None if error is None else one_line(error))
            if error is None:
                first = int(kinds.nonzero()[0])
                raise SharedFailure(
                    f"rank {first} failed while {doing}: {messages[first]}",
                    kind=FAILURE_KINDS[int(kinds[first]) - 1],
                )
    if error is not None:
        raise error
