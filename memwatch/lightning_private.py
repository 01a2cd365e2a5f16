"""Every use of a private Lightning or jsonargparse name in memwatch, in one place, each with why.

Lightning has no public hook for these; when one appears, this is the one file to change. Each
function is small and tested through the behaviour that needs it.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser


def reads_at_train_epoch_end(stopper: EarlyStopping, trainer: Trainer) -> bool:
    """Whether `stopper` reads its monitor at train epoch end rather than at validation end.

    EarlyStopping keeps the choice in `_check_on_train_epoch_end` and fills it in its own `setup`,
    after the callback's start-up checks; until then `None` means what `EarlyStopping.setup` will choose.
    """
    chosen = stopper._check_on_train_epoch_end
    if chosen is None:
        return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
    return bool(chosen)


def averaged_model(callback: WeightAveraging) -> torch.nn.Module | None:
    """The averaged copy of the model a weight-averaging callback keeps (an `AveragedModel`), or `None`
    before its `setup`. WeightAveraging exposes it only as `_average_model`; the callback samples it,
    as a user would share the EMA model."""
    return getattr(callback, "_average_model", None)


def add_subcommand(parser: LightningArgumentParser, name: str, subparser: LightningArgumentParser) -> None:
    """Add `name` beside LightningCLI's fit/validate/test/predict, so that `cli.py --help` lists it.

    LightningCLI builds its subcommands from Trainer methods in its private `_add_subcommands`, and
    jsonargparse keeps the subcommands action as `_subcommands_action`; neither has a public way in.
    """
    parser._subcommands_action.add_subcommand(name, subparser, help=subparser.description)


def summary_table(
    columns: list[tuple[str, list[str]]],
    total_parameters: int,
    trainable_parameters: int,
    model_size: float,
    total_training_modes: dict[str, int],
    total_flops: int,
) -> str:
    """Lightning's plain-text model summary of `columns` (its last line the total FLOPs).

    `ModelSummary.summarize` formats and logs it in one step; `_format_summary_table` is the only way to
    the text without logging it, which `callbacks.console.SummaryWithoutUncountedFlops` needs to drop a line.
    """
    from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

    return _format_summary_table(
        total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
    )
