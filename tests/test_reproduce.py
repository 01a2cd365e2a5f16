"""`make reproduce` (scripts/reproduce.py): its report says what the runs' histories say, and only that."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from memorization.history import HISTORY_FILE, read_history, write_history
from memorization.stats import binomial_interval
from scripts.machine_load import MachineLoad
from scripts.reproduce_figures import write_figures
from scripts.reproduce_results import count, verdict, write_results
from scripts.reproduce_runs import FULL, TINY, Findings, Run, Scale, planned_runs, read_checks

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


def test_results_sentences_and_tables_carry_the_histories_numbers(tmp_path):
    findings, scale = synthetic_findings(tmp_path)
    figures = write_figures(findings, tmp_path / "docs" / "figures")
    context = {
        "scale": scale, "runs": "runs/reproduce-x", "date": "today", "jobs": 2, "threads": 1,
        "stage_seconds": {"shared": 60.0, "LDM": 600.0, "total": 660.0}, "command": "python scripts/reproduce.py",
        "code": "commit abc", "machine": MachineLoad(seconds=660.0, load=[1.0, 2.0], load_before=(1.0, 1.0, 1.0),
                                                      load_after=(2.0, 1.0, 1.0), busy_cpu_seconds=990.0, other_cores=0.5,
                                                      busiest=[("python bench/x.py", 120.0)]),
    }  # fmt: skip
    text = write_results(findings, figures, tmp_path / "docs" / "RESULTS.md", context).read_text()
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
    lines = text.splitlines()
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
