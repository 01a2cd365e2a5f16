"""What a fit prints to its console beside the callbacks' own lines: plain progress lines where no
progress bar can be drawn, a model summary without uncounted FLOPs, and none of Lightning's tips.
`memwatch.cli` puts them in place; a script of one's own can add `ProgressLines` to its Trainer.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks.progress import ProgressBar

from memwatch.errors import InputError
from memwatch.lightning_private import summary_table
from memwatch.memorization.stream import duration


class ProgressLines(ProgressBar):
    """The progress bar of a log file (SLURM's, `| tee`): during fit, one plain line on rank 0 at most every
    `every_seconds` (epoch, step of the total, the progress-bar metrics, steps per second since the previous
    line, elapsed and left), and a last one at the end if any was printed.

    A rich bar redraws one line in place, which a file cannot show: there it prints nothing until the fit
    ends. A line is printed at the end of a training step, so a step longer than `every_seconds` gets one each.
    """

    def __init__(self, every_seconds: float = 60.0) -> None:
        super().__init__()
        if not every_seconds >= 0:
            raise InputError(f"--progress_seconds={every_seconds} must be at least 0 (seconds between progress lines)")
        self.every_seconds = every_seconds
        self.enabled = True
        self.lines = 0
        self._started = self._last = 0.0
        self._last_step = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = self._last = time.perf_counter()
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_seconds:
            self._say(trainer, pl_module, now)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and self.lines and trainer.global_step != self._last_step:
            self._say(trainer, pl_module, time.perf_counter())

    def _say(self, trainer: Trainer, pl_module: LightningModule, now: float) -> None:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        rate = (step - self._last_step) / max(now - self._last, 1e-9)
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs is not None and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch}{epochs}"]
        if math.isfinite(total) and total > 0:
            parts.append(f"step {step}/{int(total)} ({step / total:.0%})")
        else:
            parts.append(f"step {step}")
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        parts += [f"{name} {float(value):.4g}" for name, value in metrics.items() if _is_number(value)]
        parts.append(f"{rate:.2f} it/s")
        left = (
            f", about {duration((total - step) / rate)} left" if rate > 0 and math.isfinite(total) and total > step else ""
        )
        self.print(", ".join(parts) + f", {duration(now - self._started)} elapsed{left}", flush=True)
        self.lines += 1
        self._last, self._last_step = now, step


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class SummaryWithoutUncountedFlops(ModelSummary):
    """Lightning's model summary, in plain text, without the FLOPs column and "Total Flops" line when nothing
    was counted: Lightning counts FLOPs only for a module with an `example_input_array`, which memwatch's
    modules have not, and prints 0 for every layer otherwise."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        counted = total_flops > 0
        columns = [column for column in summary_data if counted or column[0] != "FLOPs"]
        table = summary_table(
            columns, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops
        )
        if not counted:
            table = table.rsplit("\n", 1)[0]  # its last line is the total FLOPs
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + table)


class WithoutMessage(logging.Filter):
    """Drops the log records whose message starts with `prefix` (one message of a library's logger)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Lightning's rank_zero_info (lightning.pytorch.utilities.rank_zero) suggests installing its cloud logger at
# every fit without a LitLogger; nothing else it says there starts so.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"


def silence_lightning_tips() -> None:
    """Lightning's "litlogger" tip off, once per process (its other info lines stay)."""
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, WithoutMessage) and f.prefix == LITLOGGER_TIP for f in rank_zero_log.filters):
        rank_zero_log.addFilter(WithoutMessage(LITLOGGER_TIP))
