"""Bad starts through the real CLI: one `error:` line, exit status 2, and no run folder left behind.

Every start runs at once in its own process (each spends most of its time importing), from its own
folder, so a run folder it leaves would be the only thing there besides what the test put in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT

CONFIGS = ROOT / "configs"
QUICK = ["--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class Unpickled:
    """Creates `path` when unpickled: the payload of a malicious checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def bad_checkpoints(autoencoder_ckpt: Path, folder: Path) -> dict[str, Path]:
    data = autoencoder_ckpt.read_bytes()
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    malicious = folder / "malicious.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Unpickled(folder / "unpickled")}, malicious)
    nameless = folder / "nameless.ckpt"  # the autoencoder's weights with no record of their class
    checkpoint = torch.load(autoencoder_ckpt, map_location="cpu", weights_only=True)
    torch.save({key: value for key, value in checkpoint.items() if key not in ("hyper_parameters", "memwatch")}, nameless)
    planted = folder / "planted.ckpt"  # the autoencoder's class name, in a module that runs code when imported
    (folder / "planted_module.py").write_text(f"open({str(folder / 'imported')!r}, 'w').close()\n")
    hyper_parameters = {**checkpoint["hyper_parameters"], "_class_path": "planted_module.AutoencoderModule"}
    torch.save({**checkpoint, "hyper_parameters": hyper_parameters}, planted)
    return {"truncated": truncated, "malicious": malicious, "nameless": nameless, "planted": planted}


def nan_image_folder(root: Path) -> Path:
    """Training and validation `.npy` images at 32×32, one validation image with a NaN pixel: only loading its
    pixels finds it, in the sanity check, after Lightning wrote the run's folder."""
    rng = np.random.default_rng(0)
    for split, patients in (("train", range(4)), ("val", range(4, 6))):
        (root / split).mkdir(parents=True)
        for i in patients:
            np.save(root / split / f"patient_{i}.npy", rng.random((32, 32), dtype=np.float32))
    broken = rng.random((32, 32), dtype=np.float32)
    broken[3, 3] = np.nan
    np.save(root / "val" / "patient_5.npy", broken)
    return root


def looping_image_folder(folder_dataset: Path, root: Path) -> Path:
    """The fixture's training images, one patient per subfolder, with a link back to the folder in one of them."""
    for image in sorted((folder_dataset / "train").glob("*.png")):
        (root / image.stem).mkdir(parents=True)
        (root / image.stem / image.name).symlink_to(image)  # a link to a file is followed
    (root / "patient_00" / "again").symlink_to("..", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def bad_starts(autoencoder_ckpt, folder_dataset, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """name → (the finished `python cli.py ...`, the folder it ran in)."""
    files = tmp_path_factory.mktemp("files")
    checkpoints = bad_checkpoints(autoencoder_ckpt, files)
    folder = [
        "--config", str(CONFIGS / "folder_ae.yaml"), "--data.init_args.spatial_size", "[32, 32]",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--model.init_args.channels", "[8, 8]",
        "--model.init_args.norm_num_groups", "4", "--model.init_args.adv_weight", "0",
    ]  # fmt: skip
    nan_images = nan_image_folder(files / "nan")
    starts = {
        "truncated ckpt_path": ["fit", "--config", str(CONFIGS / "phantom_ae.yaml"), "--ckpt_path", str(checkpoints["truncated"])],
        "malicious ckpt_path": ["fit", "--config", str(CONFIGS / "phantom_ae.yaml"), "--ckpt_path", str(checkpoints["malicious"])],
        "another module's ckpt_path": ["fit", "--config", str(CONFIGS / "phantom_ldm.yaml"), "--ckpt_path", str(autoencoder_ckpt)],
        "ckpt_path naming an untrusted module": ["fit", "--config", str(CONFIGS / "phantom_ae.yaml"), "--ckpt_path", str(checkpoints["planted"])],
        "another model's weights": ["fit", "--config", str(CONFIGS / "phantom_simclr.yaml"), "--ckpt_path", str(checkpoints["nameless"])],
        "missing ckpt_path": ["fit", "--config", str(CONFIGS / "phantom_ae.yaml"), "--ckpt_path", str(files / "gone.ckpt")],
        "unknown option": ["fit", "--config", str(CONFIGS / "phantom_ldm.yaml"), "--memorization.every_n_epoch", "3"],
        "unknown option in another section": ["fit", "--config", str(CONFIGS / "phantom_ae.yaml"), "--max_steps", "3"],
        "unknown audit option": ["audit", "--embeder", "pixel"],
        "missing config": ["fit", "--config", "phantom_aee.yaml"],
        "symlink loop": [
            "fit", *folder, "--data.init_args.train_dir", str(looping_image_folder(folder_dataset, files / "loop")),
            "--data.init_args.val_dir", str(folder_dataset / "val"),
        ],
        "NaN image found after the log folder is written": [
            "fit", *folder, "--data.init_args.train_dir", str(nan_images / "train"),
            "--data.init_args.val_dir", str(nan_images / "val"),
        ],
    }  # fmt: skip
    processes = {}
    for name, args in starts.items():
        cwd = tmp_path_factory.mktemp("cwd")
        if name.startswith("NaN"):  # an earlier run of this config: it stays as it is
            (cwd / "runs/folder_ae/version_0").mkdir(parents=True)
            (cwd / "runs/folder_ae/version_0/keep.txt").write_text("an earlier run")
        command = [sys.executable, str(ROOT / "cli.py"), *args, *(QUICK if args[0] == "fit" else [])]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(files)}  # planted_module importable
        processes[name] = (subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cwd)  # fmt: skip
    try:
        done = {}
        for name, (process, cwd) in processes.items():
            stdout, stderr = process.communicate(timeout=300)
            done[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), cwd)
    finally:
        for process, _ in processes.values():
            process.kill()  # no-op for those that ended; a hung one must not outlive the test
    return done


def one_error_line(bad_starts, name: str) -> str:
    """The start's one `error:` line, after checking that it exited with status 2 and left no file behind."""
    result, cwd = bad_starts[name]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, (name, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, name
    assert len(errors) == 1, (name, result.stderr[-3000:])
    assert list(cwd.iterdir()) == [], (name, sorted(cwd.rglob("*")))  # no runs/, no lightning_logs/
    return errors[0]


def test_a_truncated_ckpt_path_is_one_line_and_leaves_no_run_folder(bad_starts):
    line = one_error_line(bad_starts, "truncated ckpt_path")
    assert "truncated.ckpt is not a readable checkpoint: it is cut short or corrupt" in line


def test_a_malicious_ckpt_path_is_refused_unread_without_suggesting_to_trust_it(bad_starts, tmp_path_factory):
    line = one_error_line(bad_starts, "malicious ckpt_path")
    assert "malicious.ckpt holds a pickled io.open" in line
    assert "weights_only" not in line  # never the advice to unpickle it after all
    assert not list(Path(tmp_path_factory.getbasetemp()).rglob("unpickled"))


def test_another_modules_ckpt_path_is_refused_instead_of_training_that_module(bad_starts):
    line = one_error_line(bad_starts, "another module's ckpt_path")
    assert "is a checkpoint of AutoencoderModule, but this config trains LatentDiffusionModule" in line
    assert line.endswith("a checkpoint that LatentDiffusionModule builds on goes to --model.init_args.autoencoder_ckpt")


def test_a_ckpt_path_recording_a_class_from_an_untrusted_module_is_refused_without_importing_it(bad_starts):
    line = one_error_line(bad_starts, "ckpt_path naming an untrusted module")
    assert "planted.ckpt records the class planted_module.AutoencoderModule" in line
    result, _ = bad_starts["ckpt_path naming an untrusted module"]
    files = Path(next(arg for arg in result.args if arg.endswith("planted.ckpt"))).parent
    assert (files / "planted_module.py").is_file() and not (files / "imported").exists()


def test_weights_of_another_model_without_a_recorded_class_are_refused(bad_starts):
    line = one_error_line(bad_starts, "another model's weights")
    assert "nameless.ckpt holds the weights of another model" in line
    assert "e.g. autoencoder." in line and "pass a checkpoint of SimCLRModule" in line


def test_a_missing_ckpt_path_is_one_line(bad_starts):
    assert "gone.ckpt does not exist" in one_error_line(bad_starts, "missing ckpt_path")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("unknown option", "--memorization.every_n_epoch is not an option of MemorizationCallback: did you mean --memorization.every_n_epochs?"),
        ("unknown option in another section", "--max_steps is not an option of cli.py fit: did you mean --trainer.max_steps?"),
        ("unknown audit option", "--embeder is not an option of python cli.py audit: did you mean --embedder?"),
    ],
)  # fmt: skip
def test_an_unknown_option_names_the_nearest_spelling_in_one_line(bad_starts, name, expected):
    result, _ = bad_starts[name]
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr[-3000:]  # not the 70 lines of usage
    assert one_error_line(bad_starts, name) == f"error: {expected}"


def test_a_missing_config_names_both_places_looked_in(bad_starts):
    line = one_error_line(bad_starts, "missing config")
    assert "--config phantom_aee.yaml does not exist, neither here (" in line
    assert f"nor as {CONFIGS / 'phantom_aee.yaml'}: did you mean phantom_ae.yaml?" in line


def test_a_symlink_loop_in_an_image_folder_names_the_link(bad_starts):
    line = one_error_line(bad_starts, "symlink loop")
    assert "loop/patient_00/again is a symbolic link to " in line and "which contains the link" in line


def test_a_start_that_fails_after_lightning_wrote_its_folder_removes_that_folder_only(bad_starts):
    result, cwd = bad_starts["NaN image found after the log folder is written"]
    assert result.returncode == 2 and "patient_5.npy) has 1 NaN or infinite pixels" in result.stderr, result.stderr[-3000:]
    assert sorted(p.relative_to(cwd).as_posix() for p in cwd.rglob("*")) == [
        "runs", "runs/folder_ae", "runs/folder_ae/version_0", "runs/folder_ae/version_0/keep.txt",
    ]  # fmt: skip
