"""Output folders: the callback's `output_dir` refused at start-up where writing it could touch the data or the
folder it runs in, and a swap of folders that fails half-way puts the old ones back."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from memwatch.callbacks import MemorizationCallback
from memwatch.datamodules import FolderDataModule
from memwatch.memorization.output_folders import staged_outputs
from tests.doubles import ScriptedGenerator
from tests.helpers import input_error, quiet_trainer


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["the training folder", "inside the training folder", "the current folder"])
def test_the_callbacks_output_dir_over_the_data_or_the_current_folder_is_refused_at_start_up(
    where, folder_dataset, tmp_path, monkeypatch
):
    train = folder_dataset / "train"
    before = files_under(folder_dataset)
    monkeypatch.chdir(tmp_path)
    output_dir = {"the training folder": train, "inside the training folder": train / "reports", "the current folder": "."}[where]
    callback = MemorizationCallback(embedder="pixel", output_dir=str(output_dir), num_inference_steps=1, percentile=50.0)
    data = FolderDataModule(str(train), str(folder_dataset / "val"), [32, 32], batch_size=2)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback])
    error = str(input_error(lambda: trainer.fit(ScriptedGenerator(), data)))
    expected = {
        "the training folder": f"output_dir={train} is the same folder as --data.init_args.train_dir={train}",
        "inside the training folder": f"output_dir={train / 'reports'} lies inside --data.init_args.train_dir={train}",
        "the current folder": "output_dir=. is the folder this runs in",
    }[where]
    assert error.startswith(expected), error
    assert callback.history == [] and trainer.global_step == 0  # refused before the first step
    assert files_under(folder_dataset) == before and list(tmp_path.iterdir()) == []


def test_a_swap_that_fails_half_way_puts_every_old_folder_back(tmp_path, monkeypatch):
    """`--out` moves into place, then `--release-dir`'s move is interrupted: both old folders come back."""
    old = {}
    for name in ("report", "shareable"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "old.txt").write_text(f"old {name}")
        old[name] = files_under(tmp_path / name)
    rename = Path.rename

    def interrupted(self, target):
        if self.name.startswith(".shareable.partial-"):
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    folders = {"--out": tmp_path / "report", "--release-dir": tmp_path / "shareable"}
    with pytest.raises(KeyboardInterrupt), staged_outputs(folders, overwrite=True) as stagings:
        for option, staging in stagings.items():
            (staging / "new.txt").write_text(f"new {option}")
    assert {name: files_under(tmp_path / name) for name in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "shareable"]  # no hidden folder left


def test_a_written_folder_has_the_mode_the_umask_gives(tmp_path):
    """A release is read by others: the staging folder must not keep a private temporary folder's 0700."""
    umask = os.umask(0o022)
    try:
        with staged_outputs({"--release-dir": tmp_path / "shareable"}) as stagings:
            (stagings["--release-dir"] / "a.npy").write_bytes(b"")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "shareable").stat().st_mode) == 0o755
