"""The audit of a generator checkpoint reports its membership signal: in summary.json, report.html and on the
terminal; a generator without `membership_scores` is skipped with its reason; a bad `--membership-n-ref` is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from memwatch.audit.printing import membership_line
from memwatch.cli import main
from memwatch.datamodules import PhantomDataModule
from memwatch.lightning_modules import LatentDiffusionModule
from memwatch.memorization.membership import AUC_METHOD
from tests.doubles import ScriptedGenerator
from tests.helpers import parse, quiet_trainer, write_page

SIZE = (16, 16)  # the size autoencoder_ckpt was trained on
N_PATIENTS, VAL_FRACTION = 40, 0.5  # 20 training and 20 held-out images, one per patient
DATA_ARGS = (
    "--data", "configs/phantom_ldm.yaml", "--data-arg", f"spatial_size=[{SIZE[0]}, {SIZE[1]}]",
    "--data-arg", f"n_patients={N_PATIENTS}", "--data-arg", f"val_fraction={VAL_FRACTION}",
)  # fmt: skip
TRUST_DOUBLES = ("--trust-module", "tests.doubles")  # scripted_ckpt's class: the audit imports it when trusted


def phantoms() -> PhantomDataModule:
    """The data that `DATA_ARGS` gives the audit, for training the generators on."""
    return PhantomDataModule(
        spatial_size=SIZE, n_patients=N_PATIENTS, val_fraction=VAL_FRACTION, batch_size=8
    )


def audit(generator: Path, out: Path, *extra: str) -> dict:
    return main([
        "audit", "--embedder", "pixel", "--spatial-size", *map(str, SIZE), *DATA_ARGS, "--generator", str(generator),
        "--n-samples", "4", "--num-inference-steps", "1", "--sample-batch-size", "8", "--detector-positives", "0",
        "--out", str(out), *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def ldm_ckpt(autoencoder_ckpt, tmp_path_factory) -> Path:
    """A tiny LDM on `autoencoder_ckpt`, trained 2 steps on the audit's training patients."""
    L.seed_everything(0)
    ldm = LatentDiffusionModule(
        str(autoencoder_ckpt), channels=(16, 16), norm_num_groups=8, num_head_channels=8
    )
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(ldm, phantoms())
    path = tmp_path_factory.mktemp("ldm") / "ldm.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def scripted_ckpt(tmp_path_factory) -> Path:
    """A `ScriptedGenerator` (no `membership_scores`) as `cli.py fit` saves it: its class in the hyper-parameters."""
    generator = ScriptedGenerator(copied_ids=["phantom-0000"], spatial_size=SIZE)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(generator, phantoms())
    path = tmp_path_factory.mktemp("scripted") / "scripted.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "tests.doubles.ScriptedGenerator"
    torch.save(checkpoint, path)
    return path


def test_the_audit_of_a_generator_reports_its_membership_signal(ldm_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the terminal table's width: its rows unwrapped
    summary = audit(ldm_ckpt, tmp_path / "out")
    membership = json.loads((tmp_path / "out" / "summary.json").read_text())["membership"]
    assert membership == summary["membership"]
    assert math.isfinite(membership["auc"]) and 0.0 <= membership["auc"] <= 1.0
    low, high = membership["auc_ci"]
    assert 0.0 <= low <= membership["auc"] <= high <= 1.0
    low, high = membership["auc_control_ci"]
    assert low <= membership["auc_control"] <= high
    assert membership["n_held_out"] == summary["n_val"] == N_PATIENTS * VAL_FRACTION
    assert membership["n_train"] == summary["n_train"] and membership["method"] == AUC_METHOD
    assert isinstance(membership["above_control"], bool)
    text = "".join(parse((tmp_path / "out" / "report.html").read_text(encoding="utf-8")).text)
    assert "Membership signal" in text and f"AUC {membership['auc']:.3f}, 95% CI" in text
    assert f"Scored: {membership['n_train']} training and {membership['n_held_out']} held-out images." in text
    assert "control" in text and "denoising loss" in text
    assert (
        f"membership signal (training vs held-out AUC) │ {membership_line(membership)}"
        in capsys.readouterr().out
    )


def test_membership_n_ref_scores_that_many_held_out_images_and_is_recorded(ldm_ckpt, tmp_path):
    summary = audit(ldm_ckpt, tmp_path / "out", "--membership-n-ref", "12")
    assert summary["membership"]["n_held_out"] == 12 and summary["membership"]["n_train"] == 12
    assert summary["inputs"]["membership_n_ref"] == 12


def test_a_generator_without_membership_scores_is_skipped_and_the_audit_succeeds(
    scripted_ckpt, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "400")  # the terminal table's width: its rows unwrapped
    summary = audit(scripted_ckpt, tmp_path / "out", *TRUST_DOUBLES)
    reason = json.loads((tmp_path / "out" / "summary.json").read_text())["membership"]["skipped"]
    assert reason.startswith("ScriptedGenerator has no membership_scores") and "\n" not in reason
    assert summary["n_syn"] == 4 and "n_mem" in summary  # the copies were still counted
    assert f"Not measured: {reason}" in "".join(parse((tmp_path / "out" / "report.html").read_text()).text)
    assert "skipped: ScriptedGenerator has no membership_scores" in capsys.readouterr().out


def test_too_few_held_out_images_are_skipped_with_the_count(scripted_ckpt, tmp_path, monkeypatch):
    class Scoring(ScriptedGenerator):
        def membership_scores(self, images, ids):
            return torch.zeros(len(images))

    monkeypatch.setattr("memwatch.audit.command.MIN_HELD_OUT", N_PATIENTS)  # more than the 20 held-out images
    monkeypatch.setattr("tests.doubles.ScriptedGenerator", Scoring)
    summary = audit(scripted_ckpt, tmp_path / "out", *TRUST_DOUBLES)
    assert summary["membership"] == {
        "skipped": f"The data holds 20 held-out images, fewer than the {N_PATIENTS} a membership interval needs."
    }


def test_the_audit_of_a_folder_of_synthetic_images_has_no_membership_section(scripted_ckpt, tmp_path):
    audit(scripted_ckpt, tmp_path / "sampled", *TRUST_DOUBLES)  # its samples, as a folder
    summary = main([
        "audit", "--embedder", "pixel", "--spatial-size", *map(str, SIZE), *DATA_ARGS, "--detector-positives", "0",
        "--synthetic", str(tmp_path / "sampled" / "samples"), "--intensity", "none", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert "membership" not in summary and "membership" not in json.loads(
        (tmp_path / "out" / "summary.json").read_text()
    )
    assert "Membership signal" not in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--membership-n-ref", "5"), "--membership-n-ref 5 needs --generator and must be at least 10"),
        (("--membership-n-ref", "0"), "--membership-n-ref 0 needs --generator and must be at least 10"),
    ],
)
def test_too_small_a_membership_n_ref_is_one_error_line(extra, message, ldm_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        audit(ldm_ckpt, tmp_path / "out", *extra)
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and error.startswith("error: ") and "\n" not in error and message in error, (
        error
    )
    assert not (tmp_path / "out").exists()


def test_membership_n_ref_without_a_generator_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([
            "audit", "--embedder", "pixel", "--spatial-size", "16", "16", *DATA_ARGS, "--synthetic", str(tmp_path),
            "--membership-n-ref", "12", "--out", str(tmp_path / "out"),
        ])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert (
        stop.value.code == 2 and "\n" not in error and "--membership-n-ref 12 needs --generator" in error
    ), error


# --- the page and the terminal line, from a summary -----------------------------------------------

SIGNAL = {
    "auc": 0.912, "auc_ci": [0.85, 0.97], "tpr_at_5fpr": 0.4, "n_train": 30, "n_held_out": 30,
    "auc_control": 0.503, "auc_control_ci": [0.36, 0.65], "above_control": True, "method": AUC_METHOD,
}  # fmt: skip
NO_SIGNAL = {**SIGNAL, "auc": 0.6, "auc_ci": [0.45, 0.75], "above_control": False}


def membership_page(folder: Path, membership: dict) -> str:
    page, _ = write_page(folder, with_images=False, summary_edit=lambda s: {**s, "membership": membership})
    return "".join(parse(page).text)


def test_the_page_says_above_control_only_when_the_intervals_separate(tmp_path):
    above = membership_page(tmp_path / "above", SIGNAL)
    assert (
        "Above control: training images score higher than held-out images (AUC 0.912, 95% CI 0.850–0.970)"
        in above
    )
    assert "the control's (AUC 0.503, 95% CI 0.360–0.650)" in above
    assert f"AUC 0.912, 95% CI 0.850–0.970 (method: {AUC_METHOD})." in above
    assert "(true-positive rate at 5% false positives): 40.0%." in above
    assert "Scored: 30 training and 30 held-out images." in above
    below = membership_page(tmp_path / "below", NO_SIGNAL)
    assert "Not above control: training images do not score detectably higher" in below
    assert "Above control" not in below
    # Its place: after the verdict, before the copy evidence.
    assert above.index("Verdict") < above.index("Membership signal") < above.index("How close")


def test_the_page_without_a_control_compares_with_one_half(tmp_path):
    page = membership_page(tmp_path, {**SIGNAL, "auc_control": None, "auc_control_ci": None})
    assert "Above 0.5:" in page and "there is no control" in page and "Above control" not in page
    assert "Control, two halves of the training images against each other: not measured" in page


def test_the_skip_reason_is_escaped(tmp_path):
    page, _ = write_page(
        tmp_path, with_images=False, summary_edit=lambda s: {**s, "membership": {"skipped": "<b>x</b>"}}
    )
    assert "<b>x</b>" not in page and "Not measured: &lt;b&gt;x&lt;/b&gt;" in page


def test_the_terminal_line_says_above_control_only_when_it_is():
    assert membership_line(SIGNAL) == "0.912 (95% CI 0.850–0.970), control 0.503 (0.360–0.650): above control"
    assert membership_line(NO_SIGNAL).endswith(": not above its control")
    assert membership_line({"skipped": "why."}) == "skipped: why."
