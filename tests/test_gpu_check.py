"""bench/gpu_check.py --smoke: every section of the GPU check runs, tiny, on a CPU, so it does not rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("mrnet", "chestxray", "nifti", "dicom")


def problems(value, path: str = "") -> list[str]:
    """Every `error` or `skipped` entry anywhere in the JSON, with where it is."""
    if isinstance(value, dict):
        found = [f"{path}/{key}: {value[key]}" for key in ("error", "skipped") if key in value]
        return found + [p for key, item in value.items() for p in problems(item, f"{path}/{key}")]
    if isinstance(value, list):
        return [p for k, item in enumerate(value) for p in problems(item, f"{path}/{k}")]
    return []


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_run_measures_every_section_without_errors(tmp_path):
    """About 50 s on a 2-core CPU. One thread: beside another busy process, two spinning OpenMP threads
    made the same run take over 5 minutes."""
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert json.loads(completed.stdout) == figures  # stdout holds the one JSON object, nothing else
    assert problems(figures) == []
    assert set(figures) >= {"settings", "stages", "sampling", "check_ratio", "invariance", "flip_memory"}
    assert figures["settings"]["smoke"] and figures["machine"]["cpu_count"] >= 1

    # dicom's configs train the same networks at the same sizes as nifti's: measured once, and said so.
    assert figures["stages"]["dicom"]["same_as"] == "nifti" == figures["sampling"]["dicom"]["same_as"]
    for dataset in ("mrnet", "chestxray", "nifti"):
        for stage in ("autoencoder", "embedder", "ldm"):
            result = figures["stages"][dataset][stage]
            assert positive(result["median_step_seconds"]) and result["finite"] is True, (dataset, stage)

        sampling = figures["sampling"][dataset]
        assert sampling["settings"] and sampling["best"] is not None
        for setting in [*sampling["settings"], sampling["graphs"]]:
            assert setting["finite"] is True
            for key in ("seconds_per_sample", "unet_seconds_per_sample", "decode_seconds_per_sample"):
                assert positive(setting[key]), (dataset, setting)
        three_d = len(sampling["spatial_size"]) == 3
        decode_sizes = {(s["sample_batch_size"], s["decode_batch_size"]) for s in sampling["settings"]}
        assert decode_sizes == ({(1, 1), (2, 2), (2, 1)} if three_d else {(1, 1), (2, 2)})

    ratios = figures["check_ratio"]
    assert ratios["assumptions"]
    for dataset in DATASETS:
        for settings in ("config", "best"):
            estimate = ratios[dataset][settings]
            for key in ("sample_seconds_per_sample", "embed_seconds_per_sample", "check_seconds", "ratio"):
                assert positive(estimate[key]), (dataset, settings, key)
        assert positive(ratios[dataset]["training_seconds_between_checks"])
    assert ratios["mrnet"]["n_train"] == 904 and ratios["dicom"]["n_train"] == 240

    invariance = figures["invariance"]
    assert invariance["blocks_alone_equal_runs"] == {"1": True, "2": True, "3": True}
    assert [len(shares) for shares in invariance["shares"].values()] == [1, 2, 3]
    assert invariance["graphs"]["equal_eager"] is True and invariance["graphs"]["max_abs_difference"] == 0.0
    assert math.isfinite(invariance["batch_size_difference"]["max_abs_difference"])
    assert invariance["finite"] is True

    flips = figures["flip_memory"]
    for variant in ("plain", "flip_invariant"):
        assert positive(flips[variant]["seconds"]) and flips[variant]["finite"] is True
