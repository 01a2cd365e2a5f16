"""memwatch command line: LightningCLI's fit/validate/test/predict for every stage.

    python cli.py fit --config configs/phantom_ae.yaml
    python cli.py fit --config configs/phantom_ldm.yaml --trainer.devices 2 --trainer.strategy ddp
    python cli.py fit --config configs/phantom_ae.yaml --print_config

A user's mistake (a missing checkpoint, mismatched sizes, a bad file) ends the run with
one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import re
import sys
import warnings

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import MedicalImageDataModule
from errors import InputError
from lightning_modules import MemwatchModule

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "memwatch"},
    },
}


class MemwatchCLI(LightningCLI):
    """LightningCLI with a `last.ckpt`-saving checkpoint, a rich progress bar and start-up checks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

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
        self.model.check_data(self.datamodule)
        for callback in self.trainer.callbacks:
            if hasattr(callback, "check_data"):
                callback.check_data(self.datamodule)

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


def main(args: list[str] | None = None) -> MemwatchCLI:
    torch.set_float32_matmul_precision("high")
    # Harmless and expected here: the LDM's frozen autoencoder is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    try:
        return MemwatchCLI(
            MemwatchModule,
            MedicalImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
        )
    except Exception as error:
        cause = user_mistake(error)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
