"""What a fit prints into a log file (stdout not a terminal): progress lines, none of Lightning's tips or uncounted
FLOPs, no warning about the phantom configs' own check cadence, and one notice when samples outnumber the held-out
images."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memwatch.callbacks.console import ProgressLines
from memwatch.cli import main
from memwatch.errors import InputError
from memwatch.memorization.chance import extrapolation_notice
from tests.helpers import ROOT, run_cli

PROGRESS_LINE = re.compile(r"^epoch \d+, step (\d+)/3 \(\d+%\), train/loss [\d.e+-]+, [\d.]+ it/s, .* elapsed", re.M)
NOTICE = "samples outnumber the 64 held-out images, so the chance level is extrapolated"


@pytest.fixture(scope="module")
def demo_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The demo's autoencoder and embedder after 2 steps each, on the phantom configs' split (16 / 64 patients)."""
    root = tmp_path_factory.mktemp("runs")
    trained = {}
    for stage in ("ae", "simclr"):
        cli = main([
            "fit", "--config", str(ROOT / "configs" / f"phantom_{stage}.yaml"), "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(root),
        ])  # fmt: skip
        trained[stage] = Path(cli.trainer.checkpoint_callback.last_model_path)
    return trained


def fit_ldm(checkpoints: dict[str, Path], save_dir: Path, *extra: str):
    """`cli.py fit --config configs/phantom_ldm.yaml` for 3 steps, its output captured (not a terminal), with
    Python's warnings shown."""
    return run_cli(
        "fit", "--config", "configs/phantom_ldm.yaml", "--trainer.max_steps", "3",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--model.init_args.autoencoder_ckpt", str(checkpoints["ae"]),
        "--memorization.embedder_ckpt", str(checkpoints["simclr"]), "--memorization.num_inference_steps", "2",
        *extra, env={"PYTHONWARNINGS": "default"}, threads=1,
    )  # fmt: skip


def test_a_fit_logged_to_a_file_prints_progress_lines_and_nothing_of_lightnings_tips(demo_checkpoints, tmp_path):
    run = fit_ldm(demo_checkpoints, tmp_path, "--progress_seconds", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert [int(step) for step in PROGRESS_LINE.findall(run.stdout)] == [1, 2, 3], run.stdout
    assert "Trainable params" in output  # the model summary is printed, without FLOPs nobody counted
    assert "FLOPs" not in output and "Flops" not in output, output
    assert "litlogger" not in output and "Tip:" not in output, output
    assert "smaller than the logging interval" not in output, output
    # The check at start (epoch 0) follows one step of training: its cost is no sign of a cadence too dense.
    assert "memorization check 0 took" not in output, output
    assert "max_overhead" not in output, output
    assert NOTICE not in output  # 16 samples, 64 held-out images


def test_samples_outnumbering_the_held_out_images_get_one_notice_at_start_up(demo_checkpoints, tmp_path):
    run = fit_ldm(
        demo_checkpoints, tmp_path, "--memorization.n_samples", "65", "--memorization.check_at_start", "false",
        "--trainer.max_steps", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    notices = [line for line in (run.stdout + run.stderr).splitlines() if NOTICE in line]
    assert notices == [
        "memorization: 65 samples outnumber the 64 held-out images, so the chance level is extrapolated "
        "(beta-binomial) and its interval understates how much it varies; for a chance level to rely on, hold "
        "out at least 65 images or compare at most 64 samples (--memorization.n_samples 64)"
    ], notices


def test_no_notice_while_the_held_out_images_suffice_and_no_negative_progress_interval():
    assert extrapolation_notice(64, 64, "--n-samples 64") is None
    assert "65 samples outnumber the 64" in extrapolation_notice(65, 64, "--n-samples 64")
    with pytest.raises(InputError, match="--progress_seconds=-1 must be at least 0"):
        ProgressLines(-1)


@pytest.mark.parametrize(
    ("given", "expected"),
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"GOMP_SPINCOUNT": "300000"}, "unset")],
)
def test_the_command_line_lets_waiting_openmp_threads_sleep_unless_the_environment_says_otherwise(given, expected):
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | given
    code = (
        "import memwatch.__main__, os, sys; assert 'torch' not in sys.modules; "
        "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == expected
