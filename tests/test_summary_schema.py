"""The callback and the audit share one pipeline: for the same images and embedder they write the same summary."""

from __future__ import annotations

import json

import numpy as np
import torch

from memwatch.audit import run_audit
from memwatch.callbacks import MemorizationCallback
from memwatch.datamodules import FolderDataModule
from memwatch.memorization.check import MemorizationCheck, Placement
from memwatch.memorization.history import PLACE_KEYS
from tests.doubles import ScriptedGenerator
from tests.helpers import MEMORIZATION_SIZE, quiet_trainer

CALLBACK_ONLY = {"check", "epoch", "step", "check_seconds", "overhead"}  # where a check ran and what it cost
AUDIT_ONLY = {"detectors"}  # every embedder's counts (one embedder here)
CONTEXT = {"inputs", "created"}


def test_the_callbacks_and_the_audits_summary_agree_key_for_key_and_value_for_value(
    embedder_ckpt,
    folders,  # noqa: F811 - the fixture
    tmp_path,
):
    n_samples, block, positives = 12, 4, 8
    data = FolderDataModule(
        folders / "train", folders / "val", spatial_size=MEMORIZATION_SIZE, intensity="none", batch_size=block
    )
    data.setup("fit")
    generator = ScriptedGenerator(copied_ids=data.train_ids[:3], spatial_size=MEMORIZATION_SIZE)
    callback = MemorizationCallback(
        str(embedder_ckpt), n_samples=n_samples, sample_batch_size=block, detector_positives=positives,
        output_dir=str(tmp_path / "checks"), progress_seconds=None,
    )  # fmt: skip
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(generator, datamodule=data)
    # The same samples as files: the callback's check 0 draws them with seed (0, 0).
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    for i, image in enumerate(generator.sample(n_samples, seed=(0, 0)).numpy()):
        np.save(synthetic / f"sample_{i:06d}.npy", image[0])
    run_audit([
        "--embedder", str(embedder_ckpt), "--train", str(folders / "train"), "--val", str(folders / "val"),
        "--synthetic", str(synthetic), "--out", str(tmp_path / "audit"), "--intensity", "none",
        "--sample-batch-size", str(block), "--detector-positives", str(positives), "--seed", "0", "--progress-seconds", "1000",
    ])  # fmt: skip
    checked = json.loads((tmp_path / "checks" / "check_000" / "summary.json").read_text())
    audited = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert set(checked) - CALLBACK_ONLY == set(audited) - AUDIT_ONLY
    shared = set(audited) - AUDIT_ONLY - CONTEXT
    assert {
        "n_mem",
        "n_copies",
        "tau",
        "frac_mem_patients_ci",
        "null_frac_copies",
        "detector",
        "fd",
        "ms_ssim",
    } <= shared
    assert {key: checked[key] for key in shared - {"copy_syn_ids"}} == {
        key: audited[key] for key in shared - {"copy_syn_ids"}
    }
    # The check object called directly, as the watcher will: the same numbers as both front doors.
    check = MemorizationCheck(callback.options, callback.embedder)
    check.build_reference(
        data.reference_dataset("train"), data.reference_dataset("val"), data.train_patients, data.val_patients,
        Placement(torch.device("cpu")),
    )  # fmt: skip
    direct = json.loads(json.dumps(check.run(generator, Placement(torch.device("cpu")), index=0).summary()))
    assert {"n_mem", "tau", "detector", "fd", "ms_ssim"} <= direct.keys() <= set(checked)
    assert {key: direct[key] for key in direct} == {key: checked[key] for key in direct}

    # The samples are named by where they come from (a check's sample, a file), and are the same samples.
    def index(name: str) -> int:
        return int(name.rpartition("sample")[2].lstrip("_"))

    assert [index(n) for n in checked["copy_syn_ids"]] == [index(n) for n in audited["copy_syn_ids"]]
    assert (
        checked["n_copies"] >= 1 and checked["detector"]["n_positive"] == positives
    )  # a real check, not an empty one
    assert CALLBACK_ONLY - {"check_seconds", "overhead"} <= set(PLACE_KEYS)
