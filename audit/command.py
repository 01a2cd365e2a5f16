"""`run_audit`: the audit's steps, in the order of the module docstring of `audit`; the science is `memorization/`'s."""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset

from memwatch.audit.checkpoint import generator_checkpoint
from memwatch.audit.inputs import (
    audit_inputs,
    check_generator,
    checkpoint_file,
    configured_datamodule,
    dataset_ids,
    input_paths,
    load_embedders,
    reference_data,
    synthetic_folder,
    trusted_modules,
)
from memwatch.audit.options import audit_parser, check_arguments
from memwatch.datamodules.transforms import variation_transform
from memwatch.lightning_modules.plugins import load_generator
from memwatch.memorization.chance import check_patients, extrapolation_notice
from memwatch.memorization.embedders import membership_scorer
from memwatch.memorization.membership import MIN_HELD_OUT
from memwatch.memorization.output_folders import check_output_folders, staged_outputs
from memwatch.memorization.pipeline import (
    embed_dataset,
    embed_variations,
    sample_block_size,
    sample_blocks,
    score_membership,
)
from memwatch.memorization.reference import ReferenceSet
from memwatch.memorization.release import MANIFEST, ReleasedFile, verify_release, write_manifest
from memwatch.memorization.report import write_report
from memwatch.memorization.stream import Progress, deterministic_kernels, embed_stream, rng_preserved
from memwatch.memorization.summary import detectors_summary, quality_numbers, summary_numbers


def run_audit(argv: Sequence[str]) -> dict[str, Any]:
    """Parse `argv` (the words after `audit`), audit, and return the summary written to `OUT/summary.json`."""
    args = audit_parser().parse_args(list(argv))
    if args.verify_release:
        return verify_release(Path(args.verify_release))
    check_arguments(args)
    out = Path(args.out)
    outputs = {"--out": out, "--release-dir": args.release_dir}
    configured = configured_datamodule(args)
    check_output_folders(outputs, input_paths(args, configured), args.overwrite)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    embedders, size = load_embedders(args.embedder, args.spatial_size, trusted_modules(args))
    embedders = {name: embedder.to(device) for name, embedder in embedders.items()}
    generator = (
        load_generator(args.generator, "generator", trusted_modules(args)).to(device).eval() if args.generator else None
    )
    generator_file = generator_checkpoint(args.generator) if args.generator else None  # which model, by step and hash
    datamodule = reference_data(args, size, configured)
    train, val = datamodule.reference_dataset("train"), datamodule.reference_dataset("val")
    train_patients, val_patients = datamodule.train_patients, datamodule.val_patients
    for embedder in embedders.values():
        check_patients(
            embedder.training_patients,
            train_patients,
            val_patients,
            args.percentile,
            "--embedder",
            "--embedder",
        )
    if generator is not None:
        check_generator(generator, args, size, embedders, train_patients)
    synthetic = None if generator else synthetic_folder(Path(args.synthetic), size, args.intensity)
    n_syn = (args.n_samples or len(train)) if generator else len(synthetic)
    fewer = f"--n-samples {len(val)}" if generator else "fewer images in --synthetic"
    notice = extrapolation_notice(n_syn, len(val), fewer)
    if notice:
        print(f"audit: {notice}", file=sys.stderr, flush=True)
    # Every embedder sees each image in the same pass: one read of every folder, one sampling run.
    lengths = [embedder.embedding_dim for embedder in embedders.values()]

    def embed_all(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [embedder.embed(images).float().to(device) for embedder in embedders.values()], dim=1
        )

    def per_embedder(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(embedders, torch.split(matrix, lengths, dim=1), strict=True))

    def embed(dataset: Dataset, name: str, score_pairs: bool = False):
        return embed_dataset(
            dataset, embed_all, args.batch_size, sum(lengths), device=device, num_workers=args.num_workers,
            score_pairs=score_pairs, progress=progress(args, f"embedding the {name} images"),
        )  # fmt: skip

    # Both folders move into place only after everything in both is written.
    membership = None  # summary.json's membership section: only a generator has scores of its own
    with staged_outputs({k: v for k, v in outputs.items() if v}, args.overwrite) as stagings:
        staging, release_staging = stagings["--out"], stagings.get("--release-dir")
        if generator is not None:
            n_samples = args.n_samples or len(train)
            block = sample_block_size(n_samples, args.batch_size)
            samples = sample_blocks(
                generator,
                range(n_samples),
                block,
                seed=args.seed,
                num_inference_steps=args.num_inference_steps,
            )
            # Embedded while sampled and saved: one pass, never all samples in memory.
            syn = embed_stream(
                saved(samples, staging / "samples"), embed_all, score_pairs=True, require_finite=f"--generator {args.generator}",
                device=device, progress=progress(args, "sampling and embedding the generator's samples")(n_samples),
            )  # fmt: skip
            synthetic = synthetic_folder(staging / "samples", size, "none")
            membership = membership_section(generator, train, val, args, device)
        else:
            syn = embed(synthetic, "--synthetic", score_pairs=True)
        varied = None
        if args.detector_positives:
            variation = variation_transform(
                len(size), rotation_degrees=args.variation_rotation_degrees,
                contrast_gamma=tuple(args.variation_contrast_gamma), noise_std=args.variation_noise_std,
            )  # fmt: skip
            varied = per_embedder(embed_variations(
                train, args.detector_positives, embed_all, args.batch_size, sum(lengths), seed=args.seed,
                variation=variation, device=device, progress=progress(args, "embedding varied training images"),
            ))  # fmt: skip
        references = {
            name: ReferenceSet.build(
                train_embeddings, val_embeddings, train_patients, val_patients, percentile=args.percentile,
                rule=args.rule, margin=args.margin, varied=None if varied is None else varied[name],
            )
            for name, train_embeddings, val_embeddings in zip(
                embedders, per_embedder(embed(train, "training").embeddings).values(),
                per_embedder(embed(val, "held-out").embeddings).values(), strict=True,
            )
        }  # fmt: skip
        syn_embeddings = per_embedder(syn.embeddings)
        detections = {name: reference.detect(syn_embeddings[name]) for name, reference in references.items()}
        primary = next(iter(detections.values()))
        primary_name = next(iter(detections))
        syn_ids = dataset_ids(synthetic)
        fd, ms_ssim = quality_numbers(
            syn_embeddings[primary_name], references[primary_name].val, syn.pair_scores
        )
        summary = {
            **summary_numbers(primary, train_patients, len(val), fd, ms_ssim),
            "detectors": detectors_summary(detections, syn_ids, train_patients),
            **({"membership": membership} if membership is not None else {}),
            **({"generator": generator_file} if generator_file else {}),
            "inputs": audit_inputs(args),
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
            staging, primary.report, dataset_ids(train), syn_ids, summary,
            train_image=lambda i: train[i]["image"], syn_image=lambda j: synthetic[j]["image"],
            train_patients=train_patients,
        )  # fmt: skip
        if release_staging is not None:
            write_manifest(
                release_staging,
                [ReleasedFile(path, {name: float(d.report.nn_train_corr[j]) for name, d in detections.items()})
                 for path, j in released],
                taus={name: d.report.tau for name, d in detections.items()}, percentile=primary.report.percentile,
                n_withheld=len(synthetic) - len(released),
                checkpoints={"generator": generator_file, **{
                    f"embedder {name}": checkpoint_file(spec) for name, spec in zip(embedders, args.embedder, strict=True)
                }},
                summary=json.loads((staging / "summary.json").read_text()),
            )  # fmt: skip
    return {**json.loads((out / "summary.json").read_text()), "out": str(out)}


def membership_section(
    generator: torch.nn.Module, train: Dataset, val: Dataset, args, device: torch.device
) -> dict[str, Any]:
    """`summary.json`'s `membership`: the generator's own scores of training against held-out images
    (`memorization.membership`), or `{"skipped": why}` when it has no `membership_scores` or the data too few
    held-out images."""
    scores = membership_scorer(generator)
    if scores is None:
        return {
            "skipped": f"{type(generator).__name__} has no membership_scores(images, ids), so it cannot score "
            "the training and held-out images."
        }
    if len(val) < MIN_HELD_OUT:
        return {
            "skipped": f"The data holds {len(val)} held-out images, fewer than the {MIN_HELD_OUT} a membership "
            "interval needs."
        }
    with rng_preserved(device), deterministic_kernels(), torch.no_grad():
        evaluation = score_membership(
            train, val, scores, args.batch_size, n_ref=args.membership_n_ref, seed=args.seed,
            option="--membership-n-ref", device=device, num_workers=args.num_workers,
        )  # fmt: skip
    return evaluation.summary()


def saved(samples: Iterator[torch.Tensor], folder: Path) -> Iterator[torch.Tensor]:
    """Pass `samples` on, writing each as `sample_{i:06d}.npy` (float32 `[*spatial]` in `[0, 1]`) as it comes."""
    folder.mkdir(parents=True)
    start = 0
    for images in samples:
        for offset, image in enumerate(images.float().cpu().numpy()):
            np.save(folder / f"sample_{start + offset:06d}.npy", image[0])
        start += len(images)
        yield images


def progress(args, label: str):
    """Progress lines on stderr, every `--progress-seconds`, for `total` images."""
    return lambda total: Progress(
        f"audit: {label}", total, lambda line: print(line, file=sys.stderr, flush=True), args.progress_seconds
    )


def release_non_copies(synthetic: Dataset, withheld: torch.Tensor, folder: Path) -> list[tuple[str, int]]:
    """Copy the synthetic files not `withheld` into `folder`, keeping their paths relative to their folder;
    returns each released file's relative path and row."""
    released = []
    for row, (path, relative, held) in enumerate(
        zip(synthetic.files, synthetic.relative, withheld.tolist(), strict=True)
    ):
        if not held:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / relative)
            released.append((relative.as_posix(), row))
    return released
