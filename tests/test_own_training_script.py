"""The callback in a user's own training script: their LightningDataModule, their generator, a plain Trainer."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from memwatch.callbacks import MemorizationCallback
from memwatch.callbacks.reference_data import reference_data
from memwatch.errors import InputError
from memwatch.memorization.history import read_history
from tests.conftest import ROOT

USER_SCRIPT = textwrap.dedent('''
    """A researcher's own script: nothing of memwatch but the callback."""
    import sys

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, Dataset

    from memwatch.callbacks import MemorizationCallback

    SIZE = 24


    def scan(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        blobs = torch.rand(1, 6, 6, generator=g)
        return torch.nn.functional.interpolate(blobs[None], size=(SIZE, SIZE), mode="bilinear")[0].clamp(0, 1)


    class Scans(Dataset):
        def __init__(self, first: int, n_patients: int) -> None:
            self.items = [
                {"image": scan(1000 + p * 10 + visit), "patient": f"p{p:03d}", "id": f"p{p:03d}-v{visit}"}
                for p in range(first, first + n_patients) for visit in range(2)
            ]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, index):
            return self.items[index]


    class MyData(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(Scans(0, 12), batch_size=8, shuffle=True)

        def val_dataloader(self):
            return DataLoader(Scans(100, 12), batch_size=8)


    class MyGenerator(L.LightningModule):
        """Copies the first visits of patients 0-3 (with a little noise): a model that memorized 4 patients."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.weight - batch["image"].mean()) ** 2

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", (self.weight - batch["image"].mean()) ** 2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def sample(self, n, seed=0, num_inference_steps=50, sample_batch_size=16, start_index=0):
            images = []
            for i in range(start_index, start_index + n):
                noise = torch.Generator().manual_seed(i)
                image = scan(1000 + (i % 4) * 10) + 0.01 * torch.randn(1, SIZE, SIZE, generator=noise)
                images.append(image.clamp(0, 1))
            return torch.stack(images)


    if __name__ == "__main__":
        callback = MemorizationCallback(embedder="pixel", n_samples=8, sample_batch_size=4, detector_positives=0)
        trainer = L.Trainer(
            accelerator="cpu", max_epochs=1, logger=L.pytorch.loggers.CSVLogger(sys.argv[1], name="mine"),
            callbacks=[callback], enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(MyGenerator(), datamodule=MyData())
''')


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
