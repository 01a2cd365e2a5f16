"""Every embedder and generator the callback and the audit accept.

Embedders, from one specification:

- a path to a `SimCLRModule` checkpoint (`.ckpt`), as before;
- `pixel` (or `pixel:16`): `memorization.embedders.PixelEmbedder` at 16 pixels per axis, mirror invariant;
- a `{class_path, init_args}` mapping (or its YAML text) of any class with `embed`, such as
  `memorization.embedders.TorchScriptEmbedder` (`init_args: {path, spatial_size}`) or
  `PixelEmbedder` with other options.

A class path read from data (a checkpoint's `hyper_parameters._class_path`, an embedder specification, the
audit's `--data` config) is imported only when `TrustedModules` allows it: importing a module runs its code.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import instantiate_class

from memwatch.errors import InputError
from memwatch.legacy_names import is_old_name
from memwatch.lightning_modules.base import read_checkpoint_file
from memwatch.lightning_modules.latent_diffusion import LatentDiffusionModule
from memwatch.lightning_modules.simclr import SimCLRModule
from memwatch.memorization.embedders import Embedder, PixelEmbedder

EmbedderSpec = str | Mapping[str, Any]
REQUIRED = ("embed", "spatial_dims", "in_channels", "embedding_dim")


@dataclass(frozen=True)
class TrustedModules:
    """The modules whose classes may be imported when data names them: memwatch's own (`memwatch.*`, and the
    old names `memwatch.legacy_names` aliases) and `names`, which the user trusts through `trust_with`
    (`{module}` stands for the module to name)."""

    names: Sequence[str] = ()
    trust_with: str = "--trust-module {module}"

    def check(self, class_path: str, where: str) -> None:
        """Raise `InputError`, before anything is imported, unless `class_path` lies in a trusted module."""
        own = class_path.startswith("memwatch.") or is_old_name(class_path)
        if own or any(class_path == name or class_path.startswith(name + ".") for name in self.names):
            return
        package = class_path.partition(".")[0]
        raise InputError(
            f"{where} names the class {class_path}, which is not memwatch's, and importing it would run its code: "
            f"if you trust {package}, pass {self.trust_with.format(module=package)}"
        )

    def instantiate(self, class_path: str, init_args: Mapping[str, Any], where: str, fix: str) -> Any:
        """`class_path` built from `init_args`, imported only once `check` allows it; a class that cannot be
        imported or built is one `InputError` line: `{where}: cannot build {class_path} (...): {fix}`."""
        self.check(class_path, where)
        try:
            return instantiate_class((), {"class_path": class_path, "init_args": dict(init_args)})
        except InputError:
            raise
        except (ImportError, AttributeError, TypeError, ValueError, KeyError) as error:
            raise InputError(
                f"{where}: cannot build {class_path} ({type(error).__name__}: {error}): {fix}"
            ) from None


def embedder_text(spec: EmbedderSpec) -> str:
    """`spec` as the one-line text `--embedder` takes: a mapping (from an audit.yaml) as flow YAML."""
    return spec if isinstance(spec, str) else yaml.safe_dump(dict(spec), default_flow_style=True, width=math.inf).strip()


def load_embedder(
    spec: EmbedderSpec, option: str, spatial_dims: int | None = None, trusted: TrustedModules = TrustedModules()
) -> Embedder:
    """The embedder `spec` names, in eval mode; `option` (the flag without dashes) is named in errors.

    `spatial_dims` (the data's) sets the dimensionality of `pixel`; a class path outside `trusted` is refused.
    """
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as error:
            raise InputError(f"{option}={spec!r} is not a YAML mapping ({error.problem}): write {{class_path: ..., init_args: {{...}}}}") from None
    if isinstance(spec, Mapping):
        embedder = _instantiate(spec, option, trusted)
    elif spec == "pixel" or str(spec).startswith("pixel:"):
        side = int(spec.partition(":")[2] or 16)
        embedder = PixelEmbedder(size=(side,) * (spatial_dims or 2))
    else:
        embedder = SimCLRModule.from_checkpoint(Path(spec), option)
    return embedder.eval().requires_grad_(False) if hasattr(embedder, "eval") else embedder


def _instantiate(spec: Mapping[str, Any], option: str, trusted: TrustedModules) -> Embedder:
    if "class_path" not in spec:
        raise InputError(f"{option}={dict(spec)} has no class_path: write {{class_path: package.Class, init_args: {{...}}}}")
    embedder = trusted.instantiate(
        str(spec["class_path"]), spec.get("init_args") or {}, f"--{option}", "check class_path and init_args"
    )
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


def load_generator(path: str, option: str, trusted: TrustedModules = TrustedModules()) -> LightningModule:
    """A generator's checkpoint: memwatch's LDM, or any LightningModule with `sample` that `cli.py fit`
    trained (LightningCLI records its class in `hyper_parameters._class_path`), of a module in `trusted`."""
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
    trusted.check(str(class_path), f"--{option}={path}")
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
    return read_checkpoint_file(path, f"--{option}={path}", "pass a .ckpt written by python cli.py fit")
