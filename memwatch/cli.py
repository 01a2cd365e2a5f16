"""memwatch command line: LightningCLI's fit/validate/test/predict for every stage.

    python cli.py fit --config configs/phantom_ae.yaml
    python cli.py fit --config configs/phantom_ldm.yaml --trainer.devices 2 --trainer.strategy ddp
    python cli.py fit --config configs/phantom_ae.yaml --print_config
    python cli.py fit --config phantom_ae.yaml        (a name not found here is looked up in configs/)
    python cli.py audit --embedder EMB.ckpt --train DIR --val DIR --synthetic DIR --out OUT   (see audit.py)
    python cli.py audit --config audit.yaml          (any audit option as a YAML key; --print_config shows them)
    python cli.py audit --verify-release SHAREABLE   (the released folder still matches its manifest.json)

A user's mistake (a missing checkpoint, mismatched sizes, a bad file, an unknown option) ends the
run with one line on stderr and exit status 2, and leaves no run folder behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from difflib import get_close_matches
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from memwatch.callbacks import LastSafeCheckpoint, MembershipCallback, MemorizationCallback
from memwatch.callbacks.console import ProgressLines, SummaryWithoutUncountedFlops, silence_lightning_tips
from memwatch.datamodules import MedicalImageDataModule
from memwatch.errors import InputError, classify_failure
from memwatch.lightning_modules.base import read_checkpoint_file
from memwatch.lightning_modules.plugins import TrustedModules
from memwatch.lightning_private import add_subcommand
from memwatch.option_errors import OneLineLightningParser

# configs/ beside memwatch/ in a clone; memwatch/configs/ in an installed package.
CONFIG_DIR = next(
    (folder for folder in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent / "configs")
     if folder.is_dir()),
    Path("configs"),
)

# --ckpt_path values that name no file: Lightning finds the checkpoint itself.
CKPT_PATH_NAMES = ("last", "best", "hpc")
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
        # Optional: the LDM configs fill them, other stages leave them out. Added in this order, so the
        # membership signal is evaluated before a check of the same epoch (whose row carries it) and the
        # trainer counts copies before EarlyStopping reads the count.
        parser.add_lightning_class_args(MembershipCallback, "membership", subclass_mode=True, required=False)
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

        config = self.config.get(str(self.subcommand), self.config)
        memorization_with_membership(config)
        trainer = config.trainer
        for logger in trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and init_args.get("save_dir") is not None:
                init_args.save_dir = resolved(init_args.save_dir)
        trainer.default_root_dir = resolved(trainer.get("default_root_dir"))

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # A section left out is instantiated as None. The memorization sections bring last_safe.ckpt, judged
        # after them.
        callbacks = [callback for callback in callbacks if callback is not None]
        given = [*(config.get("callbacks") or []), *callbacks]
        evaluators = (MembershipCallback, MemorizationCallback)
        if any(isinstance(c, evaluators) for c in given) and not any(isinstance(c, LastSafeCheckpoint) for c in given):
            callbacks.append(LastSafeCheckpoint())
        return super()._instantiate_trainer(config, callbacks)

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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI's own reads --ckpt_path (a damaged file ends in a traceback) and takes the model's
        # class and arguments from it, so another module's checkpoint would silently train another model.
        # This one reads it once, refuses those on one line, then takes the arguments as LightningCLI does.
        self._start_step, self._ckpt_weights = 0, None
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        ckpt_path = None if ckpt_path is None else str(ckpt_path)
        if ckpt_path is None or ckpt_path in CKPT_PATH_NAMES or "://" in ckpt_path or ckpt_path.startswith("registry"):
            return
        path = Path(ckpt_path)
        if not path.is_file():
            inside = next((p for p in (path / "last.ckpt", path / "checkpoints/last.ckpt") if p.is_file()), None)
            if inside is not None:
                raise InputError(f"--ckpt_path={path} is a folder: pass the checkpoint in it, --ckpt_path {inside}")
            what = "is a folder" if path.is_dir() else "does not exist"
            raise InputError(f"--ckpt_path={path} {what}: pass the checkpoints/last.ckpt of the run to resume")
        checkpoint = read_checkpoint_file(
            path, f"--ckpt_path={path}", "pass a checkpoint that python cli.py fit wrote",
            trusted=config.get("weights_only") is False,
        )  # fmt: skip
        missing = [key for key in ("state_dict", "pytorch-lightning_version") if key not in checkpoint]
        if missing:
            raise InputError(
                f"--ckpt_path={path} holds no {missing[0]}, so Lightning cannot resume from it: pass a checkpoint "
                "that python cli.py fit wrote (or Trainer.save_checkpoint)"
            )
        recorded = checkpoint.get("hyper_parameters")
        hparams = dict(recorded) if isinstance(recorded, Mapping) else {}  # a trusted file may hold a Namespace
        hparams.pop("_instantiator", None)
        self._check_model_class(path, checkpoint, hparams.get("_class_path"), config)
        step = checkpoint.get("global_step")
        self._start_step = step if isinstance(step, int) else 0
        if not (checkpoint.get("memwatch") or hparams.get("_class_path")):
            self._ckpt_weights = set(checkpoint["state_dict"])  # no class recorded: the weights tell
        if not hparams:
            return
        model = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams} if "_class_path" in hparams else hparams
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _check_model_class(self, path: Path, checkpoint: dict, class_path: str | None, config) -> None:
        """Refuse a --ckpt_path whose recorded model class is not the configured one, or lies in a module that
        neither memwatch nor the config names (LightningCLI would import it to rebuild the model)."""
        recorded = (checkpoint.get("memwatch") or {}).get("module") or (class_path or "").rpartition(".")[2]
        model = config.get("model")
        if class_path:
            named_by_config = str(getattr(model, "class_path", "") or "").partition(".")[0]
            try:
                TrustedModules(names=(named_by_config,) if named_by_config else ()).check(class_path, "")
            except InputError:
                raise InputError(
                    f"--ckpt_path={path} records the class {class_path}, from a module that neither memwatch nor this "
                    "config names, and importing it would run its code: pass a checkpoint that this config's model wrote"
                ) from None
        configured = getattr(model, "class_path", None) if self.subclass_mode_model else self._model_class.__name__
        if not recorded or not configured or recorded == configured.rpartition(".")[2]:
            return
        configured = configured.rpartition(".")[2]
        saved_config = path.parent.parent / "config.yaml"  # beside checkpoints/ in its run folder
        fix = f"to resume it, run the config that trained it (--config {saved_config})" if saved_config.is_file() else (
            f"pass a checkpoint of {configured}"
        )  # fmt: skip
        starts_from = [key for key in vars(getattr(model, "init_args", None) or {}) if key.endswith("_ckpt")]
        if starts_from:
            fix += f"; a checkpoint that {configured} builds on goes to --model.init_args.{starts_from[0]}"
        raise InputError(f"--ckpt_path={path} is a checkpoint of {recorded}, but this config trains {configured}: {fix}")

    def _run_subcommand(self, subcommand: str) -> None:
        # Lightning writes the run's log folder (config.yaml, hparams.yaml) as the trainer sets up, before the
        # callbacks' and the model's own checks: a start that fails them on the user's input removes it again.
        folders = NewRunFolders(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except Exception as error:
            if classify_failure(error)[1] == "input" and self.trainer.global_step <= self._start_step:
                folders.remove()
            raise

    def _load_checkpoints_safely(self) -> None:
        # memwatch checkpoints hold tensors and plain values only: load --ckpt_path without
        # unpickling arbitrary objects unless the user asks (--weights_only false).
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True
        expected = set(self.model.state_dict()) if self._ckpt_weights else None
        if expected and not self._ckpt_weights & expected:
            name = type(self.model).__name__
            raise InputError(
                f"--ckpt_path={config['ckpt_path']} holds the weights of another model: none of its {len(self._ckpt_weights)} "
                f"tensors (e.g. {min(self._ckpt_weights)}) is one of {name}'s (e.g. {min(expected)}): pass a checkpoint of {name}"
            )

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


def deprecations_on_one_line(formatwarning):
    """`formatwarning` with a deprecation (a FutureWarning: an old spelling) on one line, without its source."""
    if getattr(formatwarning, "one_line_deprecations", False):
        return formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, FutureWarning):
            return f"{category.__name__}: {message}\n"
        return formatwarning(message, category, filename, lineno, line)

    format_warning.one_line_deprecations = True
    return format_warning


def memorization_with_membership(config) -> None:
    """A `memorization:` section brings the membership signal (a `membership:` section of its defaults, unless
    one is given); its 0.1 keys `membership_every_n_epochs` and `membership_n_ref` move there, with one line."""
    memorization = config.get("memorization")
    if memorization is None:
        return
    init_args = memorization.get("init_args") or {}
    moved = {}
    for key in ("every_n_epochs", "n_ref"):
        old = f"membership_{key}"
        if init_args.get(old) is not None:
            moved[key] = init_args[old]
            init_args[old] = None
            warnings.warn(f"memorization.{old} is deprecated: use membership.{key}", FutureWarning, stacklevel=2)
    if config.get("membership") is None:
        config.membership = Namespace(class_path="memwatch.callbacks.MembershipCallback", init_args=Namespace())
    for key, value in moved.items():
        config.membership.init_args[key] = value


class NewRunFolders:
    """The log folders of `trainer`'s loggers that do not exist yet: `remove()` deletes those that exist by
    then, and the empty folders above them made with them. Only on global rank 0, which writes them."""

    def __init__(self, trainer: Trainer) -> None:
        self.loggers = []
        for logger in trainer.loggers if trainer.is_global_zero else []:
            root = getattr(logger, "root_dir", None)  # save_dir/name (TensorBoard, CSV); log_dir is a version in it
            if root is not None:
                root = Path(root)
                before = set(root.iterdir()) if root.is_dir() else None
                self.loggers.append((logger, root, before, next(p for p in (root, *root.parents) if p.exists())))

    def remove(self) -> None:
        for logger, root, before, existed in self.loggers:
            log_dir = Path(logger.log_dir)
            if not log_dir.is_relative_to(root):
                continue
            if before is None:
                made = root
            else:
                made = root / log_dir.relative_to(root).parts[0] if log_dir != root else None
                if made is None or made in before:
                    continue
            shutil.rmtree(made, ignore_errors=True)
            for folder in made.parents:
                if folder == existed or not folder.is_relative_to(existed):
                    break
                with contextlib.suppress(OSError):  # not empty: something else is in it now
                    folder.rmdir()


def config_path(value: str) -> str:
    """`NAME.yaml` as given when it is a file, else `configs/NAME.yaml` when that one is."""
    if Path(value).is_file() or not value.endswith((".yaml", ".yml")):
        return value
    shipped = CONFIG_DIR / value
    return str(shipped) if shipped.is_file() else value


def with_config_names(argv: list[str]) -> list[str]:
    """`argv` with every `--config NAME.yaml` (or `--config=NAME.yaml`) resolved by `config_path`; an
    `InputError` for a YAML found in neither place."""
    resolved = []
    for k, argument in enumerate(argv):
        if k > 0 and argv[k - 1] == "--config":
            argument = existing_config(argument)
        elif argument.startswith("--config="):
            argument = "--config=" + existing_config(argument.removeprefix("--config="))
        resolved.append(argument)
    return resolved


def existing_config(value: str) -> str:
    """`config_path(value)`, or an `InputError` naming both places looked in and the nearest shipped config."""
    found = config_path(value)
    if Path(found).is_file() or not found.endswith((".yaml", ".yml")):
        return found
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.y*ml"))
    nearest = get_close_matches(Path(value).name, shipped, n=1, cutoff=0.8)
    hint = f"did you mean {nearest[0]}?" if nearest else f"the configs there: {', '.join(shipped)}"
    raise InputError(f"--config {value} does not exist, neither here ({Path.cwd()}) nor as {CONFIG_DIR / value}: {hint}")


def main(args: list[str] | None = None) -> MemwatchCLI | dict:
    """Run the CLI on `args` (default `sys.argv[1:]`): the LightningCLI, or the audit's summary for `audit`."""
    try:
        argv = with_config_names(sys.argv[1:] if args is None else list(args))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args is None:
        # LightningCLI reads sys.argv itself when given no args (and warns when given both); DDP's
        # launcher restarts the script with sys.argv, so the children see the resolved names too.
        sys.argv[1:] = argv
    torch.set_float32_matmul_precision("high")
    silence_lightning_tips()
    # Lightning logs every log_every_n_steps steps across epochs all the same; the phantom configs' epochs are 1-2 steps.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
    # Harmless and expected here: the LDM's frozen autoencoder is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.formatwarning = deprecations_on_one_line(warnings.formatwarning)
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
            parser_class=OneLineLightningParser,
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
