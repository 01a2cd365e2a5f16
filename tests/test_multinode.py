"""Several machines: torchrun with 2 "nodes" × 1 process on localhost (gloo) counts copies as 1 process does.

Also keeps the launch scripts in `examples/` from rotting: they parse as bash, and the sbatch
script's `cli.py` arguments parse as a memwatch configuration.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, memorization_history, scripted_config

EXAMPLES = ROOT / "examples"
SBATCH = EXAMPLES / "slurm" / "memwatch_ldm.sbatch"
TIMEOUT = 600  # generous: the machine is shared; quiet, the three runs take about 40 s together
LAUNCHER_VARIABLES = (
    "MASTER_",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_",
    "GROUP_",
    "NODE_RANK",
    "TORCHELASTIC_",
    "SLURM_",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], log: Path) -> subprocess.Popen:
    """`command` in its own session (so its whole process group can be killed), output to `log`.

    Launcher variables of the calling shell (a SLURM job, an outer torchrun) are left out: each
    run sees only what its own launcher sets.
    """
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
    env = {**inherited, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with log.open("w") as handle:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_all(processes: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    """Wait for every process to succeed; fail as soon as one fails (the others are killed by the caller)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        codes = {name: process.poll() for name, process in processes.items()}
        for name, code in codes.items():
            assert code in (None, 0), f"{name} exited with {code}:\n{logs[name].read_text()[-3000:]}"
        if all(code == 0 for code in codes.values()):
            return
        running = [name for name, code in codes.items() if code is None]
        assert time.monotonic() < deadline, f"{running} still running after {TIMEOUT} s:\n" + "\n".join(
            f"--- {name}\n{logs[name].read_text()[-1500:]}" for name in running
        )
        time.sleep(0.5)


def history(save_dir: Path) -> list[dict[str, str]]:
    (run_dir,) = save_dir.glob("scripted/version_*")
    return memorization_history(run_dir)


def test_two_torchrun_nodes_count_the_same_copies_as_one_process(embedder_ckpt, tmp_path):
    config = scripted_config(tmp_path, embedder_ckpt, copy_from_epoch=0, max_epochs=2, early_stop=False)
    port = free_port()

    def fit(save_dir: Path, *extra: str) -> list[str]:
        return [str(ROOT / "cli.py"), "fit", "--config", str(config),
                "--trainer.logger.init_args.save_dir", str(save_dir), *extra]  # fmt: skip

    def node(rank: int) -> list[str]:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
        return torchrun + fit(tmp_path / "nodes", "--trainer.num_nodes", "2", "--trainer.devices", "1",
                              "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")  # fmt: skip

    logs = {name: tmp_path / f"{name}.log" for name in ("node0", "node1", "single")}
    processes = {}
    try:
        processes["node0"] = launch(node(0), logs["node0"])
        processes["node1"] = launch(node(1), logs["node1"])
        processes["single"] = launch([sys.executable, *fit(tmp_path / "single")], logs["single"])
        wait_all(processes, logs)
    finally:
        for process in processes.values():
            if process.poll() is None:  # torchrun's agent and its worker share the process group
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    # Lightning's TorchElasticEnvironment really joined the two nodes into one gloo group of 2
    node0, node1 = logs["node0"].read_text(), logs["node1"].read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in node0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in node1, node0[-2000:]
    assert "distributed_backend=gloo" in node0 and "Starting with 2 processes" in node0, node0[-2000:]
    assert "MEMBER" not in logs["single"].read_text()

    single, nodes = history(tmp_path / "single"), history(tmp_path / "nodes")
    keys = ("check", "epoch", "n_mem", "n_copies", "tau")
    assert len(single) >= 1
    assert [[r[k] for k in keys] for r in nodes] == [[r[k] for k in keys] for r in single]
    assert all(int(r["n_mem"]) > 0 for r in single), single  # the comparison counts real copies


# --- the launch scripts in examples/ -----------------------------------------------------


SCRIPTS = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".sh", ".sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(EXAMPLES)) for p in SCRIPTS])
def test_example_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_sbatch_scripts_cli_arguments_parse(tmp_path):
    """Run the sbatch script with a stand-in `srun` that appends `--print_config` to the command it launches."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    srun = fake_bin / "srun"
    srun.write_text('#!/bin/bash\n# stand-in srun: drop srun options, print the configuration\n'
                    'while [[ "$1" == -* ]]; do shift; done\nexec "$@" --print_config\n')  # fmt: skip
    srun.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONWARNINGS": "ignore",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    result = subprocess.run(
        ["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout[result.stdout.index("# lightning.pytorch==") :])
    trainer = printed["trainer"]
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["strategy"]) == (2, "4", "ddp")
    assert trainer["accelerator"] == "gpu"
    assert printed["model"]["class_path"] == "memwatch.lightning_modules.LatentDiffusionModule"
