"""The audit's inputs: embedders, a generator checkpoint, the real images (folders or a config's DataModule)
and a folder of synthetic images, each checked before anything is embedded."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from monai.data import Dataset
from monai.transforms import Compose, EnsureTyped, ScaleIntensityd, SelectItemsd

from memwatch.audit.checkpoint import generator_checkpoint
from memwatch.datamodules import DicomDataModule, FolderDataModule, MedicalImageDataModule, is_dicom_folder
from memwatch.datamodules.intensity import CheckUnitRange
from memwatch.datamodules.readers.image_files import LoadImageFile, image_records
from memwatch.errors import InputError
from memwatch.lightning_modules.plugins import TrustedModules, embedder_name, load_embedder, load_generator
from memwatch.memorization.chance import check_patients, extrapolation_notice
from memwatch.memorization.embedders import Embedder, probe_generator
from memwatch.memorization.output_folders import check_output_folders, data_paths


@dataclass(frozen=True)
class AuditInputs:
    """Everything the audit reads, checked: the embedders (by name), the images' size, the real images, and the
    synthetic images as a generator to sample or a folder."""

    device: torch.device
    embedders: dict[str, Embedder]
    size: tuple[int, ...]
    datamodule: MedicalImageDataModule
    generator: torch.nn.Module | None
    generator_file: dict[str, Any] | None  # which model, by step and hash
    synthetic: Dataset | None

    @property
    def train(self) -> Dataset:
        return self.datamodule.reference_dataset("train")

    @property
    def val(self) -> Dataset:
        return self.datamodule.reference_dataset("val")

    @property
    def train_patients(self) -> list[str]:
        return self.datamodule.train_patients

    @property
    def val_patients(self) -> list[str]:
        return self.datamodule.val_patients

    def samples(self, folder: Path) -> Dataset:
        """The generator's samples written to `folder`, as a synthetic folder."""
        return synthetic_folder(folder, self.size, "none")


def read_inputs(args: Namespace, outputs: Mapping[str, Path]) -> AuditInputs:
    """Read and check every input, after checking that no output in `outputs` overlaps one."""
    configured = configured_datamodule(args)
    check_output_folders(outputs, input_paths(args, configured), args.overwrite)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    trusted = trusted_modules(args)
    embedders, size = load_embedders(args.embedder, args.spatial_size, trusted)
    embedders = {name: embedder.to(device) for name, embedder in embedders.items()}
    generator = (
        load_generator(args.generator, "generator", trusted).to(device).eval() if args.generator else None
    )
    datamodule = reference_data(args, size, configured)
    train, val = datamodule.reference_dataset("train"), datamodule.reference_dataset("val")
    for embedder in embedders.values():
        check_patients(
            embedder.training_patients, datamodule.train_patients, datamodule.val_patients, args.percentile,
            "--embedder", "--embedder",
        )  # fmt: skip
    if generator is not None:
        check_generator(generator, args, size, embedders, datamodule.train_patients)
    synthetic = None if generator else synthetic_folder(Path(args.synthetic), size, args.intensity)
    n_syn = (args.n_samples or len(train)) if generator else len(synthetic)
    fewer = f"--n-samples {len(val)}" if generator else "fewer images in --synthetic"
    notice = extrapolation_notice(n_syn, len(val), fewer)
    if notice:
        print(f"audit: {notice}", file=sys.stderr, flush=True)
    generator_file = generator_checkpoint(args.generator) if args.generator else None
    return AuditInputs(device, embedders, size, datamodule, generator, generator_file, synthetic)


def trusted_modules(args: Namespace) -> TrustedModules:
    """memwatch's modules and every `--trust-module`: the only ones whose classes the audit imports."""
    return TrustedModules(tuple(args.trust_module))


def load_embedders(
    specs: Sequence[str], spatial_size: Sequence[int] | None, trusted: TrustedModules
) -> tuple[dict[str, Embedder], tuple[int, ...]]:
    """Every `--embedder`, by a name unique among them, and the image size they take."""
    trained = {
        spec: load_embedder(spec, "embedder", trusted=trusted)
        for spec in specs
        if not spec.startswith("pixel")
    }
    sizes = {
        spec: tuple(e.image_spatial_size) for spec, e in trained.items() if e.image_spatial_size is not None
    }
    size = tuple(spatial_size) if spatial_size else next(iter(sizes.values()), None)
    if size is None:
        unsized = next(iter(trained), None)
        raise InputError(
            f"--embedder={unsized} does not record its image size: retrain it with the current memwatch"
            if unsized is not None
            else "--embedder pixel takes any size: give the images' size with --spatial-size, e.g. --spatial-size 64 64"
        )
    embedders: dict[str, Embedder] = {}
    for spec in specs:
        embedder = trained.get(spec) or load_embedder(spec, "embedder", spatial_dims=len(size))
        if spec in sizes and sizes[spec] != size:
            raise InputError(
                f"--embedder={spec} was trained on images of size {list(sizes[spec])}, the other embedders (or "
                f"--spatial-size) on {list(size)}: compare embedders trained on the same data"
            )
        if embedder.spatial_dims != len(size):
            raise InputError(
                f"--embedder={spec} takes {embedder.spatial_dims}D images, the data is {len(size)}D: pass an embedder of the data's dimensionality"
            )
        name = embedder_name(spec)
        embedders[name if name not in embedders else f"{name}#{len(embedders) + 1}"] = embedder
    return embedders, size


def check_generator(
    generator: torch.nn.Module,
    args: Namespace,
    size: tuple[int, ...],
    embedders: dict,
    train_patients: Sequence[str],
) -> None:
    """Refuse a generator of other images than the embedders take, or trained on other patients (a wrong fold,
    subset or root), before anything is sampled for real."""
    name = f"--generator={args.generator}"
    recorded = getattr(generator, "image_spatial_size", None)
    if recorded is not None and tuple(recorded) != size:
        raise InputError(
            f"{name} makes images of size {list(recorded)} but the embedder was trained on "
            f"{list(size)}: pass the embedder trained on that model's data"
        )
    channels = next(iter(embedders.values())).in_channels
    probe_generator(generator, args.seed, channels, size, f"{type(generator).__name__} ({name})")
    trained_on = getattr(generator, "training_patients", None)
    if trained_on is None:
        return
    trained, given = set(trained_on), set(train_patients)
    if trained != given:
        raise InputError(
            f"{name} was trained on {len(trained)} patients but the data gives {len(given)} training "
            f"patients ({len(trained & given)} in common): pass the data options it was trained with "
            "(--data with its config and --data-arg for root, fold, n_train, ...)"
        )


def configured_datamodule(args: Namespace) -> MedicalImageDataModule | None:
    """The `--data` config's DataModule (not set up yet), or `None` for `--train`/`--val` folders."""
    return (
        datamodule_from_config(Path(args.data), args.data_arg, trusted_modules(args)) if args.data else None
    )


def input_paths(args: Namespace, configured: MedicalImageDataModule | None) -> list[tuple[str, str | None]]:
    """Every file and folder the audit reads, with the option that names it: what no output may overlap."""
    return [
        ("--train", args.train), ("--val", args.val), ("--synthetic", args.synthetic), ("--generator", args.generator),
        ("--data", args.data), *data_paths(configured, "the --data config's {}").items(),
        *(("--embedder", embedder_file(spec)) for spec in args.embedder),
    ]  # fmt: skip


def embedder_file(spec: str) -> str | None:
    """`checkpoint_file(spec)`, or `None` for a spec that is no YAML mapping (`load_embedders` names that error)."""
    try:
        return checkpoint_file(spec)
    except (yaml.YAMLError, AttributeError):
        return None


def reference_data(
    args: Namespace, size: tuple[int, ...], configured: MedicalImageDataModule | None
) -> MedicalImageDataModule:
    """The real images: `configured` (from `--data`), else the `--train` and `--val` folders; set up."""
    if configured is not None:
        datamodule = configured
    elif is_dicom_folder(Path(args.train), "--train"):
        # Intensity as DicomDataModule reads it (a CT window in 3D, min-max in 2D); for the
        # embedder's own settings give its config: --data configs/dicom_ldm.yaml --data-arg root=...
        datamodule = DicomDataModule(
            args.train,
            val_root=args.val,
            spatial_size=size,
            batch_size=args.sample_batch_size,
            num_workers=args.num_workers,
        )
    else:
        datamodule = FolderDataModule(
            args.train, args.val, spatial_size=size, resize=args.resize, intensity=args.intensity,
            batch_size=args.sample_batch_size, num_workers=args.num_workers,
        )  # fmt: skip
    if tuple(datamodule.spatial_size) != size:
        raise InputError(
            f"the embedder was trained on images of size {list(size)} but --data {args.data} gives "
            f"{list(datamodule.spatial_size)}: pass the embedder trained on this data, or set --data-arg spatial_size=..."
        )
    datamodule.setup("fit")
    return datamodule


def datamodule_from_config(
    path: Path, overrides: Sequence[str], trusted: TrustedModules
) -> MedicalImageDataModule:
    """The DataModule of a memwatch config's `data` section, with `KEY=VALUE` overrides of its init_args."""
    if not path.is_file():
        raise InputError(f"--data {path} does not exist: pass a config such as configs/phantom_ldm.yaml")
    try:
        config = yaml.safe_load(path.read_text())
        data = dict(config["data"])
    except Exception as error:
        raise InputError(
            f"--data {path} has no readable data section ({error}): pass a memwatch config YAML"
        ) from None
    init_args = dict(data.get("init_args") or {})
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key:
            raise InputError(
                f"--data-arg {override!r} is not KEY=VALUE, e.g. --data-arg root=/data/MRNet-v1.0"
            )
        init_args[key] = yaml.safe_load(value)
    return trusted.instantiate(
        str(data.get("class_path")), init_args, f"--data {path}", "check the data section and --data-arg"
    )


def synthetic_folder(folder: Path, size: tuple[int, ...], intensity: str) -> Dataset:
    """The images of a synthetic folder as a Dataset of `{"image": [1, *size], "id"}`; every file checked first."""
    records = image_records(folder, "--synthetic", len(size))
    first = records[0]
    for record in records:
        if record["shape"] != first["shape"]:
            raise InputError(
                f"--synthetic holds images of mixed sizes: {record['image_path']} is {list(record['shape'])}, "
                f"{first['image_path']} is {list(first['shape'])}: a model's samples share one size, remove the odd files"
            )
    if first["shape"] != size:
        raise InputError(
            f"the synthetic images are {list(first['shape'])} (e.g. {first['image_path']}) but the embedder was "
            f"trained on {list(size)}: pass the embedder trained on the generating model's data"
        )
    scale = (
        [ScaleIntensityd(keys="image", minv=0.0, maxv=1.0)]
        if intensity == "minmax"
        else [CheckUnitRange("--intensity")]
    )
    finish = [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        SelectItemsd(keys=["image", "id"]),
    ]
    dataset = Dataset(records, Compose([LoadImageFile(), *scale, *finish]))
    dataset.files = [Path(r["image_path"]) for r in records]
    dataset.relative = [Path(r["image_path"]).relative_to(folder) for r in records]
    return dataset


def dataset_ids(dataset: Dataset) -> list[str]:
    return [record["id"] for record in dataset.data]


def audit_inputs(args: Namespace) -> dict[str, Any]:
    keys = (
        "embedder",
        "train",
        "val",
        "data",
        "data_arg",
        "synthetic",
        "generator",
        "n_samples",
        "seed",
        "num_inference_steps",
        "membership_n_ref",
        "intensity",
    )
    return {key: getattr(args, key) for key in keys if getattr(args, key) not in (None, [])}


def checkpoint_file(spec: str) -> str | None:
    """The file behind an embedder specification, for the manifest's hash (none for `pixel`)."""
    if spec.startswith("pixel"):
        return None
    if spec.lstrip().startswith("{"):
        return (yaml.safe_load(spec).get("init_args") or {}).get("path")
    return spec
