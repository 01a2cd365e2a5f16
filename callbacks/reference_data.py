"""What the MemorizationCallback needs of the data, from memwatch's DataModules or any LightningDataModule.

The callback embeds every training and held-out image once per fit, unaugmented and in a fixed
order, and counts per patient. memwatch's `MedicalImageDataModule`s provide all of it
(`ReferenceData`). Any other `LightningDataModule` works as it is when:

- `train_dataloader()` and `val_dataloader()` return one `DataLoader` each over a map-style
  dataset (`len` and indexing); the held-out images are the validation set;
- each item is a dict with `"image"`, a float tensor `[C, *spatial]` in `[0, 1]` (the batches the
  model trains on are then `{"image": [B, C, *spatial]}`), and optionally `"patient"` (the
  patient's id; several images may share one) and `"id"` (the image's name in reports).

Items without `"patient"` are each their own patient. Reading the ids costs one pass over the
items at fit start; a DataModule can spare it by defining `train_patients`, `val_patients` (and
`train_ids`) lists in dataset order, or all of `ReferenceData` itself (also the way to embed
unaugmented images when the training dataset augments them).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import Dataset, IterableDataset

from memwatch.errors import InputError

IMAGE_KEY, PATIENT_KEY, ID_KEY = "image", "patient", "id"
Split = Literal["train", "val"]
LOADERS = {"train": "train_dataloader", "val": "val_dataloader"}


@runtime_checkable
class ReferenceData(Protocol):
    """The data a check needs; `MedicalImageDataModule` implements it."""

    spatial_size: tuple[int, ...]
    num_workers: int

    @property
    def train_ids(self) -> list[str]: ...  # name of each training image, in dataset order

    @property
    def train_patients(self) -> list[str]: ...  # patient of each training image, in dataset order

    @property
    def val_patients(self) -> list[str]: ...  # patient of each held-out image, in dataset order

    def reference_dataset(self, split: Split) -> Dataset: ...  # items {"image": [C, *spatial] in [0, 1]}


def reference_data(datamodule: LightningDataModule | None) -> ReferenceData:
    """`datamodule` itself when it implements `ReferenceData`, else its loaders' datasets read as the module
    docstring says; one `InputError` naming what to add when neither works."""
    if datamodule is None:
        raise InputError(
            "MemorizationCallback needs a LightningDataModule: call trainer.fit(model, datamodule=...) with one "
            "whose train_dataloader() and val_dataloader() yield {'image': [B, C, *spatial]} batches in [0, 1]"
        )
    if isinstance(datamodule, ReferenceData):
        return datamodule
    # The check and the membership signal share one pass over the items' patients while the loaders' datasets
    # stay the same objects.
    data, previous = LoaderData(datamodule), getattr(datamodule, "_memwatch_reference_data", None)
    if isinstance(previous, LoaderData) and all(previous.datasets[s] is data.datasets[s] for s in LOADERS):
        return previous
    datamodule._memwatch_reference_data = data
    return data


class ImageItems(Dataset):
    """A user's dataset reduced to `{"image"}` items, so that batching never meets other keys."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {IMAGE_KEY: torch.as_tensor(self.dataset[index][IMAGE_KEY]).float()}


class LoaderData:
    """`ReferenceData` of a user's `LightningDataModule`, from the datasets behind its two loaders."""

    def __init__(self, datamodule: LightningDataModule) -> None:
        self.name = type(datamodule).__name__
        self.datamodule = datamodule
        self.datasets = {split: self._dataset(split) for split in LOADERS}
        first = self.datasets["train"][0][IMAGE_KEY]
        self.spatial_size = tuple(int(s) for s in torch.as_tensor(first).shape[1:])
        self.num_workers = 0
        self._labels: dict[str, tuple[list[str], list[str]]] = {}

    def _dataset(self, split: Split) -> Dataset:
        method = LOADERS[split]
        role = "training images" if split == "train" else "held-out images (patients not in training)"
        try:
            loader = getattr(self.datamodule, method)()
        except (NotImplementedError, MisconfigurationException):  # Lightning's error for a loader not defined
            loader = None
        dataset = getattr(loader, "dataset", None)
        if loader is None:
            raise InputError(
                f"{self.name} has no {method}(): MemorizationCallback reads the {role} from it; add {method}() "
                "returning a DataLoader of {'image': [C, *spatial]} items in [0, 1]"
            )
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise InputError(
                f"{self.name}.{method}() must return one DataLoader over a map-style dataset (len and indexing): "
                "MemorizationCallback reads every image once in a fixed order; or define "
                "reference_dataset(split) on the DataModule (memwatch.callbacks.reference_data.ReferenceData)"
            )
        if len(dataset) == 0:
            raise InputError(f"{self.name}.{method}() has no images: MemorizationCallback needs the {role}")
        self._check_item(dataset[0], method)
        return dataset

    def _check_item(self, item: Any, method: str) -> None:
        where = f"{self.name}.{method}()'s dataset"
        if not isinstance(item, dict) or IMAGE_KEY not in item:
            raise InputError(
                f"{where} yields {type(item).__name__} items: MemorizationCallback needs dicts with an "
                f"'{IMAGE_KEY}' tensor [C, *spatial] in [0, 1] (and optionally '{PATIENT_KEY}' and '{ID_KEY}')"
            )
        image = torch.as_tensor(item[IMAGE_KEY])
        if image.ndim not in (3, 4) or not image.is_floating_point():
            raise InputError(
                f"{where}: item['{IMAGE_KEY}'] is {image.dtype} of shape {list(image.shape)}: give a float "
                "tensor [C, H, W] or [C, H, W, D] in [0, 1]"
            )
        if not bool(torch.isfinite(image).all()) or float(image.min()) < 0.0 or float(image.max()) > 1.0:
            raise InputError(
                f"{where}: item['{IMAGE_KEY}'] spans [{float(image.min()):g}, {float(image.max()):g}]: scale the "
                "images to [0, 1] in the dataset (the generator's samples are compared in [0, 1])"
            )

    def reference_dataset(self, split: Split) -> Dataset:
        return ImageItems(self.datasets[split])

    def _ids_and_patients(self, split: Split) -> tuple[list[str], list[str]]:
        if split not in self._labels:
            dataset = self.datasets[split]
            first = dataset[0]
            ids = [f"{split}{i:06d}" for i in range(len(dataset))]
            patients = list(ids)
            if PATIENT_KEY in first or ID_KEY in first:
                for i in range(len(dataset)):  # one item at a time: the images are not kept
                    item = dataset[i]
                    ids[i] = str(item.get(ID_KEY, ids[i]))
                    patients[i] = str(item.get(PATIENT_KEY, ids[i]))
            self._labels[split] = (ids, patients)
        return self._labels[split]

    def _given_or_read(self, attribute: str, split: Split, which: int) -> list[str]:
        given = getattr(self.datamodule, attribute, None)
        return [str(p) for p in given] if given is not None else self._ids_and_patients(split)[which]

    @property
    def train_ids(self) -> list[str]:
        return self._given_or_read("train_ids", "train", 0)

    @property
    def train_patients(self) -> list[str]:
        return self._given_or_read("train_patients", "train", 1)

    @property
    def val_patients(self) -> list[str]:
        return self._given_or_read("val_patients", "val", 1)
