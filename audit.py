"""`python cli.py audit`: check a synthetic dataset for copies of training patients before it is shared.

    python cli.py audit --embedder EMB.ckpt --train DIR --val DIR --synthetic DIR --out OUT
    python cli.py audit --embedder EMB.ckpt --data configs/mrnet_ldm.yaml --data-arg root=/data/MRNet-v1.0 \\
        --ldm LDM.ckpt --n-samples 904 --seed 0 --out OUT --release-dir SHAREABLE
    python cli.py audit --config audit.yaml             (the same options as YAML keys: n_samples, data_arg, ...)
    python cli.py audit --verify-release SHAREABLE      (is the released folder still what was audited?)

The training and validation images come from two folders (read as `FolderDataModule`
reads them, or as `DicomDataModule` when they hold DICOM) or from a config's DataModule;
the synthetic images from a folder or from an LDM checkpoint (sampled into `OUT/samples/`,
sample `i` seeded by `(seed, i)`). Every image is embedded by the SimCLR embedder, copies are
counted with `memorization.detect_copies` (τ = the `--percentile` of training → held-out
similarities), and `OUT` receives `report.html` (the verdict and evidence on one page),
`summary.json`, `pairs.csv`, `train_nn.csv`, `histogram.png` and `copies.png`.
`--release-dir` receives only the synthetic files that are not copies, and `manifest.json`
(`memorization.release`), which `--verify-release` checks later.

`OUT` (and the release folder) appear only complete: everything is written under a
temporary name and moved into place at the end.
"""
from __future__ import annotations

import datetime
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import instantiate_class
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped, ScaleIntensityd, SelectItemsd

from datamodules import DicomDataModule, FolderDataModule, MedicalImageDataModule, is_dicom_folder
from datamodules.folder import CheckUnitRange, LoadImageFile, image_records
from datamodules.transforms import (
    CONTRAST_GAMMA,
    NOISE_STD,
    ROTATION_DEGREES,
    variation_batches,
    variation_transform,
)
from errors import InputError
from lightning_modules import LatentDiffusionModule, SimCLRModule
from memorization import detect_copies, frechet_distance
from memorization.chance import (
    chance_level,
    check_patients,
    detector_check,
    held_out_exceedances,
    positive_rows,
)
from memorization.detect import CopyReport
from memorization.release import MANIFEST, ReleasedFile, verify_release, write_manifest
from memorization.report import check_output_folder, staged_output, write_report
from memorization.stats import CI_METHOD, headline
from memorization.stream import EmbeddedStream, Progress, chunked, embed_stream


def audit_parser() -> ArgumentParser:
    """The audit's options, jsonargparse like the rest of the CLI: `--config audit.yaml` sets any of them
    (keys as the long names: `n_samples`, `data_arg`, ...) and `--print_config` shows them. Each option
    also answers to its name with dashes (`--n-samples`), as before."""
    parser = ArgumentParser(
        prog="python cli.py audit",
        description="Count the copies of training patients in a synthetic dataset before sharing it.",
        default_meta=False,
    )
    parser.add_argument("--config", action="config", help="a YAML of these options (see --print_config)")
    parser.add_argument("--embedder", help="SimCLR embedder checkpoint (trained on the training images)")
    parser.add_argument("--out", help="folder for report.html, summary.json, pairs.csv, train_nn.csv and the plots")
    real = parser.add_argument_group("real images: --train and --val, or --data")
    real.add_argument(
        "--train", help="folder of training images (.png, .npy, .nii, .nii.gz, DICOM; subfolder = patient)"
    )
    real.add_argument("--val", help="folder of held-out images, of patients not in --train")
    real.add_argument(
        "--data", help="a config YAML whose data section gives the DataModule, e.g. configs/mrnet_ldm.yaml"
    )
    real.add_argument(
        "--data_arg", "--data-arg", action="append", default=[], metavar="KEY=VALUE",
        help="override one of the config's data init_args, e.g. root=/data/MRNet-v1.0 (repeatable)",
    )  # fmt: skip
    real.add_argument(
        "--resize", choices=["resize", "crop_or_pad"], default="resize", help="for --train/--val folders"
    )
    synthetic = parser.add_argument_group("synthetic images: --synthetic, or --ldm")
    synthetic.add_argument(
        "--synthetic", help="folder of synthetic images, each of the embedder's image size"
    )
    synthetic.add_argument("--ldm", help="LatentDiffusionModule checkpoint to sample instead")
    synthetic.add_argument(
        "--n_samples", "--n-samples", type=int, help="samples to draw with --ldm (default: the training-set size)"
    )
    synthetic.add_argument("--seed", type=int, default=0, help="sample i is seeded by (seed, i)")
    synthetic.add_argument(
        "--num_inference_steps", "--num-inference-steps", type=int, default=50, help="DDIM steps per sample"
    )
    parser.add_argument(
        "--intensity", choices=["minmax", "none"], default="minmax",
        help="minmax scales each image from a folder to [0, 1] (as FolderDataModule does); none keeps "
        "values that already lie in [0, 1]. LDM samples are in [0, 1] already and never rescaled",
    )  # fmt: skip
    parser.add_argument(
        "--percentile", type=float, default=95.0, help="τ is this percentile of training→held-out similarity"
    )
    parser.add_argument(
        "--release_dir", "--release-dir",
        help="copy the synthetic files that are not copies here, with manifest.json, ready to share",
    )  # fmt: skip
    parser.add_argument(
        "--verify_release", "--verify-release", metavar="DIR",
        help="check a released folder against its manifest.json (no audit): exit 1 if a file was added, removed or changed",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out and --release-dir if they hold files"
    )
    parser.add_argument(
        "--batch_size", "--batch-size", type=int, default=32, help="images per embedding (and sampling) batch"
    )
    parser.add_argument(
        "--num_workers", "--num-workers", type=int, default=0, help="DataLoader workers for reading images"
    )
    check = parser.add_argument_group("the detector's self-check (variations of training images vs held-out images)")
    check.add_argument(
        "--detector_positives", "--detector-positives", type=int, default=1000,
        help="training images (evenly spaced) whose variations must be flagged; 0 skips the self-check",
    )  # fmt: skip
    check.add_argument(
        "--variation_rotation_degrees", "--variation-rotation-degrees", type=float, default=ROTATION_DEGREES,
        help="rotation within ±this",
    )  # fmt: skip
    check.add_argument(
        "--variation_contrast_gamma", "--variation-contrast-gamma", type=float, nargs=2,
        default=list(CONTRAST_GAMMA), metavar=("LOW", "HIGH"), help="range of the contrast change's gamma",
    )  # fmt: skip
    check.add_argument(
        "--variation_noise_std", "--variation-noise-std", type=float, default=NOISE_STD, help="std of the added noise"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--progress_seconds", "--progress-seconds", type=float, default=30.0,
        help="while sampling and embedding, a line on stderr every this many seconds (0: after every batch)",
    )  # fmt: skip
    return parser


def run_audit(argv: Sequence[str]) -> dict[str, Any]:
    """Parse `argv` (the words after `audit`), audit, and return the summary written to `OUT/summary.json`."""
    args = audit_parser().parse_args(list(argv))
    if args.verify_release:
        return verify_release(Path(args.verify_release))
    _check_arguments(args)
    out = Path(args.out)
    check_output_folder(out, "--out", args.overwrite)
    if args.release_dir:
        check_output_folder(Path(args.release_dir), "--release-dir", args.overwrite)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    embedder = SimCLRModule.from_checkpoint(args.embedder, "embedder").to(device).eval()
    size = _embedder_size(embedder, args.embedder)
    ldm = _load_ldm(args, size, device) if args.ldm else None
    datamodule = _reference_data(args, size)
    train, val = datamodule.reference_dataset("train"), datamodule.reference_dataset("val")
    train_patients = datamodule.train_patients
    check_patients(embedder.training_patients, train_patients, datamodule.val_patients, args.percentile, "--embedder", "--embedder")
    if ldm is not None:
        _check_ldm_patients(ldm, args, train_patients)
    synthetic = None if ldm else synthetic_folder(Path(args.synthetic), size, args.intensity)
    variation = variation_transform(
        len(size), rotation_degrees=args.variation_rotation_degrees,
        contrast_gamma=tuple(args.variation_contrast_gamma), noise_std=args.variation_noise_std,
    )  # fmt: skip

    release = (
        staged_output(args.release_dir, "--release-dir", args.overwrite)
        if args.release_dir
        else nullcontext()
    )
    # Both folders move into place only after everything in both is written.
    with staged_output(out, "--out", args.overwrite) as staging, release as release_staging:
        if ldm is not None:
            samples = staging / "samples"
            chunks = sample_chunks(
                ldm, samples, args.n_samples or len(train), args.seed, args.num_inference_steps, args.batch_size
            )
            # Embedded while sampled: one pass, never all samples in memory.
            syn = embed_stream(
                chunks, embedder.embed, score_pairs=True, require_finite=f"--ldm {args.ldm}", device=device,
                progress=progress(args, "sampling and embedding --ldm samples", args.n_samples or len(train)),
            )  # fmt: skip
            synthetic = synthetic_folder(samples, tuple(ldm.image_spatial_size), "none")
        else:
            syn = embed(embedder, synthetic, args, device, "--synthetic", score_pairs=True)
        embeddings = {
            "train": embed(embedder, train, args, device, "training").embeddings,
            "val": embed(embedder, val, args, device, "held-out").embeddings,
            "syn": syn.embeddings,
        }
        report = detect_copies(
            embeddings["train"], embeddings["val"], embeddings["syn"], percentile=args.percentile
        )
        exceedances = held_out_exceedances(embeddings["train"], embeddings["val"], args.percentile, train_patients)
        detector = None
        if args.detector_positives:
            rows = positive_rows(len(train), args.detector_positives)
            varied = embed_stream(
                (images.to(device) for images in variation_batches(train, rows, args.batch_size, args.seed, variation)),
                embedder.embed, device=device, progress=progress(args, "embedding varied training images", len(rows)),
            ).embeddings  # fmt: skip
            detector = detector_check(varied, embeddings["train"], exceedances)
        chance = chance_level(exceedances, len(embeddings["syn"]))
        fd = (
            frechet_distance(embeddings["syn"], embeddings["val"])
            if min(len(synthetic), len(val)) >= 2
            else None
        )
        summary = {
            **headline(report, train_patients, chance),
            "n_val": len(val),
            "ci_method": CI_METHOD,
            "null_method": chance.method,
            "detector": detector.as_dict() if detector else None,
            "fd": fd,
            "ms_ssim": float(syn.pair_scores.mean()) if len(syn.pair_scores) else None,
            "inputs": _inputs(args),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        if release_staging is not None:
            released = release_non_copies(synthetic, report, release_staging)
            summary["release"] = {
                "dir": args.release_dir, "n_released": len(released), "n_withheld": len(synthetic) - len(released),
                "manifest": MANIFEST,
            }  # fmt: skip
        write_report(
            staging, report, dataset_ids(train), dataset_ids(synthetic), summary,
            train_image=lambda i: train[i]["image"], syn_image=lambda j: synthetic[j]["image"],
            train_patients=train_patients,
        )  # fmt: skip
        if release_staging is not None:
            write_manifest(
                release_staging, released, tau=report.tau, percentile=report.percentile,
                n_withheld=len(synthetic) - len(released), checkpoints={"embedder": args.embedder, "generator": args.ldm},
                summary=json.loads((staging / "summary.json").read_text()),
            )  # fmt: skip
    return {**json.loads((out / "summary.json").read_text()), "out": str(out)}


# --- inputs ------------------------------------------------------------------------------


def _check_arguments(args: Namespace) -> None:
    for option, example in (("embedder", "EMB.ckpt"), ("out", "OUT")):
        if getattr(args, option) is None:
            raise InputError(
                f"--{option} is required: give --{option} {example} (or check a release with --verify-release DIR)"
            )
    folders, data = args.train is not None or args.val is not None, args.data is not None
    if folders == data or (folders and (args.train is None or args.val is None)):
        raise InputError("give the real images as --train DIR --val DIR, or as --data CONFIG.yaml (not both)")
    if (args.synthetic is None) == (args.ldm is None):
        raise InputError(
            "give the synthetic images as --synthetic DIR, or --ldm LDM.ckpt to sample them (not both)"
        )
    if args.n_samples is not None and (args.ldm is None or args.n_samples < 1):
        raise InputError(f"--n-samples {args.n_samples} needs --ldm and must be at least 1")
    if args.data_arg and not data:
        raise InputError("--data-arg overrides a --data config: give --data CONFIG.yaml too")
    if not 0.0 < args.percentile < 100.0:
        raise InputError(f"--percentile {args.percentile} must lie in (0, 100), e.g. 95")
    if args.batch_size < 2:
        raise InputError(f"--batch-size {args.batch_size} must be at least 2")
    if args.detector_positives < 0:
        raise InputError(f"--detector-positives {args.detector_positives} must be at least 0 (0 skips the self-check)")


def _embedder_size(embedder: SimCLRModule, path: str) -> tuple[int, ...]:
    if embedder.image_spatial_size is None:
        raise InputError(
            f"--embedder={path} does not record its image size: retrain it with the current memwatch"
        )
    return tuple(embedder.image_spatial_size)


def _load_ldm(args: Namespace, size: tuple[int, ...], device: torch.device) -> LatentDiffusionModule:
    ldm = LatentDiffusionModule.from_checkpoint(args.ldm, "ldm").to(device).eval()
    if ldm.image_spatial_size is not None and tuple(ldm.image_spatial_size) != size:
        raise InputError(
            f"--ldm={args.ldm} makes images of size {list(ldm.image_spatial_size)} but the embedder was trained on "
            f"{list(size)}: pass the embedder trained on that model's data"
        )
    return ldm


def _check_ldm_patients(ldm: LatentDiffusionModule, args: Namespace, train_patients: Sequence[str]) -> None:
    """Refuse to count copies of other patients than those the LDM was trained on (a wrong fold, subset or root)."""
    if ldm.training_patients is None:
        return
    trained, given = set(ldm.training_patients), set(train_patients)
    if trained != given:
        raise InputError(
            f"--ldm={args.ldm} was trained on {len(trained)} patients but the data gives {len(given)} training "
            f"patients ({len(trained & given)} in common): pass the data options it was trained with "
            "(--data with its config and --data-arg for root, fold, n_train, ...)"
        )


def _reference_data(args: Namespace, size: tuple[int, ...]) -> MedicalImageDataModule:
    if args.data:
        datamodule = datamodule_from_config(Path(args.data), args.data_arg)
    elif is_dicom_folder(Path(args.train)):
        # Intensity as DicomDataModule reads it (a CT window in 3D, min-max in 2D); for the
        # embedder's own settings give its config: --data configs/dicom_ldm.yaml --data-arg root=...
        datamodule = DicomDataModule(
            args.train, val_root=args.val, spatial_size=size, batch_size=args.batch_size, num_workers=args.num_workers
        )
    else:
        datamodule = FolderDataModule(
            args.train, args.val, spatial_size=size, resize=args.resize, intensity=args.intensity,
            batch_size=args.batch_size, num_workers=args.num_workers,
        )  # fmt: skip
    if tuple(datamodule.spatial_size) != size:
        raise InputError(
            f"the embedder was trained on images of size {list(size)} but --data {args.data} gives "
            f"{list(datamodule.spatial_size)}: pass the embedder trained on this data, or set --data-arg spatial_size=..."
        )
    datamodule.setup("fit")
    return datamodule


def datamodule_from_config(path: Path, overrides: Sequence[str]) -> MedicalImageDataModule:
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
    try:
        return instantiate_class((), {"class_path": data["class_path"], "init_args": init_args})
    except InputError:
        raise
    except (TypeError, ImportError, AttributeError, KeyError) as error:
        raise InputError(
            f"--data {path}: cannot build its DataModule ({error}): check the data section and --data-arg"
        ) from None


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
    scale = [ScaleIntensityd(keys="image", minv=0.0, maxv=1.0)] if intensity == "minmax" else [CheckUnitRange("--intensity")]
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


def _inputs(args: Namespace) -> dict[str, Any]:
    keys = (
        "embedder",
        "train",
        "val",
        "data",
        "data_arg",
        "synthetic",
        "ldm",
        "n_samples",
        "seed",
        "num_inference_steps",
        "intensity",
    )
    return {key: getattr(args, key) for key in keys if getattr(args, key) not in (None, [])}


# --- work --------------------------------------------------------------------------------


def sample_chunks(
    ldm: LatentDiffusionModule, folder: Path, n: int, seed: int, num_inference_steps: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Draw `n` samples in chunks of `batch_size`, writing `sample_{i:06d}.npy` (float32 `[*spatial]` in `[0, 1]`) as they come."""
    folder.mkdir(parents=True)

    def draw(indices: range) -> torch.Tensor:
        images = ldm.sample(
            len(indices), seed=seed, num_inference_steps=num_inference_steps,
            sample_batch_size=batch_size, start_index=indices.start,
        )  # fmt: skip
        for offset, image in enumerate(images.float().cpu().numpy()):
            np.save(folder / f"sample_{indices.start + offset:06d}.npy", image[0])
        return images

    return chunked(draw, range(n), batch_size)


def embed(
    embedder: SimCLRModule, dataset: Dataset, args: Namespace, device: torch.device, name: str, score_pairs: bool = False
) -> EmbeddedStream:
    """Embeddings `[N, L]` of a dataset's images in order (and the MS-SSIM of pairs (2k, 2k+1)), in one read."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    return embed_stream(
        (batch["image"].to(device) for batch in loader), embedder.embed, score_pairs=score_pairs, device=device,
        progress=progress(args, f"embedding the {name} images", len(dataset)),
    )  # fmt: skip


def progress(args: Namespace, label: str, total: int) -> Progress:
    return Progress(f"audit: {label}", total, lambda line: print(line, file=sys.stderr, flush=True), args.progress_seconds)


def release_non_copies(synthetic: Dataset, report: CopyReport, folder: Path) -> list[ReleasedFile]:
    """Copy the synthetic files that are not copies into `folder`, keeping their paths relative to their folder."""
    released = []
    rows = zip(synthetic.files, synthetic.relative, report.is_copy.tolist(), report.nn_train_corr.tolist(), strict=True)
    for path, relative, copy, correlation in rows:
        if not copy:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / relative)
            released.append(ReleasedFile(relative.as_posix(), float(correlation)))
    return released
