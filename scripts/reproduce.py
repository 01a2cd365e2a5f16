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
95% Clopper-Pearson intervals, a verdict per finding computed from the numbers). Where the runs also wrote
`membership_history.csv`, the page asks whether the membership AUC rises before N_mem; `--demo` adds the
LDM run of `make demo` to that question.

The runs (sizes, flags, launching, reading their checks) are in `reproduce_runs.py`; the page in
`reproduce_results.py` (verdicts, RESULTS.md) and `reproduce_figures.py`.

    python scripts/reproduce.py                      # full size: docs/RESULTS.md, docs/figures/*.png
    python scripts/reproduce.py --tiny --out /tmp/r  # seconds-sized, for the test
    python scripts/reproduce.py --demo runs/phantom_ldm/demo-20261201-120000  # and the demo's LDM run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.machine_load import LoadMonitor  # noqa: E402
from scripts.reproduce_figures import write_figures  # noqa: E402
from scripts.reproduce_results import write_results  # noqa: E402
from scripts.reproduce_runs import (  # noqa: E402
    FULL,
    TINY,
    Findings,
    code_version,
    data_flags,
    ldm_flags,
    planned_runs,
    read_checks,
    read_demo,
    read_membership,
    run_all,
)


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
    parser.add_argument(
        "--demo", type=Path, default=None, help="make demo's LDM run folder: membership section"
    )
    args = parser.parse_args(argv)
    # read before any training, so that a wrong folder stops the script at once
    demo = (read_demo(args.demo),) if args.demo else ()
    demo_flag = f" --demo {args.demo}" if args.demo else ""
    scale = TINY if args.tiny else FULL
    if args.seeds:
        scale = replace(scale, seeds=tuple(args.seeds))
    runs = (args.runs or ROOT / "runs" / datetime.now().strftime("reproduce-%Y%m%d-%H%M%S")).resolve()
    cores = os.cpu_count() or 1
    load = LoadMonitor()  # the whole script: every stage, and the gaps between them
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
            history=read_checks(ldm_folders[run.name], run.n_train),
            membership=read_membership(ldm_folders[run.name]),
            seconds=ldm_seconds[run.name],
        )
        for run in plan
    ]

    findings = replace(Findings.of(finished, scale), demo=demo)
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
        "command": "python scripts/reproduce.py" + (" --tiny" if args.tiny else "") + demo_flag,
    }
    results = write_results(findings, figures, args.out / "RESULTS.md", context)
    print(f"{results} and {len(figures)} figures in {args.out / 'figures'}; runs in {runs}; "
          f"{stage_seconds['total'] / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
