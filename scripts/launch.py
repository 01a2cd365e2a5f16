"""`python cli.py ...` in a subprocess, as a user runs it: the one way scripts/, bench/ and tests/ launch a run.

A run reports its wall time and what else used the machine meanwhile (`scripts/machine_load.py`), so
that a slow stage on a shared machine can be told from a slow stage; `fit` also names the run's log
folder (its checkpoints, `config.yaml` and `memorization_history.csv`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from scripts.machine_load import LoadMonitor, MachineLoad

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "cli.py"
TAIL_LINES = 15  # of a failed run's output, in the error that stops the caller


@dataclass(frozen=True)
class CliRun:
    """One finished `python cli.py ARGS`.

    `seconds` is its wall time, `load` the machine meanwhile; `stdout`/`stderr` hold its output where it
    was captured (else they are empty); `log_dir` is the run's log folder where the launcher set it (`fit`).
    """

    args: tuple[str, ...]
    returncode: int
    seconds: float
    load: MachineLoad
    stdout: str = ""
    stderr: str = ""
    log_dir: Path | None = None

    @property
    def command(self) -> str:
        """The command as a user types it: `python cli.py ARGS`, quoted for a shell."""
        return shlex.join(["python", "cli.py", *self.args])


def run_cli(
    *args: str,
    log: Path | None = None,
    show: bool = False,
    check: bool = False,
    env: Mapping[str, str] | None = None,
    threads: int | None = None,
    cwd: Path = ROOT,
    timeout: float | None = None,
    entry: Sequence[str] = (),
) -> CliRun:
    """Run `python cli.py ARGS` from `cwd` (the repository root by default) and wait for it to end.

    Its output goes into the file `log` (stdout and stderr together), to this terminal with `show`, or
    else into `CliRun.stdout`/`.stderr`. `env` is added to this process's environment; `threads` sets
    OMP_NUM_THREADS and MKL_NUM_THREADS (each process's threads where several share the cores). With
    `check`, a run that fails stops the caller with one message: the command, its exit status and the
    end of its output. `entry` replaces `cli.py` with a script that takes the same arguments (the
    instrumented worker of bench/callback_overhead.py). A `timeout` (seconds) past raises
    `subprocess.TimeoutExpired`, as `subprocess.run` does.
    """
    environment = {**os.environ, **(env or {})}
    if threads is not None:
        environment |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, *(entry or [str(CLI)]), *args]
    monitor = LoadMonitor()
    started = time.perf_counter()
    try:
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as handle:
                done = subprocess.run(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=environment,
                                      timeout=timeout)  # fmt: skip
        else:
            done = subprocess.run(
                command, cwd=cwd, capture_output=not show, text=True, env=environment, timeout=timeout
            )
    finally:
        seconds = time.perf_counter() - started
        load = monitor.stop()
    run = CliRun(tuple(args), done.returncode, seconds, load, done.stdout or "", done.stderr or "")
    if check and run.returncode != 0:
        raise SystemExit(_failure(run, log, show))
    return run


def fit(config: str, *flags: str, save_dir: Path, name: str, version: str = "", **options) -> CliRun:
    """`python cli.py fit --config configs/CONFIG.yaml FLAGS`, logging into `save_dir/name/version`.

    The launcher sets the TensorBoard logger's folder rather than leaving it to the config, so it knows
    the run's log folder: `CliRun.log_dir` (an empty `version` logs into `save_dir/name` itself). Runs
    from the repository root; `options` are `run_cli`'s.
    """
    args = [
        "fit", "--config", f"configs/{config}.yaml", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", version, *flags,
    ]  # fmt: skip
    return replace(run_cli(*args, **options), log_dir=Path(save_dir) / name / version)


def _failure(run: CliRun, log: Path | None, show: bool) -> str:
    """The one message of a failed run: what ran, how it ended, and the end of what it printed."""
    message = f"error: {run.command} failed (exit {run.returncode}) after {run.seconds:.0f} s"
    if show:
        return message + " (its output is above)"
    output, where = (
        (log.read_text(), str(log)) if log is not None else (run.stderr or run.stdout, "its output")
    )
    tail = "\n".join(output.strip().splitlines()[-TAIL_LINES:])
    return f"{message}; end of {where}:\n{tail}"
