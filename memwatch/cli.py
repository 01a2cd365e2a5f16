"""memwatch command line: LightningCLI's fit/validate/test/predict for every stage.

    python cli.py fit --config configs/phantom_ae.yaml
    python cli.py fit --config configs/phantom_ldm.yaml --trainer.devices 2 --trainer.strategy ddp
    python cli.py fit --config configs/phantom_ae.yaml --print_config
    python cli.py fit --config phantom_ae.yaml        (a name not found here is looked up in configs/)
    python cli.py audit --embedder EMB.ckpt --train DIR --val DIR --synthetic DIR --out OUT   (see audit.py)
    python cli.py audit --config audit.yaml          (any audit option as a YAML key; --print_config shows them)
    python cli.py audit --verify-release SHAREABLE   (the released folder still matches its manifest.json)

A user's mistake (a missing checkpoint, mismatched sizes, a bad file) ends the run with
one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from memwatch.callbacks import MemorizationCallback
from memwatch.callbacks.console import ProgressLines, SummaryWithoutUncountedFlops, silence_lightning_tips
from memwatch.datamodules import MedicalImageDataModule
from memwatch.errors import classify_failure
from memwatch.lightning_private import add_subcommand

# configs/ beside memwatch/ in a clone; memwatch/configs/ in an installed package.
CONFIG_DIR = next(
    (folder for folder in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent / "configs")
     if folder.is_dir()),
    Path("configs"),
)

# torch's CPU threads per process where OMP_NUM_THREADS is unset; None keeps torch's default, one per core. The one
# place to change that default: bench/busy_cpu.py measures the choices on a busy CPU (BENCHMARKS.md).
DEFAULT_CPU_THREADS: int | None = None
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "memwatch"},
    },
}


class MemwatchCLI(LightningCLI):
    """LightningCLI with a `last.ckpt`-saving checkpoint, `memorization:` and `early_stopping:`
    sections of their own, a progress bar (rich on a terminal, plain lines in a log file) and start-up checks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        # Optional: the LDM configs fill them, other stages leave them out. Added in this order, so
        # the trainer counts copies before EarlyStopping reads the count.
        parser.add_lightning_class_args(
            MemorizationCallback, "memorization", subclass_mode=True, required=False
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping", subclass_mode=True, required=False)
        parser.add_argument(
            "--progress_seconds", type=float, default=60.0,
            help="where stdout is not a terminal (a SLURM log, | tee): seconds between plain progress lines",
        )  # fmt: skip

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        # LightningCLI's private hook for its subcommands (see lightning_private.add_subcommand).
        super()._add_subcommands(parser, **kwargs)
        from memwatch.audit import (
            audit_parser,  # listed in `cli.py --help`; main() runs it without the LightningCLI
        )

        add_subcommand(parser, "audit", audit_parser())

    def before_instantiate_classes(self) -> None:
        # ModelCheckpoint recognises the last.ckpt of a run it resumes only when the checkpoint folder is
        # spelled as the checkpoint recorded it (it compares path strings); otherwise its version counter
        # writes last-v1.ckpt beside a stale last.ckpt. So the run's folder gets one spelling: absolute,
        # links resolved, whether the command line wrote it relative or absolute.
        def resolved(path):
            local = isinstance(path, str) and "://" not in path  # not a URL such as s3://
            return os.path.realpath(os.path.expanduser(path)) if local else path

        trainer = self.config.get(str(self.subcommand), self.config).trainer
        for logger in trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and init_args.get("save_dir") is not None:
                init_args.save_dir = resolved(init_args.save_dir)
        trainer.default_root_dir = resolved(trainer.get("default_root_dir"))

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # A section left out is instantiated as None.
        return super()._instantiate_trainer(
            config, [callback for callback in callbacks if callback is not None]
        )

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            # A rich bar redraws its line in place: a log file would show nothing until the end.
            bar = RichProgressBar() if sys.stdout.isatty() else ProgressLines(self._get(self.config_init, "progress_seconds"))
            kwargs["callbacks"] = [*callbacks, bar]
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, ModelSummary) for c in callbacks):  # Lightning's own, not one the user chose
            trainer.callbacks[:] = [
                SummaryWithoutUncountedFlops() if isinstance(c, ModelSummary) else c for c in trainer.callbacks
            ]
        return trainer

    def _load_checkpoints_safely(self) -> None:
        # memwatch checkpoints hold tensors and plain values only: load --ckpt_path without
        # unpickling arbitrary objects unless the user asks (--weights_only false).
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True

    def before_fit(self) -> None:
        self._load_checkpoints_safely()
        # Fail on mismatched data and model now, before a log directory or config is written.
        self.datamodule.setup("fit")
        if hasattr(self.model, "check_data"):  # memwatch's modules; a user's generator may have none
            self.model.check_data(self.datamodule)
        for callback in self.trainer.callbacks:
            if hasattr(callback, "check_data"):
                callback.check_data(self.datamodule)
            if hasattr(callback, "check_trainer"):
                callback.check_trainer(self.trainer, self.model)

    before_validate = before_test = before_predict = _load_checkpoints_safely


def config_path(value: str) -> str:
    """`NAME.yaml` as given when it is a file, else `configs/NAME.yaml` when that one is."""
    if Path(value).is_file() or not value.endswith((".yaml", ".yml")):
        return value
    shipped = CONFIG_DIR / value
    return str(shipped) if shipped.is_file() else value


def with_config_names(argv: list[str]) -> list[str]:
    """`argv` with every `--config NAME.yaml` (or `--config=NAME.yaml`) resolved by `config_path`."""
    resolved = []
    for k, argument in enumerate(argv):
        if k > 0 and argv[k - 1] == "--config":
            argument = config_path(argument)
        elif argument.startswith("--config="):
            argument = "--config=" + config_path(argument.removeprefix("--config="))
        resolved.append(argument)
    return resolved


def main(args: list[str] | None = None) -> MemwatchCLI | dict:
    """Run the CLI on `args` (default `sys.argv[1:]`): the LightningCLI, or the audit's summary for `audit`."""
    argv = with_config_names(sys.argv[1:] if args is None else list(args))
    if args is None:
        # LightningCLI reads sys.argv itself when given no args (and warns when given both); DDP's
        # launcher restarts the script with sys.argv, so the children see the resolved names too.
        sys.argv[1:] = argv
    torch.set_float32_matmul_precision("high")
    if DEFAULT_CPU_THREADS is not None and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(DEFAULT_CPU_THREADS)
    silence_lightning_tips()
    # Lightning logs every log_every_n_steps steps across epochs all the same; the phantom configs' epochs are 1-2 steps.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
    # Harmless and expected here: the LDM's frozen autoencoder is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    try:
        if argv[:1] == ["audit"]:
            from memwatch.audit import print_audit, print_verification, run_audit

            result = run_audit(argv[1:])
            if "verified" not in result:
                print_audit(result)
            elif not print_verification(result):
                raise SystemExit(1)
            return result
        return MemwatchCLI(
            LightningModule,  # memwatch's modules, or any generator a user brings (memorization.embedders.Generator)
            MedicalImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            args=None if args is None else argv,
        )
    except Exception as error:
        cause, kind = classify_failure(error)
        if cause is None:
            raise
        status = 2 if kind == "input" else 1
        # All ranks stop together (memorization.distributed.fail_together); the message is printed once.
        if rank_zero_only.rank == 0:
            print(f"error: {cause}", file=sys.stderr)
        close_process_group()
        raise SystemExit(status) from None


def close_process_group() -> None:
    """Destroy the process group before exiting on a failure: left to the interpreter's shutdown,
    gloo's worker threads can be torn down while joinable, which aborts the rank (status -6)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # the run has failed already; exit with its status
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
