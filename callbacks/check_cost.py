"""What a memorization check costs: its seconds, its share of the training time, and warnings when too much."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from memwatch.memorization.distributed import distributed


def check_cost(
    check_seconds: float, training_seconds: float | None, device: torch.device
) -> dict[str, float | None]:
    """`check_seconds` and `overhead` (÷ the training seconds since the previous check), the slowest rank's."""
    seconds = torch.tensor(
        [check_seconds, -1.0 if training_seconds is None else training_seconds], device=device
    )
    if distributed():
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    check, training = seconds.tolist()
    return {
        "check_seconds": round(check, 3),
        "overhead": round(check / training, 4) if training > 0 else None,
    }


def cost_warnings(
    row: Mapping[str, Any], device: torch.device, max_overhead: float, decode_batch_size: int, baseline: bool = False
) -> list[str]:
    """Why the check in `row` costs too much (a share of the training time past `max_overhead`, or a GPU
    memory peak near the card's), each with the options to change; empty when it does not.

    A `baseline` check (check_at_start's, off the every_n_epochs cadence) follows one epoch of training, not a
    period: its share says nothing of the cadence and checking less often would not lower it, so only its
    memory is judged."""
    warnings = []
    if not baseline and row["overhead"] is not None and row["overhead"] > max_overhead:
        warnings.append(
            f"memorization check {row['check']} took {row['check_seconds']:.1f} s, {row['overhead']:.2f} of the "
            f"training time since the previous check (max_overhead {max_overhead:g}): check less often "
            "(--memorization.every_n_epochs) or fewer samples (--memorization.n_samples); on a GPU sample larger "
            "blocks (--memorization.sample_batch_size, with --memorization.decode_batch_size to keep decoding "
            "within memory) and --memorization.sampler_graphs true"
        )
    if device.type == "cuda":
        peak, total = (
            torch.cuda.max_memory_allocated(device),
            torch.cuda.get_device_properties(device).total_memory,
        )
        if peak > 0.9 * total:
            warnings.append(
                f"memorization check {row['check']} peaked at {peak / 2**30:.1f} of {total / 2**30:.0f} GiB: "
                f"a larger block would not fit; lower --memorization.decode_batch_size (now {decode_batch_size}) "
                "before --memorization.sample_batch_size"
            )
    return warnings
