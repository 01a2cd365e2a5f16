"""`last_safe.ckpt`: the latest model whose memorization stays within every EarlyStopping's limit.

At the end of an epoch with a check or a membership evaluation, `within_limits` judges that epoch's
scalars against each EarlyStopping on `memorization/*` that has a `divergence_threshold` (the value that
would stop training: `≤` it in mode `min`). When every such limit holds, `LastSafeCheckpoint` writes the model
beside `last.ckpt`: the one to share when EarlyStopping fires. Without such a threshold nothing is saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_info

LAST_SAFE = "last_safe.ckpt"


def memorization_stoppers(trainer: Trainer) -> list[EarlyStopping]:
    """The trainer's EarlyStopping callbacks that monitor `memorization/*`."""
    return [
        stopper
        for stopper in trainer.callbacks
        if isinstance(stopper, EarlyStopping) and stopper.monitor.startswith("memorization/")
    ]


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


class LastSafeCheckpoint(Callback):
    """Save `last_safe.ckpt` beside `last.ckpt` at the end of every training epoch whose memorization scalars
    (those `MemorizationCallback` and `MembershipCallback` evaluated at this step) stay within every
    EarlyStopping's `divergence_threshold` on `memorization/*`.

    List it after those callbacks. It saves at the end of the training epoch, never during validation: there an
    averaging callback's weights are swapped in.

    Args:
        filename: the checkpoint's name, in the checkpoint folder of `trainer.checkpoint_callback` (or
            `<log_dir>/checkpoints`).
    """

    def __init__(self, filename: str = LAST_SAFE) -> None:
        super().__init__()
        self.filename = filename

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        scalars: dict[str, float] = {}
        for callback in trainer.callbacks:
            evaluated = getattr(callback, "scalars_at", None)
            scalars |= (evaluated(trainer.global_step) or {}) if callable(evaluated) else {}
        reason = within_limits(memorization_stoppers(trainer), scalars) if scalars else None
        if reason is not None:
            self.save(trainer, reason)

    def save(self, trainer: Trainer, reason: str) -> Path:
        """Save the model (every rank takes part, as in any checkpoint save)."""
        checkpoint = trainer.checkpoint_callback
        folder = (
            getattr(checkpoint, "dirpath", None)
            or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        )
        path = Path(folder) / self.filename
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"memorization at step {trainer.global_step} within the limit ({reason}): saved {path}"
        )
        return path
