"""How well the default embedder finds planted copies in image families it was not built on.

    python bench/detector_quality.py                                   # vessels, radiograph, tissue at full size
    python bench/detector_quality.py --families vessels --n-train 32 --n-val 16 --n-copies 8 --n-novel 16 \
        --fit-arg=--trainer.max_steps=20                               # a tiny run

Per family (`datamodules/families.py`) it writes a planted-copy set (`train/`, `val/`,
`synthetic/` of copies of training patients and novel patients, `planted.json`), trains the
embedder with the real CLI (`python cli.py fit --config configs/folder_simclr.yaml
--data.init_args.train_dir ... --data.init_args.val_dir ...`, plus any `--fit-arg`), audits
the synthetic folder with `python cli.py audit`, and scores `pairs.csv` against
`planted.json`: sensitivity = share of planted copies flagged, specificity = share of novel
synthetic images not flagged, `attributed` = share of planted copies flagged *and* matched to
their own training patient, `retrieved` = share whose nearest training image is their source
(flagged or not), and the median nearest-training correlation of copies and of novel images. Prints JSON with the counts, 95% Clopper–Pearson intervals,
τ and the embedder's training wall time. `tissue` is the held-back family (never tuned on).

Specificity is bounded by the threshold rule itself: τ is the 95th percentile of each training
image's nearest *held-out* correlation (N_val candidates), while a synthetic image is a copy when
its nearest *training* correlation (N_train candidates) reaches τ. With N_train > N_val a novel
image has more candidates than τ was set with and is flagged more than 5% of the time whatever the
embedder (the audit's `null_frac_copies` estimates by how much), so the default holds out as many
patients as it trains on.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe_machine  # noqa: E402
from datamodules.families import FAMILIES, write_planted_copy_set  # noqa: E402
from memorization.stats import binomial_interval  # noqa: E402

TUNING_FAMILIES = ("vessels", "radiograph")
HELD_BACK_FAMILY = "tissue"


def clopper_pearson(successes: int, trials: int) -> list[float]:
    """`memorization.stats.binomial_interval` (exact, 95%) as a JSON-ready `[low, high]`, rounded to 4 places."""
    return [round(bound, 4) for bound in binomial_interval(successes, trials)]


def score(pairs_csv: Path, planted: dict) -> dict:
    """Sensitivity, specificity and attribution of an audit's `pairs.csv` against a planted set's `planted.json`."""
    with Path(pairs_csv).open(newline="") as handle:
        rows = {row["synthetic_id"]: row for row in csv.DictReader(handle)}
    missing = set(planted["copies"]) | set(planted["novel"])
    missing -= set(rows)
    if missing:
        raise ValueError(f"{pairs_csv} lacks {len(missing)} planted synthetic ids, e.g. {sorted(missing)[:3]}")

    def flagged(synthetic_id: str) -> bool:
        return rows[synthetic_id]["is_copy"] == "True"

    copies, novel = planted["copies"], planted["novel"]
    found = sum(flagged(s) for s in copies)
    attributed = sum(flagged(s) and rows[s]["nearest_train_id"] == source for s, source in copies.items())
    passed = sum(not flagged(s) for s in novel)
    retrieved = sum(rows[s]["nearest_train_id"] == source for s, source in copies.items())

    def median_correlation(ids) -> float:
        return round(float(np.median([float(rows[s]["correlation"]) for s in ids])), 4)

    return {
        "sensitivity": round(found / len(copies), 4),
        "specificity": round(passed / len(novel), 4),
        "attributed": round(attributed / len(copies), 4),
        "retrieved": round(retrieved / len(copies), 4),
        "median_correlation_copies": median_correlation(copies),
        "median_correlation_novel": median_correlation(novel),
        "n_copies": len(copies),
        "n_copies_flagged": found,
        "n_copies_attributed": attributed,
        "n_novel": len(novel),
        "n_novel_flagged": len(novel) - passed,
        "sensitivity_ci": clopper_pearson(found, len(copies)),
        "specificity_ci": clopper_pearson(passed, len(novel)),
    }


def cli(*arguments: str, threads: int | None) -> subprocess.CompletedProcess:
    """`python cli.py ...` in a subprocess from the repository root; raises with its stderr tail on failure."""
    environment = None
    if threads is not None:
        import os

        environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [sys.executable, "cli.py", *arguments], cwd=ROOT, capture_output=True, text=True, env=environment
    )
    if result.returncode != 0:
        raise RuntimeError(f"python cli.py {' '.join(arguments)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def run_family(
    family: str,
    work: Path,
    *,
    n_train: int,
    n_val: int,
    n_copies: int,
    n_novel: int,
    size: int,
    seed: int = 0,
    config: str = "configs/folder_simclr.yaml",
    fit_args: tuple[str, ...] = (),
    threads: int | None = None,
) -> dict:
    """Write one family's planted-copy set under `work`, train the embedder, audit, score. Returns the figures."""
    work = Path(work)
    data = work / "data"
    planted = write_planted_copy_set(
        data, family, n_train=n_train, n_val=n_val, n_copies=n_copies, n_novel=n_novel, spatial_size=(size, size), seed=seed
    )
    fit = [
        "fit", "--config", config,
        "--data.init_args.train_dir", str(data / "train"), "--data.init_args.val_dir", str(data / "val"),
        "--data.init_args.spatial_size", json.dumps([size, size]),
        "--trainer.logger.init_args.save_dir", str(work / "runs"), "--checkpoint.dirpath", str(work / "checkpoints"),
        "--trainer.enable_progress_bar", "false", *fit_args,
    ]  # fmt: skip
    start = time.perf_counter()
    cli(*fit, threads=threads)
    fit_seconds = time.perf_counter() - start
    embedder = work / "checkpoints" / "last.ckpt"
    audit_out = work / "audit"
    audit = [
        "audit", "--embedder", str(embedder), "--train", str(data / "train"), "--val", str(data / "val"),
        "--synthetic", str(data / "synthetic"), "--out", str(audit_out),
    ]  # fmt: skip
    start = time.perf_counter()
    cli(*audit, threads=threads)
    audit_seconds = time.perf_counter() - start
    summary = json.loads((audit_out / "summary.json").read_text())
    return {
        "family": family,
        "held_back": family == HELD_BACK_FAMILY,
        **score(audit_out / "pairs.csv", planted),
        "tau": summary.get("tau"),
        "detector_self_check": summary.get("detector"),
        "fit_seconds": round(fit_seconds, 1),
        "audit_seconds": round(audit_seconds, 1),
        "sizes": {"n_train": n_train, "n_val": n_val, "n_copies": n_copies, "n_novel": n_novel, "size": size},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=[*TUNING_FAMILIES, HELD_BACK_FAMILY], choices=sorted(FAMILIES))
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument(
        "--n-val", type=int, default=256,
        help="held-out patients; as many as training patients, so that a copy-nobody image is flagged 5%% of the time",
    )
    parser.add_argument("--n-copies", type=int, default=64)
    parser.add_argument("--n-novel", type=int, default=128)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted-copy sets (patients, copies)")
    parser.add_argument("--config", default="configs/folder_simclr.yaml")
    parser.add_argument(
        "--fit-arg", action="append", default=[], help="extra argument for cli.py fit, e.g. --fit-arg=--trainer.max_steps=20"
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the CLI subprocesses")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the sets, checkpoints and audits here")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="detector_quality_"))
    results = []
    try:
        for family in args.families:
            results.append(
                run_family(
                    family, work / family, n_train=args.n_train, n_val=args.n_val, n_copies=args.n_copies,
                    n_novel=args.n_novel, size=args.size, seed=args.seed, config=args.config,
                    fit_args=tuple(args.fit_arg), threads=args.threads,
                )
            )  # fmt: skip
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    output = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": describe_machine(("torch", "lightning", "monai")),
        "config": args.config,
        "fit_args": args.fit_arg,
        "families": results,
    }
    print(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
