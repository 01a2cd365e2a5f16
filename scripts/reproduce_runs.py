"""The runs of `make reproduce`: their sizes, the CLI flags of each, launching them, and what they measured.

The autoencoder and the embedder are trained once and shared by every LDM run; each LDM run is
`python cli.py fit --config configs/phantom_ldm.yaml` with flags, and its `memorization_history.csv`
(read by `memorization.history`) is all the results page (`scripts/reproduce_results.py`) knows of it.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from memwatch.memorization.history import HISTORY_FILE, MEMBERSHIP_HISTORY_FILE, read_history
from memwatch.memorization.stats import binomial_interval
from scripts.launch import ROOT, fit


@dataclass(frozen=True)
class Scale:
    """How big one reproduction is. Steps are optimizer steps; a check samples N_syn = N_train images."""

    name: str
    spatial_size: int
    n_patients: int
    val_fraction: float
    batch_size: int
    ae_steps: int
    simclr_steps: int
    ldm_steps: int
    check_every_steps: int
    num_inference_steps: int
    n_train: int  # the over-training and augmentation runs
    sizes: tuple[int, ...]  # the training-set-size runs; n_train among them
    seeds: tuple[int, ...]
    ae_flags: tuple[str, ...] = ()
    simclr_flags: tuple[str, ...] = ()
    ldm_flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_train not in self.sizes:
            raise ValueError(f"n_train={self.n_train} must be one of sizes={self.sizes}")
        for n in self.sizes:
            if self.check_every_steps % self.steps_per_epoch(n) or self.ldm_steps % self.check_every_steps:
                raise ValueError(
                    f"check_every_steps={self.check_every_steps} must be a multiple of the {self.steps_per_epoch(n)} "
                    f"steps per epoch of n_train={n} and divide ldm_steps={self.ldm_steps}"
                )

    def steps_per_epoch(self, n_train: int) -> int:
        return -(-n_train // self.batch_size)


# 64 training and 64 validation patients; the over-training and augmentation runs use 16 of the 64
# (as the demo), the size runs 16, 32 and 64, so every LDM sees the same 64 validation patients.
# The autoencoder has a third level (an 8×8 latent where the demo's is 16×16): an LDM step costs
# about 2.5× less at 1 thread, and 16 patients are memorized from about step 700 as with the
# demo's latent (measured on 2026-12-01: 2, 4 of 16 at steps 700, 800 against 2, 5 at 800, 1000).
FULL = Scale(
    name="full", spatial_size=32, n_patients=128, val_fraction=0.5, batch_size=16,
    ae_steps=600, simclr_steps=300, ldm_steps=1000, check_every_steps=200, num_inference_steps=50,
    n_train=16, sizes=(16, 32, 64), seeds=(0, 1),
    ae_flags=("--model.init_args.channels", "[32,64,64]"),
)  # fmt: skip
# The tiny LDMs evaluate the membership signal every 2 epochs (steps at N_train = 4), so that the test reads the
# runs' own membership_history.csv; FULL keeps phantom_ldm.yaml's every 10 epochs.
TINY = Scale(
    name="tiny", spatial_size=16, n_patients=40, val_fraction=0.5, batch_size=4,
    ae_steps=8, simclr_steps=8, ldm_steps=8, check_every_steps=4, num_inference_steps=2,
    n_train=4, sizes=(4, 8, 16), seeds=(0,),
    ae_flags=("--model.init_args.channels", "[8,8]", "--model.init_args.latent_channels", "2",
              "--model.init_args.norm_num_groups", "4", "--model.init_args.adv_weight", "0"),
    simclr_flags=("--model.init_args.channels", "[8,8,8,8]", "--model.init_args.embedding_dim", "16",
                  "--model.init_args.hidden_dim", "16"),
    ldm_flags=("--model.init_args.channels", "[8,8]", "--model.init_args.norm_num_groups", "4",
               "--model.init_args.num_head_channels", "8", "--membership.every_n_epochs", "2"),
)  # fmt: skip


# --- what one LDM run measured -----------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One row of `memorization_history.csv`: counts out of n_train (N_mem) and n_syn (N_copies)."""

    step: int
    n_mem: int
    n_copies: int
    n_train: int
    n_syn: int
    frac_mem_ci: tuple[float, float]
    frac_copies_ci: tuple[float, float]
    fd: float | None
    ms_ssim: float | None
    null_frac_mem: float | None = None
    membership_auc: float | None = None  # where the membership signal was evaluated at the check's step

    @property
    def frac_mem(self) -> float:
        return self.n_mem / self.n_train

    @property
    def frac_copies(self) -> float:
        return self.n_copies / self.n_syn


@dataclass(frozen=True)
class MembershipPoint:
    """One row of `membership_history.csv`: the AUC of training vs held-out images scored by the model's own
    denoising loss, its 95% interval, the control's AUC (two halves of the training images), and whether the
    interval lies above the control's. NaN where the row has no value."""

    step: int
    auc: float
    auc_ci: tuple[float, float]
    auc_control: float
    above_control: bool


@dataclass(frozen=True)
class Run:
    """One LDM training run and, once trained, its checks and membership evaluations.

    `demo` names a run of `make demo` (its log folder's name) read beside the planned runs; its seed and
    augmentation are not read and not shown.
    """

    seed: int
    augment: bool
    n_train: int
    history: tuple[Check, ...] = field(default=(), compare=False)
    seconds: float = field(default=0.0, compare=False)
    membership: tuple[MembershipPoint, ...] = field(default=(), compare=False)
    demo: str | None = None

    @property
    def name(self) -> str:
        return self.demo or f"ldm-n{self.n_train}-{'aug' if self.augment else 'noaug'}-seed{self.seed}"

    @property
    def label(self) -> str:
        return "demo" if self.demo else f"seed {self.seed}"

    @property
    def last(self) -> Check:
        return self.history[-1]


def _interval(row: dict, key: str, k: int, n: int) -> tuple[float, float]:
    """The history's own interval (`<key>_ci`) where it has one, else Clopper-Pearson of k/n."""
    written = row.get(f"{key}_ci")
    if written:
        low, high = written
        return float(low), float(high)
    return binomial_interval(k, n)


def read_checks(run_dir: Path, n_train: int | None = None) -> tuple[Check, ...]:
    """The checks of one run (its log folder, or its history file); `n_train`/`n_syn` from the history where
    it records them (else `n_train` and N_syn = N_train)."""
    rows = read_history(run_dir)
    if not rows:
        raise SystemExit(f"error: {run_dir} holds no memorization checks")
    checks = []
    for row in rows:
        n = int(row.get("n_train") or n_train or 0)
        if not n:
            raise SystemExit(f"error: {run_dir} does not record n_train")
        n_mem, n_copies = int(row["n_mem"]), int(row["n_copies"])
        n_syn = int(row.get("n_syn") or n)
        checks.append(
            Check(
                step=int(row["step"]),
                n_mem=n_mem,
                n_copies=n_copies,
                n_train=n,
                n_syn=n_syn,
                frac_mem_ci=_interval(row, "frac_mem", n_mem, n),
                frac_copies_ci=_interval(row, "frac_copies", n_copies, n_syn),
                fd=row.get("fd"),
                ms_ssim=row.get("ms_ssim"),
                null_frac_mem=row.get("null_frac_mem"),
                membership_auc=row.get("membership_auc"),
            )  # fmt: skip
        )
    return tuple(checks)


def _number(row: dict, key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


def read_membership(run_dir: Path) -> tuple[MembershipPoint, ...]:
    """The membership evaluations of one run (its log folder); none where it has no `membership_history.csv`."""
    path = Path(run_dir) / MEMBERSHIP_HISTORY_FILE
    if not path.is_file():
        return ()
    return tuple(
        MembershipPoint(
            step=int(row["step"]),
            auc=_number(row, "membership_auc"),
            auc_ci=(_number(row, "membership_auc_low"), _number(row, "membership_auc_high")),
            auc_control=_number(row, "membership_auc_control"),
            above_control=bool(row.get("membership_above_control")),
        )
        for row in read_history(path)
    )


def read_demo(run_dir: Path) -> Run:
    """The LDM run of `make demo` (`runs/phantom_ldm/demo-<time>`): its checks and membership evaluations."""
    run_dir = Path(run_dir)
    if not (run_dir / HISTORY_FILE).is_file():
        raise SystemExit(f"error: {run_dir} holds no {HISTORY_FILE}: pass the LDM run folder of `make demo`")
    checks = read_checks(run_dir)
    return Run(seed=0, augment=False, n_train=checks[-1].n_train, history=checks,
               membership=read_membership(run_dir), demo=run_dir.name)  # fmt: skip


# --- the three findings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Findings:
    """The finished runs, grouped by the finding they answer."""

    over_training: tuple[
        Run, ...
    ]  # no augmentation at the main n_train, one per seed; the first is "the" run
    augmented: tuple[Run, ...]  # with augmentation, the same seeds in the same order
    by_size: tuple[Run, ...]  # no augmentation, the first seed, ascending n_train
    demo: tuple[Run, ...] = ()  # a run of `make demo`, where one was given: in the membership section only

    @property
    def membership_runs(self) -> tuple[Run, ...]:
        """The runs the membership section asks about: over-training (the first is "the" run), then the demo."""
        return (*self.over_training, *self.demo)

    @property
    def with_membership(self) -> tuple[Run, ...]:
        """Those of `membership_runs` with a membership history."""
        return tuple(run for run in self.membership_runs if run.membership)

    @classmethod
    def of(cls, runs: Sequence[Run], scale: Scale) -> Findings:
        by_key = {(r.seed, r.augment, r.n_train): r for r in runs}
        first = scale.seeds[0]
        return cls(
            over_training=tuple(by_key[(seed, False, scale.n_train)] for seed in scale.seeds),
            augmented=tuple(by_key[(seed, True, scale.n_train)] for seed in scale.seeds),
            by_size=tuple(by_key[(first, False, n)] for n in sorted(scale.sizes)),
        )


# --- the plan: every run and its flags ---------------------------------------------------------


def data_flags(scale: Scale) -> list[str]:
    """The split every stage shares (batch sizes stay each config's, but the LDM's, which sets the check schedule)."""
    size = f"[{scale.spatial_size},{scale.spatial_size}]"
    return [
        "--data.init_args.spatial_size", size, "--data.init_args.n_patients", str(scale.n_patients),
        "--data.init_args.val_fraction", str(scale.val_fraction),
    ]  # fmt: skip


def planned_runs(scale: Scale) -> list[Run]:
    """Every LDM run once: the seed-`seeds[0]` run without augmentation at `n_train` serves all three findings."""
    runs = [
        Run(seed=seed, augment=augment, n_train=scale.n_train)
        for seed in scale.seeds
        for augment in (False, True)
    ]
    runs += [Run(seed=scale.seeds[0], augment=False, n_train=n) for n in scale.sizes if n != scale.n_train]
    return runs


def ldm_flags(scale: Scale, run: Run, autoencoder: Path, embedder: Path) -> list[str]:
    every_n_epochs = str(scale.check_every_steps // scale.steps_per_epoch(run.n_train))
    return [
        *data_flags(scale), *scale.ldm_flags, "--data.init_args.batch_size", str(scale.batch_size),
        "--seed_everything", str(run.seed), "--data.init_args.augment", str(run.augment).lower(),
        "--data.init_args.n_train", str(run.n_train), "--trainer.max_steps", str(scale.ldm_steps),
        "--trainer.check_val_every_n_epoch", every_n_epochs, "--checkpoint.every_n_epochs", every_n_epochs,
        "--model.init_args.autoencoder_ckpt", str(autoencoder / "checkpoints" / "last.ckpt"),
        # the memorization callback is the last callback of phantom_ldm.yaml: these reach it
        "--memorization.embedder_ckpt", str(embedder / "checkpoints" / "last.ckpt"),
        "--memorization.every_n_epochs", every_n_epochs,
        "--memorization.num_inference_steps", str(scale.num_inference_steps),
        "--memorization.seed", str(run.seed),
    ]  # fmt: skip


# --- launching ------------------------------------------------------------------------------------


def fit_stage(config: str, name: str, runs: Path, flags: list[str], threads: int) -> tuple[Path, float]:
    """`python cli.py fit` of one stage into `runs/name/`, its output in `runs/logs/name.log`; returns its log
    folder and wall seconds, or stops the script with the end of the log where it fails."""
    log = runs / "logs" / f"{name}.log"
    print(
        f"[{datetime.now():%H:%M:%S}] {name}: cli.py fit --config configs/{config}.yaml {' '.join(flags)}",
        flush=True,
    )
    run = fit(config, "--trainer.enable_progress_bar", "false", *flags, save_dir=runs, name=name, log=log,
              env={"PYTHONWARNINGS": "ignore"}, threads=threads, check=True)  # fmt: skip
    print(f"[{datetime.now():%H:%M:%S}] {name}: {run.seconds:.0f} s", flush=True)
    return run.log_dir, run.seconds


def code_version() -> str:
    """The commit this ran on, and the tracked files that differed from it (others may edit the tree meanwhile)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return f"commit {git('rev-parse', '--short', 'HEAD').strip()}" + (
        f", with uncommitted changes to {', '.join(changed)}" if changed else ""
    )


def run_all(
    stages: dict[str, tuple[str, list[str]]], runs: Path, jobs: int
) -> tuple[dict[str, Path], dict[str, float]]:
    """Fit `name → (config, flags)`, `jobs` at a time on `cores / jobs` threads each; stop at the first failure.

    Returns each stage's log folder and wall seconds.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    folders: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    with ThreadPoolExecutor(jobs) as pool:
        futures = {
            pool.submit(fit_stage, config, name, runs, flags, threads): name
            for name, (config, flags) in stages.items()
        }
        try:
            for future in as_completed(futures):
                folders[futures[future]], seconds[futures[future]] = future.result()
        except BaseException:
            pool.shutdown(
                wait=True, cancel_futures=True
            )  # the stages already running finish; no new ones start
            raise
    return folders, seconds
