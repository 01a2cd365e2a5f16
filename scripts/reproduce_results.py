"""The results page of `make reproduce`: a verdict per finding, computed from the runs' numbers, and RESULTS.md.

Every number on the page comes from the runs' `memorization_history.csv` and `membership_history.csv`
(`scripts/reproduce_runs.py` reads them); the paper's numbers (Dar et al., arXiv 2402.01054) stand beside
ours, and each verdict follows `VERDICT_RULE` (`MEMBERSHIP_RULE` for the membership signal), which the page states.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from scipy.stats import spearmanr

from memwatch.memorization.stats import binomial_interval
from scripts.machine_load import MachineLoad
from scripts.reproduce_runs import Check, Findings, Run, Scale

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
        return "undefined (constant, or fewer than 3 checks)"
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


# --- does the membership signal foretell N_mem? ------------------------------------------------

MEMBERSHIP_RULE = (
    "the AUC *rose* at the first evaluation whose 95% interval lies above the control's interval "
    "(`membership_above_control`); N_mem *rose* at the first check whose 95% interval lies above its chance level "
    "(`null_frac_mem`, 0 where the history has none; the audit report's *above chance*); the AUC *leads* when it "
    "had risen by a check at which N_mem was still at chance, since N_mem is only measured at the checks."
)


def above_chance(check: Check) -> bool:
    """N_mem clearly above chance: the low end of its 95% interval above the chance level (0 where none was recorded)."""
    return check.frac_mem_ci[0] > (check.null_frac_mem or 0.0)


def auc_rise(run: Run) -> int | None:
    """The step of the first membership evaluation whose interval lies above the control's."""
    return next((p.step for p in run.membership if p.above_control), None)


def n_mem_rise(run: Run) -> int | None:
    """The step of the first check with N_mem above chance."""
    return next((c.step for c in run.history if above_chance(c)), None)


def lead(run: Run) -> tuple[str, bool]:
    """Which rose first, in words, and whether the AUC leads (it had risen by a check where N_mem was at chance)."""
    auc, mem = auc_rise(run), n_mem_rise(run)
    at_chance = [c.step for c in run.history if mem is None or c.step < mem]
    if auc is None:
        return ("neither rose" if mem is None else "lags: the AUC never rose above its control"), False
    if at_chance and auc <= at_chance[-1]:
        return (
            "leads: N_mem never rose above chance" if mem is None else f"leads by {mem - auc} steps"
        ), True
    if mem is None:
        return f"undecided: the AUC rose at step {auc}, after the last check", False
    if auc > mem:
        return f"lags by {auc - mem} steps", False
    return (
        f"no lead the checks can see: the AUC rose {mem - auc} steps before N_mem, in the same check interval",
        False,
    )


def membership_rho(run: Run) -> float | None:
    """Spearman's ρ of the membership AUC with N_mem over the checks where both were measured."""
    return rank_correlation([c.n_mem for c in run.history], [c.membership_auc for c in run.history])


def _membership_sentence(run: Run) -> str:
    first, last = run.membership[0], run.membership[-1]
    both = sum(c.membership_auc is not None for c in run.history)
    return (
        f"- {run.label.capitalize()}: AUC {optional(first.auc)} at step {first.step} → {optional(last.auc)} "
        f"[{optional(last.auc_ci[0])}, {optional(last.auc_ci[1])}] at step {last.step} (control "
        f"{optional(last.auc_control)}) over {len(run.membership)} evaluations; N_mem {run.history[0].n_mem} → "
        f"{run.last.n_mem} of {run.n_train}; AUC against N_mem over the {both} checks with both: {_tracks(membership_rho(run))}."
    )


def _membership_row(run: Run) -> str:
    auc, mem, rho = auc_rise(run), n_mem_rise(run), membership_rho(run)
    points = run.membership
    return (
        f"| {run.label} | {len(points)} (steps {points[0].step}–{points[-1].step}) "
        f"| {'never' if auc is None else auc} | {'never' if mem is None else mem} | {lead(run)[0]} "
        f"| {'—' if rho is None else f'{rho:+.2f}'} | `{run.name}` |"
    )


def membership_verdict(runs: Sequence[Run]) -> str:
    led = [run.label for run in runs if lead(run)[1]]
    if not led:
        return (f"**Verdict: the membership AUC does not lead N_mem at this size**: on none of the {len(runs)} run(s) "
                "had it risen above its control at a check where N_mem was still at chance.")  # fmt: skip
    if len(led) == len(runs):
        return f"**Verdict: the membership AUC leads N_mem on every run ({_seed_list(led)}).**"
    return (f"**Verdict: mixed: the membership AUC leads N_mem on {_seed_list(led)} only, of {len(runs)} runs; it "
            "does not lead N_mem consistently at this size.**")  # fmt: skip


def membership_section(findings: Findings, figure: str | None) -> list[str]:
    """Section 4: the membership AUC beside N_mem per run, which rose first, and a verdict; or that no run has one."""
    title = ["## 4. Does the membership AUC foretell N_mem?", ""]
    runs = findings.with_membership
    if not runs:
        return [*title, "The runs have no membership history (`membership_history.csv`): the membership signal "
                "was not evaluated, so this section is skipped.", ""]  # fmt: skip
    missing = [f"`{run.name}`" for run in findings.membership_runs if not run.membership]
    return [
        *title,
        "Not in the paper: the membership signal (`memorization/membership.py`) scores training and held-out "
        "images by the model's own denoising loss; its AUC is 0.5 without a signal and higher when the model fits "
        "its training images better, and its control compares two halves of the training images. It is evaluated "
        f"more often than the checks; does it rise before N_mem? Rule: {MEMBERSHIP_RULE}",
        "",
        *[_membership_sentence(run) for run in runs],
        "",
        f"![membership AUC and N_mem]({figure})",
        "",
        "| run | membership evaluations | AUC above control from step | N_mem above chance from check "
        "| AUC vs N_mem | Spearman ρ (AUC, N_mem) at the checks | run folder |",
        "|---|---|---|---|---|---|---|",
        *[_membership_row(run) for run in runs],
        "",
        *([f"No membership history: {', '.join(missing)}.", ""] if missing else []),
        membership_verdict(runs),
        "",
    ]


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
    machine: MachineLoad = context["machine"]
    load = machine.load
    busiest = (
        "; ".join(f"`{command}` {used / 60:.1f} CPU-min" for command, used in machine.busiest)
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
        f"- **What else ran**: other processes used {machine.other_cores:.2f} cores on average; 1-minute load "
        f"average {min(load):.1f}–{max(load):.1f} (median {statistics.median(load):.1f}); busiest: {busiest}.",
        "",
    ]


def write_results(findings: Findings, figures: dict[str, Path], path: Path, context: dict) -> Path:
    """RESULTS.md: every number from the runs' histories, the paper's beside it, a verdict per finding."""
    relative = {key: figure.relative_to(path.parent).as_posix() for key, figure in figures.items()}
    over, over_summary, over_call = over_training_section(findings, relative["over_training"])
    aug, aug_summary, aug_call = augmentation_section(findings, relative["augmentation"])
    size, size_summary, size_call = training_size_section(findings, relative["training_size"])
    membership = membership_section(findings, relative.get("membership"))
    plain = findings.over_training
    prevalence = (f"last check, mean over seeds: memorized {percent(_mean([r.last.frac_mem for r in plain]))}, "
                  f"copies {percent(_mean([r.last.frac_copies for r in plain]))}")  # fmt: skip
    scale: Scale = context["scale"]
    tiny = scale.name == "tiny"
    lines = [
        "# Results: the paper's findings in miniature",
        "",
        f"Written by `{context['command']}` on {context['date']} (Dar et al., arXiv 2402.01054; the paper's numbers "
        "as it reports them). Every number here is read from the runs' `memorization_history.csv` under "
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
        *membership,
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
