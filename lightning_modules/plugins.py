"""Every embedder and generator the callback and the audit accept.

Embedders, from one specification:

- a path to a `SimCLRModule` checkpoint (`.ckpt`), as before;
- `pixel` (or `pixel:16`): `memorization.embedders.PixelEmbedder` at 16 pixels per axis, mirror invariant;
- a `{class_path, init_args}` mapping (or its YAML text) of any class with `embed`, such as
  `memorization.embedders.TorchScriptEmbedder` (`init_args: {path, spatial_size}`) or
  `PixelEmbedder` with other options.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import instantiate_class

from memwatch.errors import InputError
from memwatch.lightning_modules.latent_diffusion import LatentDiffusionModule
from memwatch.lightning_modules.simclr import SimCLRModule
from memwatch.memorization.embedders import Embedder, PixelEmbedder

EmbedderSpec = str | Mapping[str, Any]
REQUIRED = ("embed", "spatial_dims", "in_channels", "embedding_dim")


def load_embedder(spec: EmbedderSpec, option: str, spatial_dims: int | None = None) -> Embedder:
    """The embedder `spec` names, in eval mode; `option` (the flag without dashes) is named in errors.

    `spatial_dims` (the data's) sets the dimensionality of `pixel`.
    """
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as error:
            raise InputError(f"{option}={spec!r} is not a YAML mapping ({error.problem}): write {{class_path: ..., init_args: {{...}}}}") from None
    if isinstance(spec, Mapping):
        embedder = _instantiate(spec, option)
    elif spec == "pixel" or str(spec).startswith("pixel:"):
        side = int(spec.partition(":")[2] or 16)
        embedder = PixelEmbedder(size=(side,) * (spatial_dims or 2))
    else:
        embedder = SimCLRModule.from_checkpoint(Path(spec), option)
    return embedder.eval().requires_grad_(False) if hasattr(embedder, "eval") else embedder


def _instantiate(spec: Mapping[str, Any], option: str) -> Embedder:
    if "class_path" not in spec:
        raise InputError(f"{option}={dict(spec)} has no class_path: write {{class_path: package.Class, init_args: {{...}}}}")
    try:
        embedder = instantiate_class((), {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})})
    except InputError:
        raise
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        raise InputError(
            f"{option}: cannot build {spec['class_path']} ({type(error).__name__}: {error}): check class_path and init_args"
        ) from None
    missing = [name for name in REQUIRED if not hasattr(embedder, name)]
    if missing:
        raise InputError(
            f"{option}: {spec['class_path']} is not an embedder (it has no {', '.join(missing)}): implement "
            "memwatch.memorization.embedders.Embedder (embed(images) -> [B, L], spatial_dims, in_channels, embedding_dim)"
        )
    for name, default in (("image_spatial_size", None), ("training_patients", None)):
        if not hasattr(embedder, name):
            setattr(embedder, name, default)
    return embedder


def embedder_name(spec: EmbedderSpec) -> str:
    """A short name for reports: the checkpoint's file name (after its run, `name/version/`, when it lies in
    a run's `checkpoints/`: every run has a `last.ckpt`), `pixel`, or the class and its file."""
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        spec = yaml.safe_load(spec)
    if isinstance(spec, Mapping):
        cls = str(spec.get("class_path", "?")).rsplit(".", 1)[-1]
        path = (spec.get("init_args") or {}).get("path")
        return f"{cls}({Path(path).name})" if path else cls
    if str(spec).startswith("pixel"):
        return str(spec)
    path = Path(spec)
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        run = path.parent.parent
        return f"{run.parent.name}/{run.name}/{path.name}" if run.parent.name else f"{run.name}/{path.name}"
    return path.name


def load_generator(path: str, option: str) -> LightningModule:
    """A generator's checkpoint: memwatch's LDM, or any LightningModule with `sample` that `cli.py fit`
    trained (LightningCLI records its class in `hyper_parameters._class_path`)."""
    checkpoint = read_checkpoint(Path(path), option)
    written_by = (checkpoint.get("memwatch") or {}).get("module")
    if written_by == "LatentDiffusionModule":
        return LatentDiffusionModule.from_checkpoint(path, option)
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if not class_path:
        raise InputError(
            f"--{option}={path} does not record the class that wrote it ({written_by or 'no hyper_parameters._class_path'}): "
            "pass a checkpoint of a generator trained with python cli.py fit"
        )
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise InputError(
            f"--{option}={path} was written by {class_path}, which cannot be imported ({error}): put its package on PYTHONPATH"
        ) from None
    if not callable(getattr(cls, "sample", None)):
        raise InputError(
            f"--{option}={path} is a checkpoint of {cls.__name__}, not of a generator (it has no sample()): pass "
            "the checkpoint of a model that implements memwatch.memorization.embedders.Generator"
        )
    try:
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a user's class may fail in many ways
        raise InputError(f"--{option}={path}: {class_path} cannot load it ({type(error).__name__}: {error})") from None


def read_checkpoint(path: Path, option: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"--{option}={path} does not exist: pass the generator's checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read means a bad file
        raise InputError(f"--{option}={path} is not a readable checkpoint ({type(error).__name__}): pass a .ckpt") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"--{option}={path} is not a Lightning checkpoint: pass a .ckpt written by python cli.py fit")
    return checkpoint
