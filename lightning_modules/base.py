"""What every memwatch LightningModule shares: data checks at start-up and self-describing checkpoints.

A checkpoint records which module wrote it and the image size it was trained on, so a
later stage (the LDM loading an autoencoder, the callback loading an embedder) can refuse
a wrong file with a clear message instead of failing deep inside a state-dict load.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from memwatch.errors import InputError

ModuleT = TypeVar("ModuleT", bound="MemwatchModule")


def nearest_multiple(size: int, factor: int) -> int:
    """The multiple of `factor` nearest to `size` (halves round up), at least `factor`: for error hints."""
    return max(factor, (size + factor // 2) // factor * factor)


def check_spatial_dims(spatial_dims: int) -> None:
    """Raise `InputError` unless `spatial_dims` is 2 or 3, the image dimensions every memwatch module supports."""
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims={spatial_dims} must be 2 or 3: set --model.init_args.spatial_dims")


def read_checkpoint_file(path: Path, named: str, fix: str, trusted: bool = False) -> dict[str, Any]:
    """The checkpoint dict at `path`, read as tensors and plain values only: unpickling any other object can run
    code. Else an `InputError` that begins with `named` (how the user gave the file: `--ckpt_path=PATH`), says
    whether the file is cut short or corrupt, or holds such an object, and ends with `fix`. Only a file the
    user vouched for (`trusted`: `--weights_only false`) is unpickled whole.

    Memory-mapped: the callers look at the records and names first and Lightning often reads the file again
    (a resume, `load_from_checkpoint`), so tensors are read from disk only where they are used."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted, mmap=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        if unsafe is None:  # not a pickle at all: garbage, or another kind of file
            raise InputError(f"{named} is not a readable checkpoint: its bytes are no torch.save file: {fix}") from None
        raise InputError(
            f"{named} holds a pickled {unsafe[1]}, and memwatch reads checkpoints as tensors and plain values only "
            f"(unpickling an object can run any code): {fix}"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises OSError, RuntimeError, EOFError... for a damaged file
        raise InputError(
            f"{named} is not a readable checkpoint: it is cut short or corrupt ({type(error).__name__}), e.g. a copy "
            f"or a save that did not finish: {fix}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{named} holds a {type(checkpoint).__name__}, not a Lightning checkpoint: {fix}")
    return checkpoint


class MemwatchModule(LightningModule):
    """Base of the autoencoder, LDM and embedder modules. Subclasses set `self.spatial_dims`."""

    spatial_dims: int
    #: how a user trains this module, for error messages
    train_command = "python cli.py fit --config configs/<dataset>_<stage>.yaml"

    def __init__(self) -> None:
        super().__init__()
        self.image_spatial_size: tuple[int, ...] | None = None
        #: sorted patients of the images it was trained on; the callback and the audit check them against the data
        self.training_patients: list[str] | None = None

    def check_data(self, datamodule: LightningDataModule) -> None:
        """Raise `InputError` if `datamodule`'s images cannot train this module."""
        data_dims = getattr(datamodule, "spatial_dims", None)
        if data_dims is not None and data_dims != self.spatial_dims:
            raise InputError(
                f"the data is {data_dims}D (spatial_size={list(datamodule.spatial_size)}) but the model is "
                f"{self.spatial_dims}D: set --model.init_args.spatial_dims {data_dims} or give the data a "
                f"{self.spatial_dims}D spatial_size"
            )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "spatial_size"):
            self.check_data(datamodule)
            self.image_spatial_size = tuple(datamodule.spatial_size)
            if stage == "fit" and hasattr(datamodule, "train_patients"):
                self.training_patients = sorted(set(datamodule.train_patients))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["memwatch"] = {
            "module": type(self).__name__,
            "image_spatial_size": list(self.image_spatial_size) if self.image_spatial_size else None,
            "training_patients": self.training_patients,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get("memwatch", {})
        size = recorded.get("image_spatial_size")
        self.image_spatial_size = tuple(size) if size else None
        patients = recorded.get("training_patients")
        patients = sorted({str(p) for p in patients}) if patients is not None else None
        this_fit = self.training_patients  # set by setup when a fit resumes (setup runs before the restore)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # A resumed fit has seen the patients of both runs; unknown if either is.
            known = this_fit is not None and patients is not None
            self.training_patients = sorted(set(patients) | set(this_fit)) if known else None
        else:
            self.training_patients = patients

    @classmethod
    def from_hparams(cls: type[ModuleT], hparams: dict[str, Any]) -> ModuleT:
        """Build a module from saved hyperparameters, which then are exactly its `hparams`."""
        # LightningCLI adds `_class_path`/`_instantiator` entries; they are not arguments.
        arguments = {k: v for k, v in hparams.items() if not k.startswith("_")}
        module = cls(**arguments)
        # Built inside another module's __init__ under LightningCLI, save_hyperparameters()
        # records the outer module's config instead of these arguments.
        module.hparams.clear()
        module.hparams.update(arguments)
        return module

    @classmethod
    def from_checkpoint(cls: type[ModuleT], path: str | Path, argument: str, map_location: Any = "cpu") -> ModuleT:
        """Load a checkpoint written by this module class, or raise an `InputError` naming `argument`,
        the command-line option without its dashes (`memorization.embedder_ckpt`, `embedder`)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(
                f"{argument}={path} does not exist: train it first ({cls.train_command}) or pass the path of "
                f"its checkpoints/last.ckpt with --{argument} PATH"
            )
        checkpoint = read_checkpoint_file(path, f"{argument}={path}", f"pass a .ckpt written by {cls.train_command}")
        written_by = checkpoint.get("memwatch", {}).get("module")
        if written_by != cls.__name__:
            raise InputError(
                f"{argument}={path} is a checkpoint of {written_by or 'an unknown module'}, not of {cls.__name__}: "
                f"pass a checkpoint written by {cls.train_command}"
            )
        module = cls.from_hparams(checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
        return module.to(map_location)
