"""`last_safe.ckpt`: the latest model whose memorization check stays within every EarlyStopping's limit.

At the end of an epoch with a check or a membership evaluation, `within_limits` judges that epoch's
scalars against each EarlyStopping on `memorization/*`
that has a `divergence_threshold` (the value that would stop training: `≤` it in mode `min`).
When every such limit holds, `save_last_safe` writes the model beside `last.ckpt`: the one to
share when EarlyStopping fires. Without such a threshold nothing is saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_info

LAST_SAFE = "last_safe.ckpt"


def within_limits(stoppers: Sequence[EarlyStopping], scalars: Mapping[str, float]) -> str | None:
    """Why `scalars` stay within every stopper's `divergence_threshold`, or `None` when one does not (or none
    of them sets a threshold). Pure: the decision alone."""
    reasons = []
    for stopper in stoppers:
        if stopper.divergence_threshold is None:
            continue
        value = scalars.get(stopper.monitor)
        if value is None or not math.isfinite(value):
            return None
        minimising = stopper.mode == "min"
        if not (
            value <= stopper.divergence_threshold if minimising else value >= stopper.divergence_threshold
        ):
            return None
        reasons.append(
            f"{stopper.monitor} = {value:.4g} {'≤' if minimising else '≥'} {stopper.divergence_threshold:g}"
        )
    return ", ".join(reasons) or None


def save_last_safe(trainer: Trainer, reason: str) -> Path:
    """Save `last_safe.ckpt` beside `last.ckpt` (every rank takes part, as in any checkpoint save)."""
    checkpoint = trainer.checkpoint_callback
    folder = (
        getattr(checkpoint, "dirpath", None)
        or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
    )
    path = Path(folder) / LAST_SAFE
    trainer.save_checkpoint(path)
    rank_zero_info(f"memorization at step {trainer.global_step} within the limit ({reason}): saved {path}")
    return path
