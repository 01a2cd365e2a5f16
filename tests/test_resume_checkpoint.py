"""A run resumed into its own folder keeps `last.ckpt` the newest model, whichever way the folder is spelled;
the audit names the checkpoint it sampled (path, sha256, global step, epoch) in summary.json, report.html, on
the terminal and in the release's manifest, refuses a `last.ckpt` that a newer `last-vN.ckpt` has overtaken,
and `--verify-release` fails once the audited checkpoint has changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from memwatch.cli import main
from memwatch.memorization.release import describe_checkpoint
from tests.helpers import ROOT, parse

FIRST_STEPS, RESUMED_STEPS = 2, 4
CHECKPOINTS = "runs/phantom_ldm/v0/checkpoints"  # relative to the run's working folder
# A tiny LDM on the 16×16 autoencoder of conftest, 6 training and 6 held-out phantom patients.
DATA = {"spatial_size": "[16, 16]", "n_patients": "12", "val_fraction": "0.5"}


def fit(cwd: Path, autoencoder_ckpt: Path, save_dir: str, steps: int, *extra: str) -> None:
    """`python cli.py fit` of the tiny LDM from the folder `cwd` (where a relative `save_dir` lies)."""
    with contextlib.chdir(cwd):
        main([
            "fit", "--config", str(ROOT / "configs" / "phantom_ldm.yaml"),
            "--model.init_args.autoencoder_ckpt", str(autoencoder_ckpt), "--model.init_args.channels", "[16, 16]",
            "--model.init_args.norm_num_groups", "8", "--model.init_args.num_head_channels", "8",
            *(f"--data.init_args.{key}={value}" for key, value in DATA.items()), "--data.init_args.batch_size", "4",
            "--memorization", "null", "--membership", "null", "--early_stopping", "null", "--trainer.callbacks", "[]",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1", "--checkpoint.every_n_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", save_dir, "--trainer.logger.init_args.version", "v0", *extra,
        ])  # fmt: skip


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]


@pytest.fixture(scope="module")
def resumed_run(autoencoder_ckpt, tmp_path_factory) -> Path:
    """The checkpoints folder of a run fitted with its folder spelled relative (`runs`), then resumed into the
    same folder spelled absolute, with more steps."""
    cwd = tmp_path_factory.mktemp("resume")
    fit(cwd, autoencoder_ckpt, "runs", FIRST_STEPS)
    checkpoints = cwd / CHECKPOINTS
    assert global_step(checkpoints / "last.ckpt") == FIRST_STEPS
    fit(cwd, autoencoder_ckpt, str(cwd / "runs"), RESUMED_STEPS, "--ckpt_path", f"{CHECKPOINTS}/last.ckpt")
    return checkpoints


def audit(generator: Path, out: Path, *extra: str) -> dict:
    return main([
        "audit", "--embedder", "pixel", "--spatial-size", "16", "16", "--data", str(ROOT / "configs/phantom_ldm.yaml"),
        *(f"--data-arg={key}={value}" for key, value in DATA.items()), "--generator", str(generator),
        "--n-samples", "4", "--num-inference-steps", "1", "--sample-batch-size", "8", "--detector-positives", "0",
        "--percentile", "50", "--out", str(out), *extra,
    ])  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_resumed_under_another_spelling_of_its_folder_keeps_last_ckpt_the_newest(resumed_run):
    assert global_step(resumed_run / "last.ckpt") == RESUMED_STEPS
    assert sorted(p.name for p in resumed_run.glob("last*.ckpt")) == ["last.ckpt"]


def test_the_audit_names_the_checkpoint_it_sampled_by_step_epoch_and_sha256(resumed_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the terminal table's rows unwrapped
    last = resumed_run / "last.ckpt"
    audit(last, tmp_path / "out")
    generator = json.loads((tmp_path / "out" / "summary.json").read_text())["generator"]
    assert generator == {"path": str(last), "sha256": sha256(last), "global_step": RESUMED_STEPS, "epoch": epoch(last)}
    line = describe_checkpoint(generator)
    assert line == f"{last} (global step {RESUMED_STEPS}, epoch {epoch(last)}, sha256 {generator['sha256']})"
    page = parse((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    assert f"Model audited: {line}" in "".join(page.text)
    assert f"model audited: {line}" in capsys.readouterr().out.splitlines()


def test_a_last_ckpt_with_a_newer_last_v1_beside_it_is_refused_in_one_line(resumed_run, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(resumed_run / "last.ckpt", checkpoints / "last.ckpt")
    newer = torch.load(resumed_run / "last.ckpt", map_location="cpu", weights_only=True)
    newer["global_step"] = RESUMED_STEPS + 600  # what Lightning's version counter left after a resume
    torch.save(newer, checkpoints / "last-v1.ckpt")
    with pytest.raises(SystemExit) as exited:
        audit(checkpoints / "last.ckpt", tmp_path / "out")
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --generator={checkpoints / 'last.ckpt'} is at global step {RESUMED_STEPS}, but "
        f"{checkpoints / 'last-v1.ckpt'} beside it is at step {RESUMED_STEPS + 600} (a resumed run wrote its newer "
        f"model there): audit that one with --generator {checkpoints / 'last-v1.ckpt'}, or move the older last.ckpt "
        f"out of {checkpoints}"
    ]
    assert not (tmp_path / "out").exists()
    audit(checkpoints / "last-v1.ckpt", tmp_path / "out")  # the newest is audited
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["generator"]["global_step"] == RESUMED_STEPS + 600


def test_the_manifest_records_the_generator_checkpoint_and_verify_release_fails_once_it_changes(
    resumed_run, tmp_path, capsys
):
    checkpoint = tmp_path / "last.ckpt"  # a copy: this test changes it
    shutil.copy(resumed_run / "last.ckpt", checkpoint)
    release = tmp_path / "shareable"
    audit(checkpoint, tmp_path / "out", "--release-dir", str(release))
    recorded = json.loads((release / "manifest.json").read_text())["checkpoints"]["generator"]
    assert recorded["sha256"] == sha256(checkpoint) and recorded["path"] == str(checkpoint)
    assert recorded["global_step"] == RESUMED_STEPS
    capsys.readouterr()
    assert main(["audit", "--verify-release", str(release)])["verified"]
    assert "unchanged checkpoints: generator" in capsys.readouterr().out

    with checkpoint.open("ab") as handle:
        handle.write(b"retrained")
    with pytest.raises(SystemExit) as exited:
        main(["audit", "--verify-release", str(release)])
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: the generator checkpoint {checkpoint} has changed since the audit (its sha256 is not the one in "
        f"manifest.json: audit the model it holds now before sharing its samples): do not share {release} as audited"
    ]

    checkpoint.unlink()  # gone: nothing to compare, the released files still verify
    assert main(["audit", "--verify-release", str(release)])["verified"]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"notice: the generator checkpoint {checkpoint} is no longer there: not compared with the sha256 "
        "manifest.json records for it"
    ]
