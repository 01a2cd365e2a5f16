"""What the chance level and the self-check cost beside copy detection itself, at the paper's sizes.

Times `detect_copies`, `held_out_exceedances` + `chance_level` (and `detector_accuracy` on
`--positives` varied rows) on random embeddings, and the peak RSS each adds; prints JSON.
The ratio to `detect_copies` is what matters: both run once per check (the chance level once
per fit). Also runs the sizes of MRNet (904 / 226 / N_syn 904) to show how the chance level
is estimated there (extrapolated, N_syn > N_val).

    python bench/chance_level.py --n-train 20000 --n-val 10000 --dim 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import time
from pathlib import Path

import torch
from machine import describe_machine  # bench/machine.py: scripts run from bench/ on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memwatch.memorization import detect_copies  # noqa: E402
from memwatch.memorization.chance import chance_level, detector_accuracy, held_out_exceedances  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-val", type=int, default=10000)
    parser.add_argument("--n-syn", type=int, default=None, help="default: n-train")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--positives", type=int, default=1000)
    args = parser.parse_args()
    n_syn = args.n_syn or args.n_train
    generator = torch.Generator().manual_seed(0)
    train, val, syn = (torch.randn(n, args.dim, generator=generator) for n in (args.n_train, args.n_val, n_syn))
    varied = train[: args.positives] + 0.3 * torch.randn(args.positives, args.dim, generator=generator)

    timings, before = {}, peak_mib()
    start = time.perf_counter()
    report = detect_copies(train, val, syn)
    timings["detect_copies_s"] = time.perf_counter() - start
    after_detect = peak_mib()
    start = time.perf_counter()
    exceedances = held_out_exceedances(train, val, 95.0)
    chance = chance_level(exceedances, n_syn)
    timings["chance_level_s"] = time.perf_counter() - start
    start = time.perf_counter()
    detector = detector_accuracy(varied, train, exceedances)
    timings["detector_check_s"] = time.perf_counter() - start
    mrnet_exceedances = held_out_exceedances(train[:904], val[:226], 95.0)
    mrnet = chance_level(mrnet_exceedances, 904)
    print(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": describe_machine(("torch", "scipy")),
                "sizes": {"n_train": args.n_train, "n_val": args.n_val, "n_syn": n_syn, "dim": args.dim},
                **{key: round(value, 3) for key, value in timings.items()},
                "chance_over_detect": round(timings["chance_level_s"] / timings["detect_copies_s"], 2),
                "peak_rss_growth_detect_mib": round(after_detect - before, 1),
                "peak_rss_growth_chance_mib": round(peak_mib() - after_detect, 1),
                "random_syn_frac_mem": report.frac_mem,
                "random_syn_frac_copies": report.frac_copies,
                "null_frac_mem": chance.null_frac_mem,
                "null_frac_copies": chance.null_frac_copies,
                "detector": detector.as_dict(),
                "mrnet_sizes": {"null_frac_mem": mrnet.null_frac_mem, "method": mrnet.method},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
