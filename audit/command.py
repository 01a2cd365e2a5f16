"""`run_audit`: the audit's steps, in the order of the module docstring of `audit`; the check is
`memorization.check.MemorizationCheck`, the one the callback and the watcher run."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memwatch.audit.inputs import AuditInputs, audit_inputs, checkpoint_file, dataset_ids, read_inputs
from memwatch.audit.options import audit_parser, check_arguments, check_options
from memwatch.memorization.check import MemorizationCheck, Placement
from memwatch.memorization.embedders import membership_scorer
from memwatch.memorization.membership import MIN_HELD_OUT
from memwatch.memorization.output_folders import staged_outputs
from memwatch.memorization.pipeline import score_membership
from memwatch.memorization.release import (
    MANIFEST,
    release_non_copies,
    released_files,
    verify_release,
    write_manifest,
)
from memwatch.memorization.report import write_report
from memwatch.memorization.stream import Progress, deterministic_kernels, rng_preserved


def run_audit(argv: Sequence[str]) -> dict[str, Any]:
    """Parse `argv` (the words after `audit`), audit, and return the summary written to `OUT/summary.json`."""
    args = audit_parser().parse_args(list(argv))
    if args.verify_release:
        return verify_release(Path(args.verify_release))
    check_arguments(args)
    options = check_options(args)
    outputs = {
        name: Path(path) for name, path in (("--out", args.out), ("--release-dir", args.release_dir)) if path
    }
    inputs = read_inputs(args, outputs)
    check = MemorizationCheck(options, inputs.embedders)
    place = Placement(inputs.device, num_workers=args.num_workers, progress=progress(args))
    # Both folders move into place only after everything in both is written.
    with staged_outputs(outputs, args.overwrite) as stagings:
        staging, release = stagings["--out"], stagings.get("--release-dir")
        check.build_reference(inputs.train, inputs.val, inputs.train_patients, inputs.val_patients, place)
        sampled = staging / "samples" if inputs.generator is not None else None
        result = check.run(
            inputs.generator or inputs.synthetic,
            place,
            where=f"--generator {args.generator}",
            save_samples=sampled,
        )
        synthetic = inputs.samples(sampled) if sampled else inputs.synthetic
        summary = {
            **result.summary(dataset_ids(synthetic)),
            **({"membership": membership_section(inputs, args)} if inputs.generator is not None else {}),
            **({"generator": inputs.generator_file} if inputs.generator_file else {}),
            "inputs": audit_inputs(args),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        if release is not None:  # a sample any detector flags is withheld
            released = release_non_copies(
                synthetic.files, synthetic.relative, result.withheld().tolist(), release
            )
            summary["release"] = {
                "dir": args.release_dir, "n_released": len(released), "n_withheld": len(synthetic) - len(released),
                "manifest": MANIFEST,
            }  # fmt: skip
        write_report(
            staging, result.detection.report, dataset_ids(inputs.train), dataset_ids(synthetic), summary,
            train_image=lambda i: inputs.train[i]["image"], syn_image=lambda j: synthetic[j]["image"],
            train_patients=inputs.train_patients,
        )  # fmt: skip
        if release is not None:
            write_manifest(
                release, released_files(released, {n: d.report.nn_train_corr for n, d in result.detections.items()}),
                taus={name: d.report.tau for name, d in result.detections.items()},
                percentile=result.detection.report.percentile, n_withheld=len(synthetic) - len(released),
                checkpoints={"generator": inputs.generator_file, **{
                    f"embedder {name}": checkpoint_file(spec) for name, spec in zip(inputs.embedders, args.embedder, strict=True)
                }},
                summary=json.loads((staging / "summary.json").read_text()),
            )  # fmt: skip
    return {**json.loads((Path(args.out) / "summary.json").read_text()), "out": args.out}


def membership_section(inputs: AuditInputs, args) -> dict[str, Any]:
    """`summary.json`'s `membership`: the generator's own scores of training against held-out images
    (`memorization.membership`), or `{"skipped": why}` when it has no `membership_scores` or the data too few
    held-out images."""
    scores = membership_scorer(inputs.generator)
    if scores is None:
        return {
            "skipped": f"{type(inputs.generator).__name__} has no membership_scores(images, ids), so it cannot score "
            "the training and held-out images."
        }
    if len(inputs.val) < MIN_HELD_OUT:
        return {
            "skipped": f"The data holds {len(inputs.val)} held-out images, fewer than the {MIN_HELD_OUT} a membership "
            "interval needs."
        }
    with rng_preserved(inputs.device), deterministic_kernels(), torch.no_grad():
        evaluation = score_membership(
            inputs.train, inputs.val, scores, args.sample_batch_size,
            Placement(inputs.device, num_workers=args.num_workers), n_ref=args.membership_n_ref, seed=args.seed,
            option="--membership-n-ref",
        )  # fmt: skip
    return evaluation.summary()


def progress(args):
    """Progress lines on stderr, every `--progress-seconds`: label → (image count → lines)."""
    return lambda label: (
        lambda total: Progress(
            f"audit: {label}",
            total,
            lambda line: print(line, file=sys.stderr, flush=True),
            args.progress_seconds,
        )
    )
