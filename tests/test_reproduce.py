"""`make reproduce` (scripts/reproduce.py): its report says what the runs' histories say, and only that."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from memwatch.memorization.history import HISTORY_FILE, MEMBERSHIP_HISTORY_FILE, read_history, write_history
from memwatch.memorization.stats import binomial_interval
from scripts.machine_load import MachineLoad
from scripts.reproduce_figures import write_figures
from scripts.reproduce_results import count, lead, verdict, write_results
from scripts.reproduce_runs import (
    FULL,
    TINY,
    Findings,
    Run,
    Scale,
    planned_runs,
    read_checks,
    read_demo,
    read_membership,
)

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("over_training", "augmentation", "training_size")
FIGURE_LIMIT = 200_000  # bytes: figures are committed to docs/


def history_file(folder: Path, rows: list[dict], with_intervals: bool) -> Path:
    """A `memorization_history.csv` in `folder` as the callback writes it, with or without its `*_ci` columns."""
    full = []
    for row in rows:
        entry = {"check": row["step"], "epoch": row["step"], "tau": 0.8, "fd": 40.0, "ms_ssim": 0.1, **row}
        if with_intervals:
            entry["frac_mem_ci"] = [0.01, 0.99]
            entry["frac_copies_ci"] = [0.02, 0.98]
        full.append(entry)
    return write_history(folder, full)


def history_row(step: int, n_mem: int, n_copies: int) -> dict:
    return {"step": step, "n_mem": n_mem, "n_copies": n_copies}


def test_history_intervals_are_the_histories_own_else_clopper_pearson(tmp_path):
    rows = [history_row(1, 0, 1), history_row(100, 7, 9)]
    written = read_checks(history_file(tmp_path / "new", rows, with_intervals=True), n_train=16)
    assert written[1].frac_mem_ci == (0.01, 0.99) and written[1].frac_copies_ci == (0.02, 0.98)
    computed = read_checks(history_file(tmp_path / "old", rows, with_intervals=False), n_train=16)
    assert computed[1].frac_mem_ci == binomial_interval(7, 16)
    assert computed[0].frac_copies_ci == binomial_interval(1, 16)
    assert computed[1].frac_mem == 7 / 16


def test_verdicts_follow_the_written_rule():
    # 0/16 → 12/16 in both seeds: intervals of 0/32 and 24/32 are far apart
    assert verdict([(0, 16), (0, 16)], [(12, 16), (12, 16)], "higher") == "reproduced"
    # 1/16 → 3/16: the right way, but well within noise
    assert verdict([(1, 16)], [(3, 16)], "higher") == "same direction, within noise"
    assert verdict([(8, 16), (8, 16)], [(2, 16), (9, 16)], "lower") == "mixed"
    assert verdict([(4, 16)], [(4, 16)], "lower") == "not reproduced"
    assert verdict([(2, 16)], [(9, 16)], "lower") == "not reproduced"


def test_every_run_is_planned_once_and_the_scales_are_consistent():
    for scale in (FULL, TINY):
        plan = planned_runs(scale)
        assert len(plan) == len(set(plan)) == 2 * len(scale.seeds) + len(scale.sizes) - 1
    assert len(FULL.seeds) >= 2 and len(FULL.sizes) == 3
    with pytest.raises(ValueError, match="multiple"):
        Scale(**{**vars(FULL), "check_every_steps": 30})


def synthetic_findings(tmp_path: Path) -> tuple[Findings, Scale]:
    """Histories with known counts: memorization rises, augmentation lowers it, more data lowers it."""
    scale = Scale(**{**vars(FULL), "seeds": (0, 1)})
    last = {(0, False, 16): (8, 11), (1, False, 16): (6, 9), (0, True, 16): (2, 3), (1, True, 16): (1, 1),
            (0, False, 32): (5, 7), (0, False, 64): (1, 2)}  # fmt: skip
    runs = []
    for (seed, augment, n), (n_mem, n_copies) in last.items():
        rows = [
            history_row(1, 0, 0),
            history_row(600, n_mem // 2, n_copies // 2),
            history_row(1200, n_mem, n_copies),
        ]
        path = history_file(tmp_path / f"{seed}{augment}{n}", rows, with_intervals=False)
        runs.append(Run(seed=seed, augment=augment, n_train=n, history=read_checks(path, n)))
    return Findings.of(runs, scale), scale


def results_page(findings: Findings, scale: Scale, out: Path) -> tuple[str, dict[str, Path]]:
    """RESULTS.md and the figures written into `out` for `findings`, with a fixed context."""
    figures = write_figures(findings, out / "figures")
    context = {
        "scale": scale, "runs": "runs/reproduce-x", "date": "today", "jobs": 2, "threads": 1,
        "stage_seconds": {"shared": 60.0, "LDM": 600.0, "total": 660.0}, "command": "python scripts/reproduce.py",
        "code": "commit abc", "machine": MachineLoad(seconds=660.0, load=[1.0, 2.0], load_before=(1.0, 1.0, 1.0),
                                                      load_after=(2.0, 1.0, 1.0), busy_cpu_seconds=990.0, other_cores=0.5,
                                                      busiest=[("python bench/x.py", 120.0)]),
    }  # fmt: skip
    return write_results(findings, figures, out / "RESULTS.md", context).read_text(), figures


def test_results_sentences_and_tables_carry_the_histories_numbers(tmp_path):
    findings, scale = synthetic_findings(tmp_path)
    text, figures = results_page(findings, scale, tmp_path / "docs")
    assert f"from {count(0, 16)} at step 1 to {count(8, 16)} at step 1200 on seed 0" in text
    assert (
        f"from {count(8, 16)} to {count(2, 16)} on seed 0 and from {count(6, 16)} to {count(1, 16)} on seed 1"
        in text
    )
    assert f"mean over seeds {100 * 7 / 16:.1f}% → {100 * 1.5 / 16:.1f}%" in text
    assert f"| 64 | {count(1, 64)} | {count(2, 64)} |" in text
    assert "| over-training increases it |" in text and "| reproduced |" in text  # 0/32 vs 14/32
    assert "memorized — reproduced; copies — reproduced" in text  # 8/16 vs 1/64, 11/16 vs 2/64
    for name in FIGURES:
        assert f"](figures/{name}.png)" in text
        assert 0 < figures[name].stat().st_size < FIGURE_LIMIT


# --- does the membership AUC foretell N_mem? --------------------------------------------------------

MEMBERSHIP_SECTION = "## 4. Does the membership AUC foretell N_mem?"
# the made-up checks' chance level: 7/16 (interval from 0.198) is above it, 2/16 (from 0.016) is not
NULL_FRAC_MEM = 0.1


def membership_row(step: int, up: bool) -> dict:
    """One membership evaluation: above its control (0.45–0.55) with an AUC growing with the step, or at 0.5."""
    auc = round(0.5 + step / 2000, 3) if up else 0.5
    low, high = (round(auc - 0.02, 3), round(auc + 0.02, 3)) if up else (0.4, 0.6)
    return {"epoch": step, "step": step, "membership_auc": auc, "membership_auc_low": low, "membership_auc_high": high,
            "membership_tpr_at_5fpr": 0.1, "membership_auc_control": 0.5, "membership_auc_control_low": 0.45,
            "membership_auc_control_high": 0.55, "membership_seconds": 0.2, "membership_above_control": up,
            "membership_method": "mann-whitney"}  # fmt: skip


def membership_run_folder(folder: Path, auc_rises_at: int | None, n_mem: dict[int, int]) -> Path:
    """A run folder with checks (`step → N_mem` of 16, chance level 0.1, the AUC beside N_mem at each check) and a
    membership evaluation every 50 steps, above its control from `auc_rises_at` (never when `None`)."""
    membership = [
        membership_row(step, auc_rises_at is not None and step >= auc_rises_at)
        for step in range(50, max(n_mem) + 1, 50)
    ]
    write_history(folder, membership, MEMBERSHIP_HISTORY_FILE)
    at = {row["step"]: row for row in membership}
    checks = [
        {**history_row(step, k, k), "n_train": 16, "n_syn": 16, "null_frac_mem": NULL_FRAC_MEM,
         **{key: at[step][key] for key in at.get(step, {}) if key.startswith("membership_")}}
        for step, k in n_mem.items()
    ]  # fmt: skip
    history_file(folder, checks, with_intervals=False)
    return folder


RISING_N_MEM = {0: 0, 200: 2, 400: 7, 600: 10}  # above chance from step 400, at chance at 0 and 200


def with_membership(findings: Findings, tmp_path: Path, auc_rises_at: int | None) -> Findings:
    """`findings` whose over-training runs have membership histories: N_mem as `RISING_N_MEM`, the AUC above its
    control from `auc_rises_at`."""
    runs = []
    for run in findings.over_training:
        folder = membership_run_folder(tmp_path / f"membership-{run.seed}", auc_rises_at, RISING_N_MEM)
        runs.append(replace(run, history=read_checks(folder, 16), membership=read_membership(folder)))
    return replace(findings, over_training=tuple(runs))


def section(text: str) -> str:
    """The membership section of a RESULTS.md."""
    start = text.index(MEMBERSHIP_SECTION)
    return text[start : text.index("\n## ", start)]


def test_membership_history_is_read_and_its_absence_is_no_history(tmp_path):
    folder = membership_run_folder(tmp_path / "run", 150, RISING_N_MEM)
    points = read_membership(folder)
    assert [p.step for p in points] == list(range(50, 601, 50))
    assert [p.above_control for p in points] == [step >= 150 for step in range(50, 601, 50)]
    assert points[-1].auc == 0.8 and points[-1].auc_ci == (0.78, 0.82) and points[0].auc_control == 0.5
    checks = read_checks(folder, 16)
    assert [c.membership_auc for c in checks] == [None, 0.6, 0.7, 0.8]
    assert read_membership(tmp_path / "older") == ()


def test_an_auc_that_rises_before_n_mem_is_said_to_lead(tmp_path):
    findings, scale = synthetic_findings(tmp_path)
    findings = with_membership(findings, tmp_path, auc_rises_at=150)
    text, figures = results_page(findings, scale, tmp_path / "docs")
    part = section(text)
    # the AUC rose at step 150, by the step-200 check where N_mem (2/16) was at chance; N_mem rose at 400
    assert (
        "| seed 0 | 12 (steps 50–600) | 150 | 400 | leads by 250 steps | +1.00 | `ldm-n16-noaug-seed0` |"
        in part
    )
    assert "**Verdict: the membership AUC leads N_mem on every run (seed 0 and seed 1).**" in part
    assert "does not lead" not in part
    assert "](figures/membership_vs_nmem.png)" in part
    assert 0 < figures["membership"].stat().st_size < FIGURE_LIMIT


def test_an_auc_that_never_rises_does_not_lead(tmp_path):
    findings, scale = synthetic_findings(tmp_path)
    text, _ = results_page(with_membership(findings, tmp_path, auc_rises_at=None), scale, tmp_path / "docs")
    part = section(text)
    assert "| seed 1 | 12 (steps 50–600) | never | 400 | lags: the AUC never rose above its control |" in part
    assert "**Verdict: the membership AUC does not lead N_mem at this size**" in part
    assert "leads by" not in part and "leads N_mem" not in part


def test_an_auc_rising_in_the_check_interval_of_n_mem_or_after_it_does_not_lead(tmp_path):
    findings, _ = synthetic_findings(tmp_path)
    after = with_membership(findings, tmp_path / "after", auc_rises_at=450).over_training[0]
    assert lead(after) == ("lags by 50 steps", False)
    within = with_membership(findings, tmp_path / "within", auc_rises_at=250).over_training[0]
    assert lead(within) == (
        "no lead the checks can see: the AUC rose 150 steps before N_mem, in the same check interval",
        False,
    )
    never = membership_run_folder(tmp_path / "never", None, {0: 0, 200: 1})
    assert lead(replace(after, history=read_checks(never), membership=read_membership(never))) == (
        "neither rose",
        False,
    )


def test_runs_without_membership_history_say_so_and_leave_the_rest_of_the_page_unchanged(tmp_path):
    findings, scale = synthetic_findings(tmp_path)
    without, figures = results_page(findings, scale, tmp_path / "without")
    assert section(without).strip() == (
        f"{MEMBERSHIP_SECTION}\n\nThe runs have no membership history (`membership_history.csv`): the membership "
        "signal was not evaluated, so this section is skipped."
    )
    assert (
        "membership" not in figures
        and not (tmp_path / "without" / "figures" / "membership_vs_nmem.png").exists()
    )
    # the same runs with membership histories beside their checks: only the membership section differs
    histories = [run.history for run in findings.over_training]
    findings = with_membership(findings, tmp_path, auc_rises_at=150)
    findings = replace(findings, over_training=tuple(
        replace(run, history=history) for run, history in zip(findings.over_training, histories, strict=True)))  # fmt: skip
    with_, _ = results_page(findings, scale, tmp_path / "with")
    assert section(with_) != section(without)
    assert with_.replace(section(with_), "") == without.replace(section(without), "")


def test_the_demo_run_joins_the_membership_section(tmp_path):
    findings, scale = synthetic_findings(tmp_path)
    demo = read_demo(membership_run_folder(tmp_path / "demo-20261201-120000", 150, RISING_N_MEM))
    assert (demo.label, demo.name, demo.n_train) == ("demo", "demo-20261201-120000", 16)
    text, _ = results_page(replace(findings, demo=(demo,)), scale, tmp_path / "docs")
    part = section(text)
    assert (
        "| demo | 12 (steps 50–600) | 150 | 400 | leads by 250 steps | +1.00 | `demo-20261201-120000` |"
        in part
    )
    assert "No membership history: `ldm-n16-noaug-seed0`, `ldm-n16-noaug-seed1`." in part
    assert "**Verdict: the membership AUC leads N_mem on every run (demo).**" in part
    with pytest.raises(SystemExit, match="holds no memorization_history.csv"):
        read_demo(tmp_path / "elsewhere")


@pytest.mark.slow
def test_tiny_reproduction_through_the_cli_reports_each_runs_history(tmp_path):
    """The whole script in tiny mode (6 CLI fits, about 1 min on a quiet 2-core CPU, 3 min when it is shared)."""
    out, runs = tmp_path / "docs", tmp_path / "runs"
    command = [
        sys.executable,
        "scripts/reproduce.py",
        "--tiny",
        "--jobs",
        "4",
        "--out",
        str(out),
        "--runs",
        str(runs),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    text = (out / "RESULTS.md").read_text()
    for name in FIGURES:
        with Image.open(out / "figures" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width >= 400
    lines = text.replace(section(text), "").splitlines()  # the findings' tables; the membership one is below
    histories = {path.parent.name: path for path in runs.glob(f"ldm-*/{HISTORY_FILE}")}
    assert sorted(histories) == sorted(run.name for run in planned_runs(TINY))
    for name, path in histories.items():
        rows = read_history(path)
        last = rows[-1]
        n_train, n_syn = last["n_train"], last["n_syn"]
        mem = count(last["n_mem"], n_train, tuple(last["frac_mem_ci"]))
        copies = count(last["n_copies"], n_syn, tuple(last["frac_copies_ci"]))
        naming = [line for line in lines if line.startswith("|") and f"`{name}`" in line]
        assert naming, f"no table row names {name}"
        assert all(mem in line for line in naming), (name, mem, naming)
        if name == "ldm-n4-noaug-seed0":  # the over-training run: one table row per check
            for row in rows:
                expected = count(row["n_mem"], n_train, tuple(row["frac_mem_ci"]))
                assert f"| {row['step']} | {expected} |" in text
        assert all(copies in line for line in naming), (name, copies, naming)
    # the tiny scale evaluates the membership signal every 2 epochs: the section reads the runs' own files
    membership = read_history(runs / "ldm-n4-noaug-seed0" / MEMBERSHIP_HISTORY_FILE)
    steps = f"{membership[0]['step']}–{membership[-1]['step']}"
    assert f"| seed 0 | {len(membership)} (steps {steps}) |" in section(text)
    assert (out / "figures" / "membership_vs_nmem.png").is_file()
