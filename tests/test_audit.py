"""`python cli.py audit`: planted copies are found and withheld, LDM samples are audited, bad input is one line."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import shutil
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

import memwatch.audit.command as command
from memwatch.cli import main
from memwatch.datamodules.phantom import render_phantom
from memwatch.lightning_modules import LatentDiffusionModule
from memwatch.memorization.detect import DEFAULT_MARGIN, DEFAULT_RULE
from memwatch.memorization.release import ReleasedFile, write_manifest
from memwatch.memorization.report import REPORT_FILES
from memwatch.memorization.variation import vary
from tests.helpers import (
    AUDIT_N_NOVEL,
    AUDIT_N_PLANTED,
    MEMORIZATION_SIZE,
    N_TRAIN,
    ROOT,
    audit_args,
    chance_ceiling,
    memorization_phantoms,
    quiet_trainer,
    run_cli,
    save_npy,
    tiny_autoencoder,
    write_dicom,
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_audit_finds_planted_copies_and_releases_only_the_rest(embedder_ckpt, folders, tmp_path):
    out, release = tmp_path / "report", tmp_path / "shareable"
    summary = main(audit_args(embedder_ckpt, folders, out, "--release-dir", str(release)))
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    written = json.loads((out / "summary.json").read_text())
    assert written["n_copies"] == summary["n_copies"] and written["n_train"] == 32 and written["n_syn"] == 24
    flagged = set(written["copy_syn_ids"])
    planted = {f"copy_{k:02d}" for k in range(AUDIT_N_PLANTED)}
    assert len(flagged & planted) >= AUDIT_N_PLANTED - 1, flagged
    # Novel patients pass τ about 5% of the time, and other training patients are near-copied at that rate
    # (by the novel images and the copies): bounded by what chance reaches, never by an exact count.
    assert len(flagged - planted) <= chance_ceiling(AUDIT_N_NOVEL, N_TRAIN), flagged
    unplanted_ceiling = chance_ceiling(N_TRAIN - AUDIT_N_PLANTED, AUDIT_N_PLANTED + AUDIT_N_NOVEL)
    assert AUDIT_N_PLANTED - 1 <= written["n_mem"] <= AUDIT_N_PLANTED + unplanted_ceiling, written["n_mem"]
    pairs = read_csv(out / "pairs.csv")
    assert len(pairs) == 24 and {row["synthetic_id"] for row in pairs if row["is_copy"] == "True"} == flagged
    # the default rule, named; ρ2 is computed (and written) under the distinct rule only
    assert written["rule"] == DEFAULT_RULE and written["margin"] == (DEFAULT_MARGIN if DEFAULT_RULE == "distinct" else None)
    assert all((row["other_patient_correlation"] == "") == (DEFAULT_RULE == "paper") for row in pairs)
    assert all(row["nearest_train_id"] in set(memorization_phantoms().train_ids) for row in pairs)
    copy_00 = next(row for row in pairs if row["synthetic_id"] == "copy_00")
    assert copy_00["nearest_train_id"] == memorization_phantoms().train_ids[0]
    train_nn = read_csv(out / "train_nn.csv")
    assert len(train_nn) == 32 and sum(row["memorized"] == "True" for row in train_nn) == written["n_mem"]
    released = {p.stem for p in release.iterdir() if p.name != "manifest.json"}
    assert released == {row["synthetic_id"] for row in pairs} - flagged
    assert written["release"]["n_released"] == len(released)
    manifest = json.loads((release / "manifest.json").read_text())
    correlations = {row["synthetic_id"]: float(row["correlation"]) for row in pairs}
    assert {Path(entry["path"]).stem for entry in manifest["files"]} == released
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256((release / entry["path"]).read_bytes()).hexdigest()
        assert entry["nearest_train_correlation"] == pytest.approx(correlations[Path(entry["path"]).stem], abs=1e-5)
        assert entry["margin_below_tau"] == pytest.approx(written["tau"] - entry["nearest_train_correlation"], abs=1e-5)
        assert entry["margin_below_tau"] > 0
    assert manifest["n_withheld"] == len(flagged) and manifest["tau"] == written["tau"] and manifest["percentile"] == 95.0
    assert manifest["checkpoints"]["embedder embedder.ckpt"]["sha256"] == hashlib.sha256(Path(embedder_ckpt).read_bytes()).hexdigest()
    assert manifest["memwatch"]["version"] and manifest["created"]
    assert manifest["summary"]["n_copies"] == written["n_copies"]
    # a release leaves the hospital: no training patient's id in it
    assert not set(memorization_phantoms().train_ids) & set(json.dumps(manifest).replace('"', " ").split())
    assert written["fd"] > 0 and 0 < written["ms_ssim"] < 1
    assert not list(tmp_path.glob(".*partial*"))
    # one image per patient here: the per-patient numbers equal the per-image ones
    assert written["n_mem_patients"] == written["n_mem"] and written["n_train_patients"] == 32
    assert written["memorized_patient_ids"] == sorted(written["memorized_train_ids"])
    assert all(row["patient_id"] == row["train_id"] for row in train_nn)
    assert all(row["nearest_train_patient_id"] == row["nearest_train_id"] for row in pairs)
    for key in ("frac_mem", "frac_copies", "frac_mem_patients"):
        low, high = written[f"{key}_ci"]
        assert low <= written[key] <= high and high - low > 0
        assert written[f"excess_{key}"] == pytest.approx(written[key] - written[f"null_{key}"])
    # the share of the 32 held-out images flagged: a chance count as well
    held_out_ceiling = chance_ceiling(N_TRAIN, N_TRAIN) / N_TRAIN
    assert 0 <= written["null_frac_copies"] <= held_out_ceiling and "Clopper-Pearson" in written["ci_method"]
    detector = written["detector"]
    assert detector["n_positive"] == 32 and detector["n_negative"] == written["n_val"]
    assert detector["specificity"] == pytest.approx(1 - written["null_frac_copies"])
    assert detector["sensitivity_ci"][0] <= detector["sensitivity"] <= detector["sensitivity_ci"][1]


def test_audit_of_patient_folders_counts_each_patient_once(embedder_ckpt, folders, tmp_path):
    """Two training images per patient (a subfolder each), both copied: 2 images memorized, 1 patient."""
    train = tmp_path / "train"
    data = memorization_phantoms()
    for image_id in data.train_ids:
        image = render_phantom(image_id, MEMORIZATION_SIZE)[0]
        save_npy(train / image_id / "a.npy", image)
        save_npy(train / image_id / "b.npy", np.clip(image + 0.01, 0, 1))
    synthetic = tmp_path / "synthetic"
    originals = torch.stack([torch.from_numpy(render_phantom(i, MEMORIZATION_SIZE)) for i in data.train_ids[:2]])
    for k, image in enumerate(vary(originals, seed=1)):
        save_npy(synthetic / f"copy_{k}.npy", image[0])
    for name in sorted(p.name for p in (folders / "synthetic").iterdir() if p.name.startswith("novel"))[:6]:
        save_npy(synthetic / name, np.load(folders / "synthetic" / name))
    # The distinct rule: a copy is near both images of its patient, and is still a copy of that one patient. The
    # tiny test embedder puts other phantoms close: the copies reach d1 = 0.4 d2 and 0.54 d2 there.
    args = audit_args(
        embedder_ckpt, folders, tmp_path / "out", "--detector-positives", "8", "--rule", "distinct", "--margin", "0.65"
    )
    args[args.index("--train") + 1], args[args.index("--synthetic") + 1] = str(train), str(synthetic)
    written = main(args)
    assert written["n_train"] == 64 and written["n_train_patients"] == 32 and written["detector"]["n_positive"] == 8
    assert written["rule"] == "distinct" and written["margin"] == 0.65
    memorized = set(written["memorized_patient_ids"])
    assert set(data.train_ids[:2]) <= memorized
    assert written["n_mem_patients"] == len(memorized) < written["n_mem"]
    pairs = {row["synthetic_id"]: row for row in read_csv(tmp_path / "out" / "pairs.csv")}
    for k in range(2):
        copy = pairs[f"copy_{k}"]
        assert copy["is_copy"] == "True" and copy["nearest_train_patient_id"] == data.train_ids[k]
        assert float(copy["other_patient_correlation"]) < float(copy["correlation"])
    assert all(-1.0 <= float(row["other_patient_correlation"]) <= float(row["correlation"]) for row in pairs.values())
    assert "Copy rule distinct" in (tmp_path / "out" / "report.html").read_text()
    train_nn = read_csv(tmp_path / "out" / "train_nn.csv")
    assert {row["patient_id"] for row in train_nn} == set(data.train_ids)
    assert all(row["train_id"].startswith(row["patient_id"]) for row in train_nn)


def test_audit_samples_an_ldm_over_a_config_datamodule(embedder_ckpt, tmp_path):
    L.seed_everything(0)
    data = memorization_phantoms(batch_size=8)
    autoencoder = tiny_autoencoder()
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(autoencoder, data)
    ae_path = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(ae_path)
    ldm = LatentDiffusionModule(str(ae_path), channels=(16, 16), norm_num_groups=8, num_head_channels=8)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(ldm, data)
    ldm_path = tmp_path / "ldm.ckpt"
    trainer.save_checkpoint(ldm_path)

    out = tmp_path / "report"
    summary = main([
        "audit", "--embedder", str(embedder_ckpt), "--data", "configs/phantom_ldm.yaml",
        "--data-arg", "n_patients=64", "--data-arg", "val_fraction=0.5", "--ldm", str(ldm_path),
        "--n-samples", "5", "--seed", "3", "--num-inference-steps", "2", "--sample-batch-size", "4", "--out", str(out),
    ])  # fmt: skip
    assert summary["n_syn"] == 5 and summary["n_train"] == 32
    files = sorted((out / "samples").glob("*.npy"))
    assert [f.name for f in files] == [f"sample_{i:06d}.npy" for i in range(5)]
    expected = ldm.eval().sample(5, seed=3, num_inference_steps=2)
    for file, image in zip(files, expected, strict=True):
        np.testing.assert_allclose(np.load(file), image[0].numpy(), atol=1e-5)
    assert len(read_csv(out / "pairs.csv")) == 5


# --- bad input ---------------------------------------------------------------------------


def make_bad_synthetic(folder: Path, case: str) -> Path:
    synthetic = folder / "synthetic"
    synthetic.mkdir(parents=True)
    image = render_phantom("novel-0001", MEMORIZATION_SIZE)[0]
    if case == "empty":
        return synthetic
    save_npy(synthetic / "a.npy", image)
    if case == "corrupt":
        (synthetic / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif case == "mixed sizes":
        save_npy(synthetic / "b.npy", render_phantom("novel-0002", (64, 64))[0])
    elif case == "wrong size":
        (synthetic / "a.npy").unlink()
        save_npy(synthetic / "b.npy", render_phantom("novel-0002", (64, 64))[0])
    elif case == "3D":
        (synthetic / "a.npy").unlink()
        save_npy(synthetic / "b.npy", np.zeros((32, 32, 8)))
    elif case == "outside [0, 1]":
        save_npy(synthetic / "b.npy", image * 4.0)
    elif case == "NaN":
        image = image.copy()
        image[3, 4] = np.nan
        save_npy(synthetic / "b.npy", image)
    return synthetic


BAD_SYNTHETIC = {
    "empty": "holds no images",
    "corrupt": "b.png cannot be read as png",
    "mixed sizes": "b.npy is [64, 64]",
    "wrong size": "the synthetic images are [64, 64] (e.g.",
    "3D": "b.npy has shape (32, 32, 8)",
    "NaN": "has 1 NaN or infinite pixels",
    "outside [0, 1]": "not [0, 1], and intensity is none: set --intensity minmax",
}


@pytest.mark.parametrize("case", BAD_SYNTHETIC)
def test_bad_synthetic_folder_is_one_line_and_leaves_no_output(case, embedder_ckpt, folders, tmp_path, capsys):
    synthetic = make_bad_synthetic(tmp_path, case)
    out = tmp_path / "report"
    args = audit_args(embedder_ckpt, folders, out)
    args[args.index("--synthetic") + 1] = str(synthetic)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and BAD_SYNTHETIC[case] in error, error
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_bad_arguments_are_one_line_and_an_existing_report_is_kept(embedder_ckpt, folders, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    without_synthetic = [a for a in audit_args(embedder_ckpt, folders, tmp_path / "o") if "synthetic" not in a]
    swapped = audit_args(embedder_ckpt, folders, tmp_path / "o")
    swapped[swapped.index("--train") + 1], swapped[swapped.index("--val") + 1] = str(folders / "val"), str(folders / "train")
    cases = {
        "exists": (audit_args(embedder_ckpt, folders, out), "already holds files"),
        "missing embedder": (audit_args(tmp_path / "none.ckpt", folders, tmp_path / "o"), "none.ckpt does not exist"),
        "no synthetic": (without_synthetic, "--synthetic DIR, or --generator CKPT"),
        "percentile": ([*audit_args(embedder_ckpt, folders, tmp_path / "o"), "--percentile", "100"], "--percentile=100.0 is outside the open interval (0, 100)"),
        "rule": ([*audit_args(embedder_ckpt, folders, tmp_path / "o"), "--rule", "strict"],
                 "--rule 'strict' is not one of paper, distinct"),
        "margin": ([*audit_args(embedder_ckpt, folders, tmp_path / "o"), "--rule", "distinct", "--margin", "2"],
                   "--margin 2.0 must lie in (0, 1]"),
        "synthetic and ldm": ([*audit_args(embedder_ckpt, folders, tmp_path / "o"), "--ldm", "x.ckpt"], "not both"),
        "ldm is an embedder": ([*without_synthetic, "--ldm", str(embedder_ckpt)], "SimCLRModule"),
        "embedder trained on the held-out patients": (swapped, "patient(s) held out here"),
        "percentile above the held-out images": (
            [*audit_args(embedder_ckpt, folders, tmp_path / "o"), "--percentile", "99"], "lower the percentile to at most",
        ),
    }  # fmt: skip
    for name, (args, message) in cases.items():
        with pytest.raises(SystemExit) as stop:
            main(args)
        error = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and error.startswith("error: ") and message in error, (name, error)
    assert (out / "summary.json").read_text() == "{}"
    assert not (tmp_path / "o").exists()


def test_the_real_command_exits_2_without_a_traceback(embedder_ckpt, folders, tmp_path):
    synthetic = make_bad_synthetic(tmp_path, "mixed sizes")
    args = audit_args(embedder_ckpt, folders, tmp_path / "out")
    args[args.index("--synthetic") + 1] = str(synthetic)
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().startswith("error: ")


# --- output folders ------------------------------------------------------------------


def pixel_audit_args(folders: Path, out: Path, *extra: str) -> list[str]:
    """`audit_args` with the pixel embedder: no checkpoint to train, seconds to run."""
    return audit_args("pixel", folders, out, "--spatial-size", "32", "32", "--detector-positives", "4", *extra)


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (hidden ones included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error.removeprefix("error: ")


OVERLAPS = {  # --out (in TMP), more options, the error
    "--release-dir inside --out": ("R", ["--release-dir", "TMP/R/shareable"], "--out=TMP/R holds --release-dir=TMP/R/shareable"),
    "--release-dir is --out": ("R", ["--release-dir", "TMP/R"], "--out=TMP/R is the same folder as --release-dir=TMP/R"),
    "--out is --train, with --overwrite": ("train", ["--overwrite"], "--out=TMP/train is the same folder as --train=TMP/train"),
    "--out inside --train": ("train/report", [], "--out=TMP/train/report lies inside --train=TMP/train"),
    "--out holds the embedder, with --overwrite": (
        "models", ["--overwrite"], "--out=TMP/models holds --embedder=TMP/models/embedder.ckpt",
    ),
    "--out is a file": ("models/embedder.ckpt", [], "--out=TMP/models/embedder.ckpt is a file, not a folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", OVERLAPS)
def test_output_folders_over_an_input_or_each_other_are_one_line_and_nothing_is_written(case, embedder_ckpt, folders, tmp_path, capsys):
    """Each used to run the whole audit and then replace a folder: the report, the training images, the checkpoint."""
    shutil.copytree(folders / "train", tmp_path / "train")
    (tmp_path / "models").mkdir()
    shutil.copy(embedder_ckpt, tmp_path / "models" / "embedder.ckpt")
    out, options, message = OVERLAPS[case]
    options = [option.replace("TMP", str(tmp_path)) for option in options]
    args = audit_args(tmp_path / "models" / "embedder.ckpt", folders, tmp_path / out, "--detector-positives", "4", *options)
    args[args.index("--train") + 1] = str(tmp_path / "train")
    before = files_under(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert one_error_line(capsys).startswith(message.replace("TMP", str(tmp_path)))
    assert files_under(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["models", "train"]


def test_out_as_the_current_folder_is_refused_before_any_input_is_read(folders, tmp_path):
    """`--out .` ran the whole audit, then failed to replace the folder it ran in and left a hidden folder of
    patient images behind."""
    shutil.copytree(folders / "train", tmp_path / "train")
    args = audit_args(tmp_path / "missing.ckpt", folders, Path("."))
    args[args.index("--train") + 1] = "train"
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    # the missing embedder is not reached: the output folder is checked first
    assert result.stderr.strip().splitlines() == [
        "error: --out=. is the folder this runs in, which writing --out would replace: give --out a new folder of "
        "its own, e.g. --out=report"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def can_create_in(folder: Path) -> bool:
    """Whether this process can create a folder in `folder` (root can, whatever its mode says)."""
    try:
        (folder / "probe").mkdir()
    except PermissionError:
        return False
    (folder / "probe").rmdir()
    return True


def test_an_output_folder_that_cannot_be_made_is_one_line(folders, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases = {
        "--out under a file": (pixel_audit_args(folders, tmp_path / "a_file" / "report"),
                               f"--out={tmp_path}/a_file/report is not writable ({tmp_path}/a_file is a file, not a folder)"),
        "--release-dir under a file": (
            pixel_audit_args(folders, tmp_path / "out", "--release-dir", str(tmp_path / "a_file" / "shareable")),
            f"--release-dir={tmp_path}/a_file/shareable is not writable ({tmp_path}/a_file is a file, not a folder)",
        ),
        "--out under a read-only folder": (
            # a missing embedder ends the run at once where the folder turns out writable (root)
            audit_args(tmp_path / "missing.ckpt", folders, locked / "new" / "report"),
            f"--out={locked}/new/report is not writable (Permission denied in {locked})",
        ),
    }  # fmt: skip
    try:
        for name, (args, message) in cases.items():
            with pytest.raises(SystemExit) as stop:
                main(args)
            error = one_error_line(capsys)
            if name == "--out under a read-only folder" and can_create_in(locked):
                continue  # root writes whatever the mode: nothing here to refuse
            assert stop.value.code == 2 and error.startswith(message), (name, error)
    finally:
        locked.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "locked"] and list(locked.iterdir()) == []


def old_outputs(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """A report and a release from an earlier audit, to be replaced with --overwrite."""
    for name, file in (("report", "summary.json"), ("shareable", "manifest.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text('{"old": true}')
    return {name: files_under(tmp_path / name) for name in ("report", "shareable")}


def test_a_full_disk_while_writing_keeps_the_old_report_and_leaves_nothing_hidden(folders, tmp_path, capsys, monkeypatch):
    old = old_outputs(tmp_path)
    real_write_report = command.write_report

    def disk_full_half_way(folder, *args, **kwargs):
        real_write_report(folder, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "copies.png"))

    monkeypatch.setattr(command, "write_report", disk_full_half_way)
    args = pixel_audit_args(folders, tmp_path / "report", "--release-dir", str(tmp_path / "shareable"), "--overwrite")
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    error = one_error_line(capsys)
    assert error.startswith(f"writing --out={tmp_path}/report and --release-dir={tmp_path}/shareable failed (No space left on device"), error
    assert {name: files_under(tmp_path / name) for name in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "shareable"]


INTERRUPTED_AUDIT = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import memwatch.audit.command as command
real_write_report = command.write_report

def interrupted(folder, *args, **kwargs):  # the signal comes once the report's files, patient images included, are written
    written = real_write_report(folder, *args, **kwargs)
    os.kill(os.getpid(), signal.{signal})
    for _ in range(100):
        time.sleep(0.1)
    return written

command.write_report = interrupted
from memwatch.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_while_writing_keeps_the_old_report_and_leaves_nothing_hidden(signal_name, folders, tmp_path):
    """SIGTERM (a cluster's time limit) used to kill the audit on the spot, leaving a hidden folder of its
    report and patient images beside --out."""
    old = old_outputs(tmp_path)
    entry = tmp_path.parent / f"{tmp_path.name}_interrupted_audit.py"
    entry.write_text(INTERRUPTED_AUDIT.format(root=str(ROOT), signal=signal_name))
    args = pixel_audit_args(folders, tmp_path / "report", "--release-dir", str(tmp_path / "shareable"), "--overwrite")
    result = run_cli(*args[1:], entry=[str(entry), "audit"])
    expected_status = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": -signal.SIGINT}[signal_name]
    assert result.returncode == expected_status, result.stderr[-3000:]
    assert {name: files_under(tmp_path / name) for name in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "shareable"]


def test_verify_release_reports_every_file_added_removed_or_changed(tmp_path):
    release = tmp_path / "shareable"
    (release / "sub").mkdir(parents=True)
    for name in ("a.npy", "b.npy", "sub/c.npy"):
        save_npy(release / name, np.full((4, 4), len(name), dtype=np.float32))
    checkpoint = tmp_path / "embedder.ckpt"
    checkpoint.write_bytes(b"weights")
    files = [ReleasedFile(name, {"last.ckpt": 0.5}) for name in ("a.npy", "b.npy", "sub/c.npy")]
    write_manifest(release, files, taus={"last.ckpt": 0.9}, percentile=95.0, n_withheld=1, checkpoints={"embedder": str(checkpoint)}, summary={})
    verified = run_cli("audit", "--verify-release", str(release))
    assert verified.returncode == 0 and "verified: the 3 files" in verified.stdout, verified.stderr
    save_npy(release / "a.npy", np.zeros((4, 4)))  # changed
    (release / "sub" / "c.npy").unlink()  # missing
    save_npy(release / "extra.npy", np.zeros((2, 2)))  # added
    tampered = run_cli("audit", "--verify_release", str(release))
    assert tampered.returncode == 1
    lines = tampered.stderr.strip().splitlines()
    assert {"changed: a.npy", "missing: sub/c.npy", "added: extra.npy"} <= set(lines), lines
    assert lines[-1].startswith("error: ") and "1 changed, 1 added, 1 missing" in lines[-1]
    assert "b.npy" not in tampered.stderr


def test_verify_release_without_a_manifest_is_one_line(tmp_path):
    (tmp_path / "plain").mkdir()
    result = run_cli("audit", "--verify-release", str(tmp_path / "plain"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'plain' / 'manifest.json'} does not exist: --verify-release needs a folder written by "
        "cli.py audit --release-dir"
    ]


def test_audit_options_come_from_a_config_file_and_print_config_shows_them(embedder_ckpt, folders, tmp_path, capsys):
    config = tmp_path / "audit.yaml"
    config.write_text(
        f"embedder: [{embedder_ckpt}]\ntrain: {folders / 'train'}\nval: {folders / 'val'}\n"
        f"synthetic: {folders / 'synthetic'}\nout: {tmp_path / 'out'}\nintensity: none\npercentile: 90.0\n"
        "detector_positives: 4\ndata_arg: []\n"
    )
    with pytest.raises(SystemExit) as stop:
        main(["audit", "--config", str(config), "--sample-batch-size", "8", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert stop.value.code == 0
    assert printed["percentile"] == 90.0 and printed["sample_batch_size"] == 8 and printed["embedder"] == [str(embedder_ckpt)]
    summary = main(["audit", "--config", str(config)])
    assert summary["percentile"] == 90.0 and summary["detector"]["n_positive"] == 4


def test_audit_reads_dicom_folders_with_patients_from_their_patientid_tags(embedder_ckpt, folders, tmp_path):
    """Training and held-out patients as DX radiographs, one folder each named unlike the patient."""
    data = memorization_phantoms()
    for split, ids in [("train", data.train_ids), ("val", data.val_ids)]:
        for k, patient in enumerate(ids):
            pixels = np.round(render_phantom(patient, MEMORIZATION_SIZE)[0] * 1000).astype(np.uint16)
            write_dicom(tmp_path / split / f"case_{k:03d}" / "IM0001", pixels, patient=patient, modality="DX",
                        position=None, slope=0.001)  # fmt: skip
    out = tmp_path / "out"
    summary = main([
        "audit", "--embedder", str(embedder_ckpt), "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
        "--synthetic", str(folders / "synthetic"), "--out", str(out), "--detector-positives", "0",
    ])  # fmt: skip
    planted = {f"copy_{k:02d}" for k in range(AUDIT_N_PLANTED)}
    assert len(set(summary["copy_syn_ids"]) & planted) >= AUDIT_N_PLANTED - 1, summary["copy_syn_ids"]
    train_nn = read_csv(out / "train_nn.csv")
    assert {row["patient_id"] for row in train_nn} == set(data.train_ids)
    assert all(row["train_id"].startswith("case_") for row in train_nn)
    # named by their PatientID tags: the planted patients, and others only as often as chance has them pass τ
    memorized = set(summary["memorized_patient_ids"])
    assert memorized <= set(data.train_ids), memorized
    unplanted = memorized - set(data.train_ids[:AUDIT_N_PLANTED])
    assert len(unplanted) <= chance_ceiling(N_TRAIN - AUDIT_N_PLANTED, AUDIT_N_PLANTED + AUDIT_N_NOVEL), memorized
