"""Which model a check or a membership evaluation reads: the EMA copy where a weight-averaging callback keeps one."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

from memwatch.lightning_private import averaged_model


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
    from lightning.pytorch.trainer.states import TrainerFn

    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and trainer.is_last_batch
