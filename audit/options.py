"""The audit's options (jsonargparse, like the rest of the CLI) and their checks."""

from __future__ import annotations

import warnings

from jsonargparse import ArgumentParser, Namespace

from memwatch.errors import InputError
from memwatch.lightning_modules.plugins import embedder_text
from memwatch.memorization.check import CheckOptions
from memwatch.memorization.detect import DEFAULT_MARGIN, DEFAULT_RULE, RULES
from memwatch.memorization.membership import MIN_HELD_OUT
from memwatch.memorization.variation import CONTRAST_GAMMA, NOISE_STD, ROTATION_DEGREES
from memwatch.option_errors import OneLineArgumentParser


def audit_parser() -> ArgumentParser:
    """The audit's options, jsonargparse like the rest of the CLI: `--config audit.yaml` sets any of them
    (keys as the long names: `n_samples`, `data_arg`, ...) and `--print_config` shows them. Each option
    also answers to its name with dashes (`--n-samples`), as before. A mistake is one `error:` line."""
    parser = OneLineArgumentParser(
        prog="python cli.py audit",
        description="Count the copies of training patients in a synthetic dataset before sharing it.",
        default_meta=False,
    )
    parser.add_argument("--config", action="config", help="a YAML of these options (see --print_config)")
    parser.add_argument(
        "--embedder", action="append", default=[],
        help="the embedder that counts copies: a SimCLR checkpoint (trained on the training images), pixel "
        "(raw pixels, mirror invariant), or a {class_path: ..., init_args: {...}} YAML such as "
        "memwatch.memorization.embedders.TorchScriptEmbedder; repeat it to compare detectors (the first sets the headline)",
    )  # fmt: skip
    parser.add_argument(
        "--trust_module", "--trust-module", action="append", default=[], metavar="MODULE",
        help="a module (and its submodules) whose classes the audit may import when a --generator checkpoint, "
        "an --embedder or the --data config names them: importing runs its code, so only memwatch's own are "
        "imported otherwise (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--spatial_size", "--spatial-size", type=int, nargs="+",
        help="the image size, when no embedder records one (pixel alone), e.g. 64 64",
    )  # fmt: skip
    parser.add_argument(
        "--out", help="folder for report.html, summary.json, pairs.csv, train_nn.csv and the plots"
    )
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
        "sample() trained through cli.py fit (memwatch.memorization.embedders.Generator)",
    )  # fmt: skip
    synthetic.add_argument(
        "--n_samples",
        "--n-samples",
        type=int,
        help="samples to draw with --generator (default: the training-set size)",
    )
    synthetic.add_argument("--seed", type=int, default=0, help="sample i is seeded by (seed, i)")
    synthetic.add_argument(
        "--num_inference_steps", "--num-inference-steps", type=int, default=50, help="DDIM steps per sample"
    )
    synthetic.add_argument(
        "--membership_n_ref", "--membership-n-ref", type=int,
        help="with --generator, held-out images (evenly spaced; default all, at least "
        f"{MIN_HELD_OUT}) and as many training images that the model scores for the membership signal",
    )  # fmt: skip
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
        "--sample_batch_size", "--sample-batch-size", type=int, default=32,
        help="images per sampling (UNet), embedding and scoring pass, in fixed blocks (as the callback's "
        "sample_batch_size); a check holds O(this) images",
    )  # fmt: skip
    parser.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=None,
        help="deprecated spelling of --sample-batch-size",
    )
    parser.add_argument(
        "--num_workers", "--num-workers", type=int, default=0, help="DataLoader workers for reading images"
    )
    check = parser.add_argument_group(
        "the detector's self-check (variations of training images vs held-out images)"
    )
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
        "--variation_noise_std",
        "--variation-noise-std",
        type=float,
        default=NOISE_STD,
        help="std of the added noise",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--progress_seconds", "--progress-seconds", type=float, default=30.0,
        help="while sampling and embedding, a line on stderr every this many seconds (0: after every batch)",
    )  # fmt: skip
    return parser


def check_arguments(args: Namespace) -> None:
    for option, example in (("embedder", "EMB.ckpt"), ("out", "OUT")):
        if not getattr(args, option):
            raise InputError(
                f"--{option} is required: give --{option} {example} (or check a release with --verify-release DIR)"
            )
    args.embedder = [embedder_text(spec) for spec in args.embedder]  # an audit.yaml may give mappings
    folders, data = args.train is not None or args.val is not None, args.data is not None
    if folders == data or (folders and (args.train is None or args.val is None)):
        raise InputError("give the real images as --train DIR --val DIR, or as --data CONFIG.yaml (not both)")
    if (args.synthetic is None) == (args.generator is None):
        raise InputError(
            "give the synthetic images as --synthetic DIR, or --generator CKPT (--ldm) to sample them (not both)"
        )
    if args.n_samples is not None and (args.generator is None or args.n_samples < 1):
        raise InputError(f"--n-samples {args.n_samples} needs --generator and must be at least 1")
    if args.membership_n_ref is not None and (args.generator is None or args.membership_n_ref < MIN_HELD_OUT):
        raise InputError(
            f"--membership-n-ref {args.membership_n_ref} needs --generator and must be at least {MIN_HELD_OUT} "
            "(fewer held-out images give no useful interval); leave it out to score every held-out image"
        )
    if args.data_arg and not data:
        raise InputError("--data-arg overrides a --data config: give --data CONFIG.yaml too")
    if args.batch_size is not None:
        warnings.warn("--batch-size is deprecated: use --sample-batch-size", FutureWarning, stacklevel=2)
        args.sample_batch_size = args.batch_size
    check_options(args)  # every option of the check, validated where the callback's are


def check_options(args: Namespace) -> CheckOptions:
    """The check's options, as the callback has them (`memorization.check.CheckOptions`)."""
    variation = {
        "rotation_degrees": args.variation_rotation_degrees, "contrast_gamma": tuple(args.variation_contrast_gamma),
        "noise_std": args.variation_noise_std,
    }  # fmt: skip
    return CheckOptions(
        n_samples=args.n_samples, num_inference_steps=args.num_inference_steps,
        sample_batch_size=args.sample_batch_size, percentile=args.percentile, rule=args.rule, margin=args.margin,
        seed=args.seed, detector_positives=args.detector_positives, variation=variation, flags="--{}",
    )  # fmt: skip
