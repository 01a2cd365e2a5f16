"""The command line: `memwatch ARGS`, `python -m memwatch ARGS` and, in a clone, `python cli.py ARGS`.

OpenMP's waiting threads sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`) unless the environment sets
`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` (`GOMP_SPINCOUNT=300000` is GNU OpenMP's own default, torch's as shipped): on a CPU another job shares, spinning threads fight it for the cores. bench/busy_cpu.py measured the
demo's stages with one competing process at 0.63 of the default's time (and 1.17 of it on a quiet machine);
BENCHMARKS.md. OpenMP reads the variable once, when torch loads, so it is set before memwatch.cli imports torch.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def run() -> None:
    from memwatch.cli import main

    main()


if __name__ == "__main__":
    run()
