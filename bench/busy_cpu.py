"""The demo's stages on a busy CPU, under each way torch's threads can share it. Prints one JSON object.

    python bench/busy_cpu.py                                       (the measurement: about 30-60 s per stage)
    python bench/busy_cpu.py --ae-steps 3 --simclr-steps 3 --ldm-steps 3 --configurations default threads_1

Each configuration runs the demo's three stages through the CLI (`scripts/launch.fit`), as `make demo`
does: configs/phantom_ae.yaml, phantom_simclr.yaml, then phantom_ldm.yaml on that autoencoder and
embedder, its memorization checks and membership signal as configured, each for the given number of
steps. While a configuration under load runs, `--load-processes` other processes spin a core each (a
Python busy loop, started before its first stage and killed by PID after its last), the stand-in for
another user's job. The configurations:

- `quiet`: torch's defaults, no load (the reference); `quiet_threads_1`, `quiet_passive`: what the two
  remedies below cost when the machine is not busy;
- `default`: torch's defaults (one thread per core, OpenMP threads spin while they wait), under load;
- `threads_1`: OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1, under load;
- `passive`: OMP_WAIT_POLICY=PASSIVE (waiting OpenMP threads sleep at once), under load.

The bench clears those variables from its own environment first, so each configuration sets only its
own. Seconds are each stage's wall time, as a user waits for it (Python's start and imports included);
`ratio_to_default` divides by `default`'s, `ratio_to_quiet` by `quiet`'s, both from this one run. Every
stage also reports what else used the machine (`scripts/machine_load.py`): on a shared machine, other
users' jobs add to the load the bench makes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe_machine  # noqa: E402
from scripts.launch import fit  # noqa: E402

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# GNU OpenMP's own default wait (spin 300 000 times, then sleep), which memwatch's command line would otherwise
# replace by PASSIVE (memwatch/__main__.py): torch's defaults as shipped.
OPENMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CONFIGURATIONS: dict[str, tuple[bool, dict[str, str]]] = {  # name → (under load, environment)
    "quiet": (False, OPENMP_DEFAULT),
    "quiet_threads_1": (False, OPENMP_DEFAULT | ONE_THREAD),
    "quiet_passive": (False, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "default": (True, OPENMP_DEFAULT),
    "threads_1": (True, OPENMP_DEFAULT | ONE_THREAD),
    "passive": (True, {"OMP_WAIT_POLICY": "PASSIVE"}),
}
SPIN = "while True:\n    pass\n"


def run_stages(name: str, environment: dict[str, str], steps: dict[str, int], root: Path) -> dict:
    """The three stages of one configuration into `root/name`; each stage's seconds and the machine's load."""
    stages, checkpoints = {}, {}
    for stage in ("ae", "simclr", "ldm"):
        flags = ["--trainer.max_steps", str(steps[stage])]
        if stage == "ldm":
            flags += [
                "--model.init_args.autoencoder_ckpt", str(checkpoints["ae"]),
                "--memorization.embedder_ckpt", str(checkpoints["simclr"]),
            ]  # fmt: skip
        run = fit(
            f"phantom_{stage}", *flags, save_dir=root / name, name=stage, log=root / name / f"{stage}.log",
            env=environment, check=True,
        )  # fmt: skip
        checkpoints[stage] = run.log_dir / "checkpoints" / "last.ckpt"
        stages[stage] = {
            "seconds": round(run.seconds, 2),
            "steps": steps[stage],
            "load_1min": [round(value, 2) for value in run.load.load],
            "other_cores": round(run.load.other_cores, 2),
            "busiest_others": run.load.busiest[:3],
        }
    return stages


def spinners(count: int) -> list[subprocess.Popen]:
    """`count` processes that each keep one core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ae-steps", type=int, default=600, help="the config's 600: about 35 s on a quiet 2-core CPU")
    parser.add_argument("--simclr-steps", type=int, default=300, help="the config's 300: about 26 s quiet")
    parser.add_argument("--ldm-steps", type=int, default=250, help="about 50 s quiet, checks at steps 1, 100, 200")
    parser.add_argument("--configurations", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--load-processes", type=int, default=1, help="busy-looping processes during a loaded run")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    for name in THREAD_VARIABLES:
        os.environ.pop(name, None)
    steps = {"ae": args.ae_steps, "simclr": args.simclr_steps, "ldm": args.ldm_steps}
    started = datetime.datetime.now(datetime.UTC)
    results = {}
    with tempfile.TemporaryDirectory(prefix="busy_cpu_") as folder:
        for name in args.configurations:
            loaded, environment = CONFIGURATIONS[name]
            load = spinners(args.load_processes) if loaded else []
            try:
                stages = run_stages(name, environment, steps, Path(folder))
            finally:
                stop(load)
            results[name] = {
                "environment": environment, "load_processes": len(load), "stages": stages,
                "seconds": round(sum(stage["seconds"] for stage in stages.values()), 2),
            }  # fmt: skip
    for reference in ("default", "quiet"):
        if reference in results:
            for result in results.values():
                result[f"ratio_to_{reference}"] = {
                    stage: round(result["stages"][stage]["seconds"] / results[reference]["stages"][stage]["seconds"], 3)
                    for stage in steps
                } | {"total": round(result["seconds"] / results[reference]["seconds"], 3)}
    report = {
        "command": " ".join(["python", "bench/busy_cpu.py", *sys.argv[1:]]),
        "started": started.isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "steps": steps,
        "configurations": results,
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
