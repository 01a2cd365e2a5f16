"""The callback in a user's own training script: their LightningDataModule, their generator, a plain Trainer."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from memwatch.callbacks import MemorizationCallback
from memwatch.callbacks.reference_data import reference_data
from memwatch.errors import InputError
from memwatch.memorization.history import read_history
from tests.helpers import ROOT, USER_SCRIPT


def test_a_plain_training_script_with_its_own_datamodule_counts_the_patients_its_generator_copies(tmp_path):
    (tmp_path / "train.py").write_text(USER_SCRIPT)
    result = subprocess.run(
        [sys.executable, "train.py", str(tmp_path / "logs")], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_history(tmp_path / "logs" / "mine" / "version_0")
    assert (row["n_train"], row["n_train_patients"], row["n_syn"]) == (24, 12, 8)  # two visits per patient
    assert row["n_copies"] == 8  # every sample is a copy
    assert row["n_mem_patients"] >= 4 and row["n_mem"] >= 4  # patients 0-3, by their first visits


class Items(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class Stream(IterableDataset):
    def __iter__(self):
        yield {"image": torch.zeros(1, 8, 8)}


def user_data(train=None, val=None, drop_val: bool = False) -> L.LightningDataModule:
    image = {"image": torch.rand(1, 8, 8)}
    train = train if train is not None else Items([image] * 4)
    val = val if val is not None else Items([image] * 4)

    class UserData(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(train)

    if not drop_val:
        UserData.val_dataloader = lambda self: DataLoader(val)
    return UserData()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: None, "MemorizationCallback needs a LightningDataModule: call trainer.fit(model, datamodule=...)"),
        (lambda: user_data(drop_val=True), "UserData has no val_dataloader(): MemorizationCallback reads the held-out"),
        (lambda: user_data(train=Stream()), "UserData.train_dataloader() must return one DataLoader over a map-style"),
        (lambda: user_data(train=Items([torch.zeros(1, 8, 8)])), "yields Tensor items: MemorizationCallback needs dicts with an 'image'"),
        (lambda: user_data(val=Items([{"image": torch.full((1, 8, 8), 255.0)}])), "spans [255, 255]: scale the images to [0, 1]"),
        (lambda: user_data(val=Items([{"image": torch.zeros(8, 8, dtype=torch.uint8)}])), "is torch.uint8 of shape [8, 8]: give a float"),
    ],
)  # fmt: skip
def test_a_user_datamodule_missing_what_the_callback_needs_is_one_line_naming_it(data, message):
    with pytest.raises(InputError) as raised:
        reference_data(data())
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_the_callback_refuses_a_user_datamodule_without_held_out_images_before_training(tmp_path):
    from tests.doubles import ScriptedGenerator

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        callbacks=[MemorizationCallback(embedder="pixel", detector_positives=0)])  # fmt: skip
    with pytest.raises(InputError, match=r"has no val_dataloader\(\)"):
        trainer.fit(ScriptedGenerator(spatial_size=(8, 8)), datamodule=user_data(drop_val=True))


def test_patients_and_ids_come_from_the_items_or_each_image_is_its_own_patient():
    image = torch.rand(1, 8, 8)
    named = reference_data(
        user_data(train=Items([{"image": image, "patient": "a", "id": f"x{i}"} for i in range(3)]))
    )
    assert named.train_patients == ["a", "a", "a"] and named.train_ids == ["x0", "x1", "x2"]
    assert named.spatial_size == (8, 8)
    anonymous = reference_data(user_data())
    assert anonymous.val_patients == ["val000000", "val000001", "val000002", "val000003"]
    assert set(anonymous.reference_dataset("train")[0]) == {"image"}
