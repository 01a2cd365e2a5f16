"""What the evaluating callbacks (a check, the membership signal) share: when an epoch ends, which model they
read (the EMA copy where a weight-averaging callback keeps one), their place in the trainer, and where their
scalars go."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from memwatch.lightning_private import averaged_model
from memwatch.memorization.pipeline import Placement
from memwatch.memorization.stream import Progress


def evaluated_model(trainer: Trainer, pl_module: LightningModule, caller: Callback) -> LightningModule:
    """The EMA copy of the model where a weight-averaging callback keeps one, else the model."""
    for callback in trainer.callbacks:
        averaged = averaged_model(callback) if isinstance(callback, WeightAveraging) else None
        if averaged is not None and averaged.n_averaged > 0:
            # During validation the averaging callback swaps its weights into the model until its own
            # on_validation_epoch_end; listed after `caller`, it has not swapped them back yet.
            if trainer.validating and trainer.callbacks.index(callback) > trainer.callbacks.index(caller):
                return pl_module
            if hasattr(pl_module, "image_spatial_size"):  # memwatch's modules learn their size from the data
                averaged.module.image_spatial_size = pl_module.image_spatial_size
            return averaged.module
    return pl_module


def at_epoch_end_validation(trainer: Trainer) -> bool:
    """Whether this validation ends a training epoch (not a sanity check, not a mid-epoch one)."""
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and trainer.is_last_batch


def log_scalars(trainer: Trainer, pl_module: LightningModule, scalars: dict[str, float]) -> None:
    """Into `callback_metrics` (where EarlyStopping and ModelCheckpoint read them) and to every logger."""
    for key, value in scalars.items():
        pl_module.log(key, value, logger=False, sync_dist=False)
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=trainer.global_step)


def placement(trainer: Trainer, device: torch.device, num_workers: int, label: str, every_seconds: float | None) -> Placement:
    """This rank's place in the trainer, with progress lines (`label` + what) every `every_seconds` on rank 0
    about its share (the ranks share the work evenly); `None` seconds: none."""

    def progress(what: str):
        if every_seconds is None or not trainer.is_global_zero:
            return None
        share = f" (rank 0's share of {trainer.world_size})" if trainer.world_size > 1 else ""
        return lambda total: Progress(label + what + share, total, rank_zero_info, every_seconds)

    return Placement(
        device, trainer.global_rank, trainer.world_size, num_workers, trainer.precision_plugin.forward_context, progress
    )
