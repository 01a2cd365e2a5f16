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
import re
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from callbacks import MemorizationCallback
from datamodules import MedicalImageDataModule
from errors import InputError, SharedFailure, TrainingFailure

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "memwatch"},
    },
}


class MemwatchCLI(LightningCLI):
    """LightningCLI with a `last.ckpt`-saving checkpoint, `memorization:` and `early_stopping:`
    sections of their own, a rich progress bar and start-up checks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        # Optional: the LDM configs fill them, other stages leave them out. Added in this order, so
        # the trainer counts copies before EarlyStopping reads the count.
        parser.add_lightning_class_args(MemorizationCallback, "memorization", subclass_mode=True, required=False)
        parser.add_lightning_class_args(EarlyStopping, "early_stopping", subclass_mode=True, required=False)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        from audit import audit_parser  # listed in `cli.py --help`; main() runs it without the LightningCLI

        audit = audit_parser()
        parser._subcommands_action.add_subcommand("audit", audit, help=audit.description)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # A section left out is instantiated as None.
        return super()._instantiate_trainer(config, [callback for callback in callbacks if callback is not None])

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        return super().instantiate_trainer(**kwargs)

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
                callback.check_trainer(self.trainer)

    before_validate = before_test = before_predict = _load_checkpoints_safely


WORKER_INPUT_ERROR = re.compile(r"^errors\.InputError: (.+)$", re.MULTILINE)


def user_mistake(error: BaseException) -> InputError | None:
    """The `InputError` behind `error`, if any.

    jsonargparse wraps errors raised while instantiating; a DataLoader worker re-raises a
    transform's error as text inside another exception's message.
    """
    seen = set()
    chain = []
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for wrapped in chain:
        found = WORKER_INPUT_ERROR.findall(str(wrapped))
        if found:
            return InputError(found[-1])
    return None


def print_audit(summary: dict) -> None:
    """The audit's verdict as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    from memorization.chance import weak_detector_warning

    def share(count: int, total: int, key: str) -> str:
        low, high = summary[f"{key}_ci"]
        chance = summary.get(f"null_{key}")
        beyond = f", chance {chance:.1%}" if chance is not None else ""
        return f"{count} / {total} ({summary[key]:.1%}, 95% CI {low:.1%}–{high:.1%}{beyond})"

    table = Table(title=f"audit: {summary['out']}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(
        "training patients memorized",
        share(summary["n_mem_patients"], summary["n_train_patients"], "frac_mem_patients"),
    )
    table.add_row("training images memorized (N_mem)", share(summary["n_mem"], summary["n_train"], "frac_mem"))
    table.add_row("synthetic samples that are copies", share(summary["n_copies"], summary["n_syn"], "frac_copies"))
    detector = summary.get("detector")
    if detector:
        table.add_row(
            "detector self-check: sensitivity / specificity",
            f"{detector['sensitivity']:.1%} / {detector['specificity']:.1%} "
            f"({detector['n_positive']} varied training / {detector['n_negative']} held-out images)",
        )
    table.add_row(f"τ ({summary['percentile']:g}th percentile)", f"{summary['tau']:.4f}")
    if summary.get("rule") == "distinct":
        table.add_row("copy rule", f"distinct: ρ ≥ τ and nearer one patient, d1 ≤ {summary['margin']:g}·d2")
    elif summary.get("rule"):
        table.add_row("copy rule", f"{summary['rule']}: ρ ≥ τ")
    detectors = summary.get("detectors") or {}
    if len(detectors.get("by_embedder") or {}) > 1:
        for name, numbers in detectors["by_embedder"].items():
            table.add_row(
                f"embedder {name}: patients memorized / copies",
                f"{numbers['n_mem_patients']} / {numbers['n_copies']} (τ {numbers['tau']:.4f})",
            )
        table.add_row("copies flagged by any / by every embedder", f"{detectors['n_copies_any']} / {detectors['n_copies_all']}")
    for key, label in [
        ("fd", "Fréchet distance (embeddings, vs validation)"),
        ("ms_ssim", "MS-SSIM between samples"),
    ]:
        if summary.get(key) is not None:
            table.add_row(label, f"{summary[key]:.4f}")
    if "release" in summary:
        release = summary["release"]
        table.add_row(
            f"released to {release['dir']}", f"{release['n_released']} (withheld {release['n_withheld']})"
        )
    Console().print(table)
    weak = detector and weak_detector_warning(detector["sensitivity"], detector["n_positive"], "--embedder")
    if weak:
        print(f"warning: {weak}", file=sys.stderr)


def print_verification(result: dict) -> bool:
    """Say whether a released folder still matches its manifest; True when it does."""
    if result["verified"]:
        print(f"verified: the {result['n_files']} file{'s' if result['n_files'] != 1 else ''} of {result['dir']} match its manifest (audit of {result['created']})")
        return True
    for change in ("changed", "added", "missing"):
        for name in result[change]:
            print(f"{change}: {name}", file=sys.stderr)
    counts = ", ".join(f"{len(result[change])} {change}" for change in ("changed", "added", "missing"))
    print(f"error: {result['dir']} differs from its manifest ({counts}): do not share it as audited", file=sys.stderr)
    return False


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
    # Harmless and expected here: the LDM's frozen autoencoder is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    try:
        if argv[:1] == ["audit"]:
            from audit import run_audit

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
        cause, status = one_line_failure(error)
        if cause is None:
            raise
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


def one_line_failure(error: BaseException) -> tuple[BaseException | None, int]:
    """The failure behind `error` that is reported on one line, and the exit status: 2 for a user's
    mistake, 1 for a failed run (a diverged model, or a failure on another rank); `None` for a bug."""
    cause = user_mistake(error)
    if cause is not None:
        return cause, 2
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SharedFailure):
            return error, 2 if error.kind == "input" else 1
        if isinstance(error, TrainingFailure):
            return error, 1
        error = error.__cause__ or error.__context__
    return None, 1


if __name__ == "__main__":
    main()
