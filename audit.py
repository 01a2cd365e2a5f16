"""`python cli.py audit`: check a synthetic dataset for copies of training patients before it is shared.

    python cli.py audit --embedder EMB.ckpt --train DIR --val DIR --synthetic DIR --out OUT
    python cli.py audit --embedder EMB.ckpt --data configs/mrnet_ldm.yaml --data-arg root=/data/MRNet-v1.0 \\
        --generator LDM.ckpt --n-samples 904 --seed 0 --out OUT --release-dir SHAREABLE
    python cli.py audit --config audit.yaml             (the same options as YAML keys: n_samples, data_arg, ...)
    python cli.py audit --verify-release SHAREABLE      (is the released folder still what was audited?)

The training and validation images come from two folders (read as `FolderDataModule`
reads them, or as `DicomDataModule` when they hold DICOM) or from a config's DataModule;
the synthetic images from a folder or from an LDM checkpoint (sampled into `OUT/samples/`,
sample `i` seeded by `(seed, i)`). Every image is embedded by the SimCLR embedder, copies are
counted with `memorization.detect_copies` (τ = the `--percentile` of training → held-out
similarities; `--rule distinct` also asks a copy to be clearly nearer to one training patient than
to any other, by `--margin`), and `OUT` receives `report.html` (the verdict and evidence on one page),
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import instantiate_class
from monai.data import Dataset
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
from lightning_modules.plugins import embedder_name, load_embedder, load_generator
from memorization import detect_copies, frechet_distance
from memorization.chance import (
    ChanceLevel,
    DetectorCheck,
    chance_level,
    check_patients,
    detector_check,
    held_out_exceedances,
    positive_rows,
)
from memorization.detect import DEFAULT_MARGIN, DEFAULT_RULE, RULES, CopyReport, check_rule
from memorization.embedders import Embedder, Generator, probe_generator
from memorization.release import MANIFEST, ReleasedFile, verify_release, write_manifest
from memorization.report import check_output_folder, copy_order, staged_output, write_report
from memorization.stats import CI_METHOD, headline
from memorization.stream import EmbeddedStream, Progress, blocks, dataset_blocks, embed_stream

# The per-embedder numbers in summary.json's `detectors`, beside the headline (the first embedder's).
DETECTOR_KEYS = (
    "tau", "n_mem", "frac_mem", "frac_mem_ci", "n_mem_patients", "frac_mem_patients", "frac_mem_patients_ci",
    "n_copies", "frac_copies", "frac_copies_ci", "null_frac_mem", "null_frac_mem_patients", "null_frac_copies",
    "excess_frac_mem", "excess_frac_mem_patients", "excess_frac_copies",
)  # fmt: skip


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
    parser.add_argument(
        "--embedder", action="append", default=[],
        help="the embedder that counts copies: a SimCLR checkpoint (trained on the training images), pixel "
        "(raw pixels, mirror invariant), or a {class_path: ..., init_args: {...}} YAML such as "
        "memorization.embedders.TorchScriptEmbedder; repeat it to compare detectors (the first sets the headline)",
    )  # fmt: skip
    parser.add_argument(
        "--spatial_size", "--spatial-size", type=int, nargs="+",
        help="the image size, when no embedder records one (pixel alone), e.g. 64 64",
    )  # fmt: skip
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
    synthetic = parser.add_argument_group("synthetic images: --synthetic, or --generator")
    synthetic.add_argument(
        "--synthetic", help="folder of synthetic images, each of the embedder's image size"
    )
    synthetic.add_argument(
        "--generator", "--ldm",
        help="a generator's checkpoint to sample instead: the LDM, the pixel DDPM, or any LightningModule with "
        "sample() trained through cli.py fit (memorization.embedders.Generator)",
    )  # fmt: skip
    synthetic.add_argument(
        "--n_samples", "--n-samples", type=int, help="samples to draw with --generator (default: the training-set size)"
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
        "--rule", default=DEFAULT_RULE,
        help=f"the copy rule, one of {', '.join(RULES)}: paper counts a sample as a copy when it correlates "
        "at least τ with a training image; distinct also asks it to be clearly nearer to one training "
        "patient than to any other (d1 <= margin * d2). The counts, chance level and self-check follow it",
    )  # fmt: skip
    parser.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN,
        help="the distinct rule's margin, in (0, 1]: a copy is at most this times as far from its nearest "
        "patient as from any other (1 accepts every copy the paper's rule accepts)",
    )  # fmt: skip
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
    embedders, size = load_embedders(args.embedder, args.spatial_size)
    embedders = {name: embedder.to(device) for name, embedder in embedders.items()}
    generator = load_generator(args.generator, "generator").to(device).eval() if args.generator else None
    datamodule = _reference_data(args, size)
    train, val = datamodule.reference_dataset("train"), datamodule.reference_dataset("val")
    train_patients = datamodule.train_patients
    for embedder in embedders.values():
        check_patients(embedder.training_patients, train_patients, datamodule.val_patients, args.percentile, "--embedder", "--embedder")
    if generator is not None:
        check_generator(generator, args, size, embedders, train_patients)
    synthetic = None if generator else synthetic_folder(Path(args.synthetic), size, args.intensity)
    variation = variation_transform(
        len(size), rotation_degrees=args.variation_rotation_degrees,
        contrast_gamma=tuple(args.variation_contrast_gamma), noise_std=args.variation_noise_std,
    )  # fmt: skip
    # Every embedder sees each image in the same pass: one read of every folder, one sampling run.
    lengths = [embedder.embedding_dim for embedder in embedders.values()]

    def embed_all(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([embedder.embed(images).float().to(device) for embedder in embedders.values()], dim=1)

    def per_embedder(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(embedders, torch.split(matrix, lengths, dim=1), strict=True))

    release = (
        staged_output(args.release_dir, "--release-dir", args.overwrite)
        if args.release_dir
        else nullcontext()
    )
    # Both folders move into place only after everything in both is written.
    with staged_output(out, "--out", args.overwrite) as staging, release as release_staging:
        if generator is not None:
            samples = staging / "samples"
            chunks = sample_chunks(
                generator, samples, args.n_samples or len(train), args.seed, args.num_inference_steps, args.batch_size
            )
            # Embedded while sampled: one pass, never all samples in memory.
            syn = embed_stream(
                chunks, embed_all, score_pairs=True, require_finite=f"--generator {args.generator}", device=device,
                progress=progress(args, "sampling and embedding the generator's samples", args.n_samples or len(train)),
            )  # fmt: skip
            synthetic = synthetic_folder(samples, size, "none")
        else:
            syn = embed(embed_all, synthetic, args, device, "--synthetic", score_pairs=True)
        train_embeddings = per_embedder(embed(embed_all, train, args, device, "training").embeddings)
        val_embeddings = per_embedder(embed(embed_all, val, args, device, "held-out").embeddings)
        syn_embeddings = per_embedder(syn.embeddings)
        varied = None
        if args.detector_positives:
            rows = positive_rows(len(train), args.detector_positives)
            varied = per_embedder(embed_stream(
                (images.to(device) for images in variation_batches(train, rows, args.batch_size, args.seed, variation)),
                embed_all, device=device, progress=progress(args, "embedding varied training images", len(rows)),
            ).embeddings)  # fmt: skip
        detections = {
            name: detect(train_embeddings[name], val_embeddings[name], syn_embeddings[name],
                         None if varied is None else varied[name], args.percentile, train_patients,
                         rule=args.rule, margin=args.margin, val_patients=datamodule.val_patients)
            for name in embedders
        }  # fmt: skip
        primary = next(iter(detections.values()))
        report = primary.report
        syn_ids = dataset_ids(synthetic)
        fd = (
            frechet_distance(next(iter(syn_embeddings.values())), next(iter(val_embeddings.values())))
            if min(len(synthetic), len(val)) >= 2
            else None
        )
        summary = {
            **headline(report, train_patients, primary.chance),
            "rule": report.rule,
            "margin": report.margin,
            "n_val": len(val),
            "ci_method": CI_METHOD,
            "null_method": primary.chance.method,
            "detector": primary.self_check.as_dict() if primary.self_check else None,
            "fd": fd,
            "ms_ssim": float(syn.pair_scores.mean()) if len(syn.pair_scores) else None,
            "detectors": detectors_summary(detections, syn_ids, train_patients),
            "inputs": _inputs(args),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        # A sample any detector flags is withheld.
        withheld = torch.stack([d.report.is_copy.cpu() for d in detections.values()]).any(dim=0)
        if release_staging is not None:
            released = release_non_copies(synthetic, withheld, release_staging)
            summary["release"] = {
                "dir": args.release_dir, "n_released": len(released), "n_withheld": len(synthetic) - len(released),
                "manifest": MANIFEST,
            }  # fmt: skip
        write_report(
            staging, report, dataset_ids(train), syn_ids, summary,
            train_image=lambda i: train[i]["image"], syn_image=lambda j: synthetic[j]["image"],
            train_patients=train_patients,
        )  # fmt: skip
        if release_staging is not None:
            write_manifest(
                release_staging,
                [ReleasedFile(path, {name: float(d.report.nn_train_corr[j]) for name, d in detections.items()})
                 for path, j in released],
                taus={name: d.report.tau for name, d in detections.items()}, percentile=report.percentile,
                n_withheld=len(synthetic) - len(released),
                checkpoints={"generator": args.generator, **{f"embedder {name}": _checkpoint_file(spec) for name, spec in zip(embedders, args.embedder, strict=True)}},
                summary=json.loads((staging / "summary.json").read_text()),
            )  # fmt: skip
    return {**json.loads((out / "summary.json").read_text()), "out": str(out)}


# --- inputs ------------------------------------------------------------------------------


def _check_arguments(args: Namespace) -> None:
    for option, example in (("embedder", "EMB.ckpt"), ("out", "OUT")):
        if not getattr(args, option):
            raise InputError(
                f"--{option} is required: give --{option} {example} (or check a release with --verify-release DIR)"
            )
    folders, data = args.train is not None or args.val is not None, args.data is not None
    if folders == data or (folders and (args.train is None or args.val is None)):
        raise InputError("give the real images as --train DIR --val DIR, or as --data CONFIG.yaml (not both)")
    if (args.synthetic is None) == (args.generator is None):
        raise InputError(
            "give the synthetic images as --synthetic DIR, or --generator CKPT (--ldm) to sample them (not both)"
        )
    if args.n_samples is not None and (args.generator is None or args.n_samples < 1):
        raise InputError(f"--n-samples {args.n_samples} needs --generator and must be at least 1")
    if args.data_arg and not data:
        raise InputError("--data-arg overrides a --data config: give --data CONFIG.yaml too")
    if not 0.0 < args.percentile < 100.0:
        raise InputError(f"--percentile {args.percentile} must lie in (0, 100), e.g. 95")
    check_rule(args.rule, args.margin, "--rule", "--margin")
    if args.batch_size < 2:
        raise InputError(f"--batch-size {args.batch_size} must be at least 2")
    if args.detector_positives < 0:
        raise InputError(f"--detector-positives {args.detector_positives} must be at least 0 (0 skips the self-check)")


def load_embedders(specs: Sequence[str], spatial_size: Sequence[int] | None) -> tuple[dict[str, Embedder], tuple[int, ...]]:
    """Every `--embedder`, by a name unique among them, and the image size they take."""
    trained = {spec: load_embedder(spec, "embedder") for spec in specs if not spec.startswith("pixel")}
    sizes = {spec: tuple(e.image_spatial_size) for spec, e in trained.items() if e.image_spatial_size is not None}
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
            raise InputError(f"--embedder={spec} takes {embedder.spatial_dims}D images, the data is {len(size)}D: pass an embedder of the data's dimensionality")
        name = embedder_name(spec)
        embedders[name if name not in embedders else f"{name}#{len(embedders) + 1}"] = embedder
    return embedders, size


def check_generator(
    generator: torch.nn.Module, args: Namespace, size: tuple[int, ...], embedders: dict, train_patients: Sequence[str]
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
        "generator",
        "n_samples",
        "seed",
        "num_inference_steps",
        "intensity",
    )
    return {key: getattr(args, key) for key in keys if getattr(args, key) not in (None, [])}


# --- work --------------------------------------------------------------------------------


def sample_chunks(
    generator: Generator, folder: Path, n: int, seed: int, num_inference_steps: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Draw `n` samples in blocks of `batch_size` (as the callback draws them), writing `sample_{i:06d}.npy`
    (float32 `[*spatial]` in `[0, 1]`) as they come."""
    folder.mkdir(parents=True)
    batch_size = min(batch_size, n)  # as the callback: a larger block would only sample padding

    def draw(indices: range) -> torch.Tensor:
        return generator.sample(
            len(indices), seed=seed, num_inference_steps=num_inference_steps,
            sample_batch_size=batch_size, start_index=indices.start,
        )  # fmt: skip

    start = 0
    for images in blocks(draw, range(n), batch_size):
        for offset, image in enumerate(images.float().cpu().numpy()):
            np.save(folder / f"sample_{start + offset:06d}.npy", image[0])
        start += len(images)
        yield images


def embed(
    embed_images: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, args: Namespace, device: torch.device,
    name: str, score_pairs: bool = False,
) -> EmbeddedStream:
    """Embeddings `[N, L]` of a dataset's images in order (and the MS-SSIM of pairs (2k, 2k+1)), in one read."""
    images = dataset_blocks(dataset, range(len(dataset)), args.batch_size, args.num_workers)
    return embed_stream(
        (block.to(device) for block in images), embed_images, score_pairs=score_pairs, device=device,
        progress=progress(args, f"embedding the {name} images", len(dataset)),
    )  # fmt: skip


def progress(args: Namespace, label: str, total: int) -> Progress:
    return Progress(f"audit: {label}", total, lambda line: print(line, file=sys.stderr, flush=True), args.progress_seconds)


def release_non_copies(synthetic: Dataset, withheld: torch.Tensor, folder: Path) -> list[tuple[str, int]]:
    """Copy the synthetic files not `withheld` into `folder`, keeping their paths relative to their folder;
    returns each released file's relative path and row."""
    released = []
    for row, (path, relative, held) in enumerate(zip(synthetic.files, synthetic.relative, withheld.tolist(), strict=True)):
        if not held:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / relative)
            released.append((relative.as_posix(), row))
    return released


@dataclass
class Detection:
    """What one embedder found: the copy report, its chance level and its self-check."""

    report: CopyReport
    chance: ChanceLevel
    self_check: DetectorCheck | None


def detect(
    train,
    val,
    syn,
    varied,
    percentile: float,
    train_patients: Sequence[str],
    *,
    rule: str,
    margin: float,
    val_patients: Sequence[str] | None = None,
) -> Detection:
    report = detect_copies(
        train, val, syn, percentile=percentile, rule=rule, margin=margin, train_patients=train_patients
    )
    exceedances = held_out_exceedances(
        train, val, percentile, train_patients, rule=rule, margin=margin, val_patients=val_patients
    )
    self_check = detector_check(varied, train, exceedances) if varied is not None else None
    return Detection(report, chance_level(exceedances, len(syn)), self_check)


def detectors_summary(
    detections: dict[str, Detection], syn_ids: Sequence[str], train_patients: Sequence[str]
) -> dict[str, Any]:
    """Each embedder's counts (as in the summary's headline), and where they agree on the synthetic samples."""
    summary: dict[str, Any] = {}
    flagged = {}
    for name, detection in detections.items():
        numbers = headline(detection.report, train_patients, detection.chance)
        flagged[name] = {syn_ids[j] for j in copy_order(detection.report)}
        summary[name] = {
            **{key: numbers[key] for key in DETECTOR_KEYS if key in numbers},
            "detector": detection.self_check.as_dict() if detection.self_check else None,
            "copy_syn_ids": [syn_ids[j] for j in copy_order(detection.report)],
        }
    sets = list(flagged.values())
    union, common = set().union(*sets), set.intersection(*sets)
    pairs = []
    names = list(flagged)
    for a, first in enumerate(names):
        for second in names[a + 1 :]:
            both = len(flagged[first] & flagged[second])
            neither = len(syn_ids) - len(flagged[first] | flagged[second])
            pairs.append({
                "detectors": [first, second], "both": both, "neither": neither,
                "only_first": len(flagged[first] - flagged[second]), "only_second": len(flagged[second] - flagged[first]),
                "agreement": (both + neither) / len(syn_ids) if syn_ids else None,
            })  # fmt: skip
    return {
        "by_embedder": summary,
        "n_copies_any": len(union),
        "n_copies_all": len(common),
        "copies_any": sorted(union),
        "copies_all": sorted(common),
        "pairwise": pairs,
    }


def _checkpoint_file(spec: str) -> str | None:
    """The file behind an embedder specification, for the manifest's hash (none for `pixel`)."""
    if spec.startswith("pixel"):
        return None
    if spec.lstrip().startswith("{"):
        return (yaml.safe_load(spec).get("init_args") or {}).get("path")
    return spec
