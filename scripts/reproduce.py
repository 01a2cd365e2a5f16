"""`make reproduce`: the paper's findings in miniature, on the built-in phantoms, through the real CLI.

Dar et al., arXiv 2402.01054, on a 2-core CPU in under 30 minutes:

1. over-training: N_mem, N_copies, FD and MS-SSIM over the memorization checks of one LDM run;
2. augmentation: the same LDM with and without `--data.init_args.augment true`, several seeds;
3. training-set size: the same LDM on three nested training subsets (`--data.init_args.n_train`),
   the same validation patients for all three.

The autoencoder and the embedder are trained once, on every training patient of the split, and
shared by every LDM run (like `make demo`). Each LDM run is `python cli.py fit --config
configs/phantom_ldm.yaml` with flags; its `memorization_history.csv` is the only source of the
numbers in the figures and in `RESULTS.md`, which this script writes (paper's numbers beside ours,
95% Clopper-Pearson intervals, a verdict per finding computed from the numbers).

    python scripts/reproduce.py                      # full size: docs/RESULTS.md, docs/figures/*.png
    python scripts/reproduce.py --tiny --out /tmp/r  # seconds-sized, for the test
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

plt.rcParams.update({"axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8})

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memorization.stats import binomial_interval  # noqa: E402


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
TINY = Scale(
    name="tiny", spatial_size=16, n_patients=40, val_fraction=0.5, batch_size=4,
    ae_steps=8, simclr_steps=8, ldm_steps=8, check_every_steps=4, num_inference_steps=2,
    n_train=4, sizes=(4, 8, 16), seeds=(0,),
    ae_flags=("--model.init_args.channels", "[8,8]", "--model.init_args.latent_channels", "2",
              "--model.init_args.norm_num_groups", "4", "--model.init_args.adv_weight", "0"),
    simclr_flags=("--model.init_args.channels", "[8,8,8,8]", "--model.init_args.embedding_dim", "16",
                  "--model.init_args.hidden_dim", "16"),
    ldm_flags=("--model.init_args.channels", "[8,8]", "--model.init_args.norm_num_groups", "4",
               "--model.init_args.num_head_channels", "8"),
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

    @property
    def frac_mem(self) -> float:
        return self.n_mem / self.n_train

    @property
    def frac_copies(self) -> float:
        return self.n_copies / self.n_syn


@dataclass(frozen=True)
class Run:
    """One LDM training run and, once trained, its checks."""

    seed: int
    augment: bool
    n_train: int
    history: tuple[Check, ...] = field(default=(), compare=False)
    seconds: float = field(default=0.0, compare=False)

    @property
    def name(self) -> str:
        return f"ldm-n{self.n_train}-{'aug' if self.augment else 'noaug'}-seed{self.seed}"

    @property
    def last(self) -> Check:
        return self.history[-1]


def _number(row: dict[str, str], key: str) -> float | None:
    value = row.get(key)
    return float(value) if value not in (None, "") else None


def _interval(row: dict[str, str], key: str, k: int, n: int) -> tuple[float, float]:
    """The history's own interval (`<key>_ci`, a JSON `[low, high]`) where it has one, else Clopper-Pearson of k/n."""
    written = row.get(f"{key}_ci")
    if written:
        low, high = json.loads(written)
        return float(low), float(high)
    return binomial_interval(k, n)


def read_history(path: Path, n_train: int) -> tuple[Check, ...]:
    """The checks of one run; `n_train`/`n_syn` from the history where it records them (else N_syn = N_train)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"error: {path} holds no memorization checks")
    checks = []
    for row in rows:
        n, n_mem, n_copies = int(_number(row, "n_train") or n_train), int(row["n_mem"]), int(row["n_copies"])
        n_syn = int(_number(row, "n_syn") or n)
        checks.append(
            Check(
                step=int(row["step"]),
                n_mem=n_mem,
                n_copies=n_copies,
                n_train=n,
                n_syn=n_syn,
                frac_mem_ci=_interval(row, "frac_mem", n_mem, n),
                frac_copies_ci=_interval(row, "frac_copies", n_copies, n_syn),
                fd=_number(row, "fd"),
                ms_ssim=_number(row, "ms_ssim"),
                null_frac_mem=_number(row, "null_frac_mem"),
            )  # fmt: skip
        )
    return tuple(checks)


# --- verdicts: computed from the numbers, with the rule written beside them --------------------

VERDICT_RULE = (
    "**reproduced** when every seed moves in the paper's direction and the 95% intervals of the pooled "
    "counts (all seeds together) do not overlap; **same direction, within noise** when every seed moves "
    "that way but the intervals overlap; **mixed** when the seeds disagree; **not reproduced** when no "
    "seed moves the paper's way."
)


def pooled(counts: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return sum(k for k, _ in counts), sum(n for _, n in counts)


def verdict(before: Sequence[tuple[int, int]], after: Sequence[tuple[int, int]], expect: str) -> str:
    """`before`/`after`: per seed `(k, n)`; `expect` is `higher` or `lower` (what the paper found for `after`)."""
    sign = 1 if expect == "higher" else -1
    moved = [sign * (ka / na - kb / nb) > 0 for (kb, nb), (ka, na) in zip(before, after, strict=True)]
    if not any(moved):
        return "not reproduced"
    if not all(moved):
        return "mixed"
    low_b, high_b = binomial_interval(*pooled(before))
    low_a, high_a = binomial_interval(*pooled(after))
    separate = low_a > high_b if expect == "higher" else high_a < low_b
    return "reproduced" if separate else "same direction, within noise"


def rank_correlation(xs: Sequence[float | None], ys: Sequence[float | None]) -> float | None:
    """Spearman's ρ over the checks where both are known; `None` when either is constant or too short."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
        return None
    return float(spearmanr(*zip(*pairs, strict=True)).statistic)


# --- formatting ---------------------------------------------------------------------------------


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def interval(ci: tuple[float, float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def count(k: int, n: int, ci: tuple[float, float] | None = None) -> str:
    """`7/16 (43.8% [19.8, 70.1])`: the count, its share and its 95% interval."""
    return f"{k}/{n} ({percent(k / n)} {interval(ci or binomial_interval(k, n))})"


def optional(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}g}"


# --- the three findings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Findings:
    """The finished runs, grouped by the finding they answer."""

    over_training: tuple[
        Run, ...
    ]  # no augmentation at the main n_train, one per seed; the first is "the" run
    augmented: tuple[Run, ...]  # with augmentation, the same seeds in the same order
    by_size: tuple[Run, ...]  # no augmentation, the first seed, ascending n_train

    @classmethod
    def of(cls, runs: Sequence[Run], scale: Scale) -> Findings:
        by_key = {(r.seed, r.augment, r.n_train): r for r in runs}
        first = scale.seeds[0]
        return cls(
            over_training=tuple(by_key[(seed, False, scale.n_train)] for seed in scale.seeds),
            augmented=tuple(by_key[(seed, True, scale.n_train)] for seed in scale.seeds),
            by_size=tuple(by_key[(first, False, n)] for n in sorted(scale.sizes)),
        )


COLOURS = {"mem": "tab:red", "copies": "tab:purple", "plain": "tab:blue", "augmented": "tab:orange"}


def _band(axis, checks: Sequence[Check], key: str, colour: str, label: str, style: str = "-") -> None:
    steps = [c.step for c in checks]
    axis.plot(steps, [getattr(c, key) for c in checks], style, color=colour, label=label, marker=".")
    if style == "-":
        cis = [getattr(c, f"{key}_ci") for c in checks]
        axis.fill_between(
            steps, [lo for lo, _ in cis], [hi for _, hi in cis], color=colour, alpha=0.15, linewidth=0
        )


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def plot_over_training(findings: Findings, path: Path) -> Path:
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for k, run in enumerate(findings.over_training):
        style = "-" if k == 0 else ":"
        _band(
            axes[0],
            run.history,
            "frac_mem",
            COLOURS["mem"],
            f"memorized (N_mem/N_train), seed {run.seed}",
            style,
        )
        _band(
            axes[0],
            run.history,
            "frac_copies",
            COLOURS["copies"],
            f"copies (N_copies/N_syn), seed {run.seed}",
            style,
        )
        for axis, key in ((axes[1], "fd"), (axes[2], "ms_ssim")):
            axis.plot([c.step for c in run.history], [getattr(c, key) for c in run.history], style, marker=".",
                      color="black", label=f"seed {run.seed}")  # fmt: skip
    axes[0].set(title=f"memorization (N_train = {findings.over_training[0].n_train}), 95% bands",
                xlabel="LDM training step", ylabel="fraction", ylim=(0, 1))  # fmt: skip
    axes[0].legend(fontsize=7)
    axes[1].set(title="FD, embedder space (syn vs val)", xlabel="LDM training step")
    axes[2].set(title="MS-SSIM between samples", xlabel="LDM training step")
    for axis in axes[1:]:
        axis.legend(fontsize=7)
    return _save(figure, path)


def plot_augmentation(findings: Findings, path: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    for plain, augmented in zip(findings.over_training, findings.augmented, strict=True):
        for run, key in ((plain, "plain"), (augmented, "augmented")):
            label = f"{'with' if run.augment else 'without'} augmentation, seed {run.seed}"
            axes[0].plot([c.step for c in run.history], [c.frac_mem for c in run.history],
                         "-" if run.seed == findings.over_training[0].seed else ":", marker=".",
                         color=COLOURS[key], label=label)  # fmt: skip
    axes[0].set(
        title="memorized fraction over training",
        xlabel="LDM training step",
        ylabel="N_mem / N_train",
        ylim=(0, 1),
    )
    axes[0].legend(fontsize=7)
    width = 0.38
    for k, (plain, augmented) in enumerate(zip(findings.over_training, findings.augmented, strict=True)):
        for offset, run, key in ((-width / 2, plain, "plain"), (width / 2, augmented, "augmented")):
            low, high = run.last.frac_mem_ci
            axes[1].bar(k + offset, run.last.frac_mem, width, color=COLOURS[key],
                        yerr=[[run.last.frac_mem - low], [high - run.last.frac_mem]], capsize=3,
                        label=("with" if run.augment else "without") + " augmentation" if k == 0 else None)  # fmt: skip
    axes[1].set_xticks(range(len(findings.augmented)), [f"seed {r.seed}" for r in findings.augmented])
    axes[1].set(
        title=f"last check (step {findings.augmented[0].last.step}), 95% CI",
        ylim=(0, 1),
        ylabel="N_mem / N_train",
    )
    axes[1].legend(fontsize=7)
    return _save(figure, path)


def plot_training_size(findings: Findings, path: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    sizes = [r.n_train for r in findings.by_size]
    for key, label in (
        ("frac_mem", "memorized (N_mem / N_train)"),
        ("frac_copies", "copies (N_copies / N_syn)"),
    ):
        values = [getattr(r.last, key) for r in findings.by_size]
        cis = [getattr(r.last, f"{key}_ci") for r in findings.by_size]
        axes[0].errorbar(sizes, values, yerr=[[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
                                              [hi - v for v, (_, hi) in zip(values, cis, strict=True)]],
                         marker="o", capsize=3, color=COLOURS["mem" if key == "frac_mem" else "copies"], label=label)  # fmt: skip
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(sizes, [str(n) for n in sizes])
    axes[0].set(title=f"last check (step {findings.by_size[0].last.step}), 95% CI", xlabel="training patients (N_train)",
                ylabel="fraction", ylim=(0, 1))  # fmt: skip
    axes[0].legend(fontsize=7)
    for run in findings.by_size:
        axes[1].plot(
            [c.step for c in run.history],
            [c.frac_mem for c in run.history],
            marker=".",
            label=f"N_train = {run.n_train}",
        )
    axes[1].set(
        title="memorized fraction over training",
        xlabel="LDM training step",
        ylabel="N_mem / N_train",
        ylim=(0, 1),
    )
    axes[1].legend(fontsize=7)
    return _save(figure, path)


def write_figures(findings: Findings, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "over_training": plot_over_training(findings, folder / "over_training.png"),
        "augmentation": plot_augmentation(findings, folder / "augmentation.png"),
        "training_size": plot_training_size(findings, folder / "training_size.png"),
    }


# --- RESULTS.md ---------------------------------------------------------------------------------

PAPER = {
    "prevalence": "3D: 40–48% memorized, 76–92% of samples are copies; 2D X-ray: 32.6% / 54.5%",
    "over_training": "N_mem grows with training iterations in every dataset; FID and MS-SSIM do not reveal it",
    "augmentation": "MRNet 47.6% → 27.1%, X-ray 32.6% → 5.6% memorized",
    "training_size": "X-ray 5k / 10k / 20k: memorized 54.7 / 33.2 / 17.7%, copies 68.6 / 51.4 / 39.9%",
}
PAPER_BY_SIZE = [("5k", "54.7%", "68.6%"), ("10k", "33.2%", "51.4%"), ("20k", "17.7%", "39.9%")]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _tracks(rho: float | None) -> str:
    if rho is None:
        return "undefined (constant over the checks)"
    return f"ρ = {rho:+.2f}, " + (
        "tracks N_mem (|ρ| ≥ 0.5)" if abs(rho) >= 0.5 else "does not track N_mem (|ρ| < 0.5)"
    )


def _seed_list(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def over_training_section(findings: Findings, figure: str) -> tuple[list[str], str, str]:
    runs = findings.over_training
    main = runs[0]
    firsts, lasts = [(r.history[0].n_mem, r.n_train) for r in runs], [(r.last.n_mem, r.n_train) for r in runs]
    call = verdict(firsts, lasts, "higher")
    moves = [f"from {count(r.history[0].n_mem, r.n_train, r.history[0].frac_mem_ci)} at step {r.history[0].step} to "
             f"{count(r.last.n_mem, r.n_train, r.last.frac_mem_ci)} at step {r.last.step} on seed {r.seed}" for r in runs]  # fmt: skip
    peak = max(main.history, key=lambda c: c.n_mem)
    rho_fd = rank_correlation([c.n_mem for c in main.history], [c.fd for c in main.history])
    rho_ssim = rank_correlation([c.n_mem for c in main.history], [c.ms_ssim for c in main.history])
    has_null = any(c.null_frac_mem is not None for c in main.history)
    lines = [
        "## 1. Over-training increases memorization",
        "",
        f"Paper: {PAPER['over_training']}.",
        "",
        f"Without augmentation (N_train = {main.n_train}), N_mem went {_seed_list(moves)}. Pooled over the "
        f"{len(runs)} seed(s): {count(*pooled(firsts))} at the first check, {count(*pooled(lasts))} at the last. "
        f"On seed {main.seed} the highest N_mem was {peak.n_mem}/{peak.n_train} (step {peak.step}). "
        f"**Verdict: {call}.**",
        "",
        f"Quality metrics on seed {main.seed}, Spearman ρ with N_mem over its {len(main.history)} checks: "
        f"FD {optional(main.history[0].fd)} → {optional(main.last.fd)}, {_tracks(rho_fd)}; "
        f"MS-SSIM {optional(main.history[0].ms_ssim)} → {optional(main.last.ms_ssim)}, {_tracks(rho_ssim)}. "
        "In the paper neither reveals memorization.",
        "",
        f"![over-training]({figure})",
        "",
        "| step | N_mem / N_train [95% CI] | N_copies / N_syn [95% CI] | FD | MS-SSIM |"
        + (" chance level of frac_mem |" if has_null else ""),
        "|---|---|---|---|---|" + ("---|" if has_null else ""),
    ]
    for c in main.history:
        row = (f"| {c.step} | {count(c.n_mem, c.n_train, c.frac_mem_ci)} | {count(c.n_copies, c.n_syn, c.frac_copies_ci)} "
               f"| {optional(c.fd)} | {optional(c.ms_ssim)} |")  # fmt: skip
        lines.append(
            row
            + (f" {percent(c.null_frac_mem) if c.null_frac_mem is not None else '—'} |" if has_null else "")
        )
    lines += [
        "",
        f"Run folder: `{main.name}` (seed {main.seed}); the other seeds are the dotted lines of the figure.",
        "",
    ]
    summary = (f"N_mem {_seed_list([f'{r.history[0].n_mem}/{r.n_train} → {r.last.n_mem}/{r.n_train} (seed {r.seed})' for r in runs])}; "
               f"FD {_tracks(rho_fd).split(',')[0]}, MS-SSIM {_tracks(rho_ssim).split(',')[0]}")  # fmt: skip
    return lines, summary, call


def augmentation_section(findings: Findings, figure: str) -> tuple[list[str], str, str]:
    plain, augmented = findings.over_training, findings.augmented
    without = [(r.last.n_mem, r.n_train) for r in plain]
    with_ = [(r.last.n_mem, r.n_train) for r in augmented]
    call = verdict(without, with_, "lower")
    changes = [f"from {count(p.last.n_mem, p.n_train, p.last.frac_mem_ci)} to {count(a.last.n_mem, a.n_train, a.last.frac_mem_ci)} "
               f"on seed {p.seed}" for p, a in zip(plain, augmented, strict=True)]  # fmt: skip
    mean_without, mean_with = (
        _mean([r.last.frac_mem for r in plain]),
        _mean([r.last.frac_mem for r in augmented]),
    )
    lines = [
        "## 2. Augmentation reduces memorization",
        "",
        f"Paper: {PAPER['augmentation']} (flips and ±5° rotations, p = 0.5 each).",
        "",
        f"At the last check (step {plain[0].last.step}), augmentation changed N_mem {_seed_list(changes)}: "
        f"mean over seeds {percent(mean_without)} → {percent(mean_with)}; pooled {count(*pooled(without))} → "
        f"{count(*pooled(with_))}. **Verdict: {call}.**",
        "",
        f"![augmentation]({figure})",
        "",
        "| seed | N_mem without augmentation | N_mem with augmentation | N_copies without | N_copies with | run folders |",
        "|---|---|---|---|---|---|",
    ]
    for p, a in zip(plain, augmented, strict=True):
        lines.append(
            f"| {p.seed} | {count(p.last.n_mem, p.n_train, p.last.frac_mem_ci)} | {count(a.last.n_mem, a.n_train, a.last.frac_mem_ci)} "
            f"| {count(p.last.n_copies, p.last.n_syn, p.last.frac_copies_ci)} | {count(a.last.n_copies, a.last.n_syn, a.last.frac_copies_ci)} "
            f"| `{p.name}`, `{a.name}` |"
        )  # fmt: skip
    copies_without = _mean([r.last.frac_copies for r in plain])
    copies_with = _mean([r.last.frac_copies for r in augmented])
    lines += [
        f"| mean | {percent(mean_without)} | {percent(mean_with)} | {percent(copies_without)} | {percent(copies_with)} | |",
        f"| pooled | {count(*pooled(without))} | {count(*pooled(with_))} "
        f"| {count(*pooled([(r.last.n_copies, r.last.n_syn) for r in plain]))} "
        f"| {count(*pooled([(r.last.n_copies, r.last.n_syn) for r in augmented]))} | |",
        "",
    ]
    summary = f"mean memorized {percent(mean_without)} → {percent(mean_with)} over {len(plain)} seed(s)"
    return lines, summary, call


def training_size_section(findings: Findings, figure: str) -> tuple[list[str], str, str]:
    runs = findings.by_size
    calls = {}
    for key, k_of in (
        ("memorized", lambda c: (c.n_mem, c.n_train)),
        ("copies", lambda c: (c.n_copies, c.n_syn)),
    ):
        shares = [k / n for k, n in map(k_of, (r.last for r in runs))]
        call = verdict([k_of(runs[0].last)], [k_of(runs[-1].last)], "lower")
        monotone = all(b < a for a, b in zip(shares, shares[1:], strict=False))
        calls[key] = (
            call
            if monotone or call == "not reproduced"
            else f"{call} at the ends, not monotone over the sizes"
        )
    sizes = " / ".join(str(r.n_train) for r in runs)
    mem = " / ".join(percent(r.last.frac_mem) for r in runs)
    copies = " / ".join(percent(r.last.frac_copies) for r in runs)
    lines = [
        "## 3. More training data lowers memorization",
        "",
        f"Paper: {PAPER['training_size']}.",
        "",
        f"Seed {runs[0].seed}, no augmentation, {runs[0].last.step} steps each (the same batch size, so the larger "
        f"sets see each patient less often, as at a fixed iteration budget), the same validation patients: for "
        f"N_train = {sizes}, memorized {mem} and copies {copies} at the last check. "
        f"**Verdict: memorized — {calls['memorized']}; copies — {calls['copies']}.**",
        "",
        f"![training-set size]({figure})",
        "",
        "| N_train | N_mem / N_train [95% CI] | N_copies / N_syn [95% CI] | paper, X-ray at the same ratio: size, memorized, copies | run folder |",
        "|---|---|---|---|---|",
    ]
    for run, paper in zip(runs, PAPER_BY_SIZE if len(runs) == 3 else [("", "", "")] * len(runs), strict=True):
        c = run.last
        lines.append(f"| {run.n_train} | {count(c.n_mem, c.n_train, c.frac_mem_ci)} | {count(c.n_copies, c.n_syn, c.frac_copies_ci)} "
                     f"| {', '.join(paper) if paper[0] else '—'} | `{run.name}` |")  # fmt: skip
    lines.append("")
    summary = f"N_train {sizes}: memorized {mem}, copies {copies}"
    return lines, summary, f"memorized: {calls['memorized']}; copies: {calls['copies']}"


def _config(name: str, flags: Sequence[str]) -> str:
    """`configs/NAME.yaml`, with the scale's extra flags where it has some."""
    return f"`configs/{name}.yaml`" + (f" with `{' '.join(flags)}`" if flags else "")


def setup_section(findings: Findings, context: dict) -> list[str]:
    scale: Scale = context["scale"]
    n_val = max(1, round(scale.val_fraction * scale.n_patients))
    pool = scale.n_patients - n_val
    all_runs = [*findings.over_training, *findings.augmented, *findings.by_size]
    unique = list(dict.fromkeys(all_runs))
    seconds = context["stage_seconds"]
    machine = context["machine"]
    load = machine["load"]
    busiest = (
        "; ".join(f"`{command}` {used / 60:.1f} CPU-min" for command, used in machine["busiest"])
        or "nothing above 5%"
    )
    times = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items() if name != "total")
    return [
        "## Setup",
        "",
        f"- **Data**: built-in phantoms at {scale.spatial_size}×{scale.spatial_size}, {scale.n_patients} patients (one image "
        f"each, so per image = per patient), split by patient into {pool} training and {n_val} validation patients; every "
        "LDM run is validated, and τ is set, on the same validation patients.",
        f"- **Shared models**: the autoencoder ({_config('phantom_ae', scale.ae_flags)}, {scale.ae_steps} steps) and the "
        f"embedder ({_config('phantom_simclr', scale.simclr_flags)}, {scale.simclr_steps} steps) are trained once on all "
        f"{pool} training patients and used by every LDM run.",
        f"- **LDM runs** (`configs/phantom_ldm.yaml` with flags): {len(unique)} runs of {scale.ldm_steps} steps, batch "
        f"{scale.batch_size}; a memorization check every {scale.check_every_steps} steps and at the end of epoch 0, each "
        f"sampling N_syn = N_train images with {scale.num_inference_steps} DDIM steps from the EMA weights. Seeds "
        f"{', '.join(map(str, scale.seeds))} (`--seed_everything`, also the check's sampling seed).",
        "- **Intervals**: 95% Clopper-Pearson (`memorization/stats.py`), or the history's own `*_ci` where it records them.",
        f"- **Verdicts**: {VERDICT_RULE}",
        f"- **Wall time**: {seconds['total'] / 60:.1f} min in all ({times}); LDM runs "
        f"{context['jobs']} at a time, {context['threads']} thread(s) each, on {os.cpu_count()} cores.",
        f"- **Code**: {context['code']} at the start.",
        f"- **What else ran**: other processes used {machine['other_cores']:.2f} cores on average; 1-minute load "
        f"average {min(load):.1f}–{max(load):.1f} (median {statistics.median(load):.1f}); busiest: {busiest}.",
        "",
    ]


def write_results(findings: Findings, figures: dict[str, Path], path: Path, context: dict) -> Path:
    """RESULTS.md: every number from the runs' histories, the paper's beside it, a verdict per finding."""
    relative = {key: figure.relative_to(path.parent).as_posix() for key, figure in figures.items()}
    over, over_summary, over_call = over_training_section(findings, relative["over_training"])
    aug, aug_summary, aug_call = augmentation_section(findings, relative["augmentation"])
    size, size_summary, size_call = training_size_section(findings, relative["training_size"])
    plain = findings.over_training
    prevalence = (f"last check, mean over seeds: memorized {percent(_mean([r.last.frac_mem for r in plain]))}, "
                  f"copies {percent(_mean([r.last.frac_copies for r in plain]))}")  # fmt: skip
    scale: Scale = context["scale"]
    tiny = scale.name == "tiny"
    lines = [
        "# Results: the paper's findings in miniature",
        "",
        f"Written by `{context['command']}` on {context['date']} (Dar et al., arXiv 2402.01054; the paper's numbers "
        "from PAPER.md). Every number here is read from the runs' `memorization_history.csv` under "
        f"`{context['runs']}`; rerun the command to rewrite this page.",
        "",
        *(
            ["**Tiny mode: sizes for the test suite; these numbers say nothing about memorization.**", ""]
            if tiny
            else []
        ),
        "| finding | paper | here | verdict |",
        "|---|---|---|---|",
        f"| memorization is common | {PAPER['prevalence']} | {prevalence} | context only: at this size it depends on the training length chosen here |",
        f"| over-training increases it | {PAPER['over_training']} | {over_summary} | {over_call} |",
        f"| augmentation reduces it | {PAPER['augmentation']} | {aug_summary} | {aug_call} |",
        f"| more data lowers it | {PAPER['training_size']} | {size_summary} | {size_call} |",
        "",
        *setup_section(findings, context),
        *over,
        *aug,
        *size,
        "## What this does not show",
        "",
        f"- The paper's scale: {min(scale.sizes)}–{max(scale.sizes)} phantom patients at {scale.spatial_size}×"
        f"{scale.spatial_size} instead of 904–20k real scans, and a training length chosen to fit a CPU budget; the "
        "shares are not comparable in size, only in direction.",
        "- Training-to-training spread beyond the seeds run here. A check's interval is for one trained model; the "
        "pooled interval counts the same patients once per seed, so it is narrower than a fresh set of patients would give.",
        "- Per-patient counts with several images per patient (the phantoms have one), and the detector's own "
        "sensitivity and specificity (the paper's fifth finding).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _processes() -> dict[int, tuple[int, float, str]]:
    """pid → (parent pid, CPU seconds so far, command) of every process /proc shows."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, command)
    return table


def _short(command: str) -> str:
    words = [w.rsplit("/", 1)[-1] if i == 0 else w for i, w in enumerate(command.split()[:5])]
    return " ".join(words)[:80]


class LoadMonitor:
    """What else shared the CPU: the CPU seconds of every process outside this script's own tree."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.started = time.perf_counter()
        self.load = [os.getloadavg()[0]]
        self.others: dict[str, float] = {}
        self._last = _processes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _ours(self, table: dict[int, tuple[int, float, str]]) -> set[int]:
        ours, grew = {os.getpid()}, True
        while grew:
            grown = ours | {pid for pid, (parent, _, _) in table.items() if parent in ours}
            grew, ours = len(grown) > len(ours), grown
        return ours

    def _sample(self) -> None:
        table = _processes()
        ours = self._ours(table)
        for pid, (_, seconds, command) in table.items():
            if pid not in ours and command:
                used = seconds - (self._last[pid][1] if pid in self._last else 0.0)
                if used > 0:
                    self.others[_short(command)] = self.others.get(_short(command), 0.0) + used
        self._last = table
        self.load.append(os.getloadavg()[0])

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self._sample()

    def stop(self) -> dict:
        """`load` (1-minute load averages sampled), `other_cores` (cores the others used on average), `busiest`."""
        self._stop.set()
        self._thread.join()
        self._sample()
        elapsed = time.perf_counter() - self.started
        busiest = sorted(self.others.items(), key=lambda item: -item[1])[:5]
        return {
            "load": self.load,
            "other_cores": sum(self.others.values()) / elapsed,
            "busiest": [(command, seconds) for command, seconds in busiest if seconds >= 0.05 * elapsed],
        }


def fit(config: str, name: str, runs: Path, flags: list[str], threads: int) -> tuple[Path, float]:
    """`python cli.py fit` of one stage into `runs/name/`; returns its log folder and wall seconds."""
    command = [
        sys.executable, "cli.py", "fit", "--config", f"configs/{config}.yaml",
        "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", name,
        "--trainer.logger.init_args.version", "", "--trainer.enable_progress_bar", "false", *flags,
    ]  # fmt: skip
    log = runs / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    print(f"[{datetime.now():%H:%M:%S}] {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        status = subprocess.run(
            command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env
        ).returncode
    seconds = time.perf_counter() - started
    if status != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise SystemExit(
            f"error: {name} failed (exit {status}) after {seconds:.0f} s; end of {log}:\n" + "\n".join(tail)
        )
    print(f"[{datetime.now():%H:%M:%S}] {name}: {seconds:.0f} s", flush=True)
    return runs / name, seconds


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
            pool.submit(fit, config, name, runs, flags, threads): name
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="seconds-sized runs (tests), not the paper's findings"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="RESULTS.md and figures/ go here")
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default runs/reproduce-<time>)")
    parser.add_argument(
        "--jobs", type=int, default=2, help="stages trained at once, each on cores/jobs threads"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the scale's seeds")
    args = parser.parse_args(argv)
    scale = TINY if args.tiny else FULL
    if args.seeds:
        scale = replace(scale, seeds=tuple(args.seeds))
    runs = (args.runs or ROOT / "runs" / datetime.now().strftime("reproduce-%Y%m%d-%H%M%S")).resolve()
    cores = os.cpu_count() or 1
    load = LoadMonitor()
    code = code_version()
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}

    # The embedder does not need the autoencoder: both train at once when there are jobs for two.
    shared = {
        "autoencoder": ("phantom_ae", [*scale.ae_flags, "--trainer.max_steps", str(scale.ae_steps)]),
        "embedder": ("phantom_simclr", [*scale.simclr_flags, "--trainer.max_steps", str(scale.simclr_steps)]),
    }
    jobs = max(1, min(args.jobs, len(shared)))
    folders, _ = run_all(
        {name: (config, [*data_flags(scale), *flags]) for name, (config, flags) in shared.items()}, runs, jobs
    )
    stage_seconds[f"autoencoder and embedder ({jobs} at a time)"] = time.perf_counter() - started

    plan = planned_runs(scale)
    jobs = max(1, min(args.jobs, len(plan)))
    ldm_started = time.perf_counter()
    ldm_stages = {
        run.name: ("phantom_ldm", ldm_flags(scale, run, folders["autoencoder"], folders["embedder"]))
        for run in plan
    }
    ldm_folders, ldm_seconds = run_all(ldm_stages, runs, jobs)
    stage_seconds[f"{len(plan)} LDM runs ({jobs} at a time)"] = time.perf_counter() - ldm_started
    finished = [
        replace(
            run,
            history=read_history(ldm_folders[run.name] / "memorization_history.csv", run.n_train),
            seconds=ldm_seconds[run.name],
        )
        for run in plan
    ]

    findings = Findings.of(finished, scale)
    figures = write_figures(findings, args.out / "figures")
    stage_seconds["total"] = time.perf_counter() - started
    context = {
        "scale": scale,
        "runs": runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "stage_seconds": stage_seconds,
        "machine": load.stop(),
        "code": code,
        "jobs": jobs,
        "threads": max(1, cores // jobs),
        "command": "python scripts/reproduce.py" + (" --tiny" if args.tiny else ""),
    }
    results = write_results(findings, figures, args.out / "RESULTS.md", context)
    print(f"{results} and {len(figures)} figures in {args.out / 'figures'}; runs in {runs}; "
          f"{stage_seconds['total'] / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
