"""The base every dataset's LightningDataModule inherits: split, subset, augmentation, loaders.

A subclass says which images exist (`list_records`) and how one becomes a tensor
(`load_transforms`); this class does everything else the same way for every dataset:

- a deterministic train/val split **by patient** (seeded, or given as a CSV), so no
  patient is on both sides and the memorization threshold is never computed against
  the same patient;
- `n_train`: train on a nested, seeded subset of the training images (the paper's
  5k/10k/20k experiment);
- `augment`: the paper's mitigation, flips (p=0.5) and rotations within ±5° (p=0.5) in
  every spatial axis, on the training loader only;
- loaders that yield the batch contract `{"image": [B, C, *spatial] in [0, 1], "id": list[str]}`
  and reference loaders (no augmentation, no shuffling) for the memorization callback.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, EnsureTyped, Lambda, SelectItemsd, Transform

from memwatch.datamodules.transforms import augmentation_transforms
from memwatch.errors import InputError


def record_hash(record: dict[str, Any]) -> bytes:
    """Disk-cache key of a record: its contents and, for a file, its size and modification time (an edited file is re-read)."""
    path = record.get("image_path")
    stat = Path(path).stat() if path and Path(path).exists() else None
    return pickle_hashing({**record, "file_stat": (stat.st_size, stat.st_mtime_ns) if stat else None})


class OwnStorage(Transform):
    """`image` copied into storage of its own size.

    A crop is a view of the whole decoded volume; cached as it is, it keeps (in memory) or
    writes (`torch.save` in the disk cache) the whole volume's storage with every patch.
    """

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "image": record["image"].clone(memory_format=torch.contiguous_format)}


class MedicalImageDataModule(LightningDataModule):
    """Shared base of every memwatch DataModule.

    Args:
        spatial_size: target size of every image, `(H, W)` or `(H, W, D)`; each dataset
            resizes or crops/pads to it. Its length sets 2D or 3D.
        batch_size: images per batch, per process.
        num_workers: DataLoader worker processes.
        n_train: train on this many training images (a nested, seeded subset); `None` for all.
        val_fraction: share of patients held out for validation when no split is given.
        split_seed: seed of the patient split and of the `n_train` subset.
        split_file: optional CSV with columns `patient,split` (`split` is `train` or `val`)
            that fixes the split instead of the seed.
        augment: apply the paper's flip/rotation augmentation to training batches.
        cache: keep decoded images in memory (`memory`), on disk (`disk`, under `cache_dir`)
            or decode on every access (`none`).
        cache_dir: folder for `cache: disk`.
    """

    #: options that choose which images are used or how they are batched, not what one image becomes:
    #: the disk cache is shared across their values (subclasses add their own, e.g. a fold)
    split_options: tuple[str, ...] = (
        "batch_size", "num_workers", "n_train", "val_fraction", "split_seed", "split_file", "augment", "cache", "cache_dir",
    )  # fmt: skip

    def __init__(
        self,
        spatial_size: Sequence[int],
        batch_size: int = 8,
        num_workers: int = 0,
        n_train: int | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        split_file: str | None = None,
        augment: bool = False,
        cache: Literal["none", "memory", "disk"] = "none",
        cache_dir: str = "runs/cache",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if len(self.spatial_size) not in (2, 3) or min(self.spatial_size) < 1:
            raise InputError(
                f"spatial_size={list(spatial_size)} must be 2 or 3 positive sizes: set --data.init_args.spatial_size, e.g. [64, 64]"
            )
        if n_train is not None and n_train < 1:
            raise InputError(f"n_train={n_train} must be at least 1 (or null for all training images)")
        if not 0.0 < val_fraction < 1.0:
            raise InputError(f"val_fraction={val_fraction} must lie in (0, 1)")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.n_train = n_train
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.split_file = split_file
        self.augment = augment
        self.cache = cache
        self.cache_dir = cache_dir
        self.train_records: list[dict[str, Any]] | None = None
        self.val_records: list[dict[str, Any]] | None = None
        #: a dataset's own split, patient → `train`/`val`, set by `list_records` (empty: `split_file` or the seed)
        self.own_split: dict[str, str] = {}

    # --- what a dataset provides -------------------------------------------------------

    def list_records(self) -> list[dict[str, Any]]:
        """Every image of the dataset as a dict with at least `id` and `patient` (both str)."""
        raise NotImplementedError

    def load_transforms(self) -> list[Callable]:
        """Deterministic transforms from a record to `{"image": [C, *spatial_size] in [0, 1], ...}`."""
        raise NotImplementedError

    def given_split(self, patients: Sequence[str]) -> dict[str, str] | None:
        """A dataset's own patient → `train`/`val` split (`own_split`), or `None` to use `split_file` or the seed."""
        if not self.own_split:
            return None
        return {patient: self.own_split[patient] for patient in patients}

    def records_of_two_roots(
        self, train: list[dict[str, Any]], val: list[dict[str, Any]], options: tuple[str, str], kind: str, what: str
    ) -> list[dict[str, Any]]:
        """The records of a training root and a validation root, whose folders are the split.

        `InputError` for a patient in both, naming the two files and `options` (the two
        arguments, e.g. `("train_dir", "val_dir")`); `kind` names the roots (`folders`), `what`
        their files (`images`). The folders become `own_split`, unless `split_file` decides.
        """
        train_paths = {r["patient"]: r["image_path"] for r in train}
        for record in val:
            if record["patient"] in train_paths:
                raise InputError(
                    f"patient {record['patient']!r} is in both {kind} ({train_paths[record['patient']]} and "
                    f"{record['image_path']}): move all of a patient's {what} to {options[0]} or to {options[1]}"
                )
        sides = {r["patient"]: "train" for r in train} | {r["patient"]: "val" for r in val}
        self.own_split = {} if self.split_file is not None else sides
        return train + val

    # --- shared machinery --------------------------------------------------------------

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_records is not None:
            return
        records = self.list_records()
        if not records:
            raise InputError(f"{type(self).__name__} found no images: check the dataset root")
        train, val = self._split(records)
        if self.n_train is not None:
            if self.n_train > len(train):
                raise InputError(
                    f"n_train={self.n_train} is larger than the {len(train)} training images of "
                    f"{type(self).__name__}: set --data.init_args.n_train to at most {len(train)}"
                )
            order = np.random.default_rng(self.split_seed).permutation(len(train))
            train = [train[i] for i in sorted(order[: self.n_train])]
        self.train_records, self.val_records = train, val
        # MONAI's caching datasets cache a chain only up to its first non-`Transform`: wrap plain callables.
        base = [t if isinstance(t, Transform) else Lambda(t) for t in self.load_transforms()]
        finish = [
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            OwnStorage(),
            SelectItemsd(keys=["image", "id"]),
        ]
        self._train_base = self._decoded(train, [*base, *finish], "train")
        self._val_base = self._decoded(val, [*base, *finish], "val")
        augment = augmentation_transforms(self.spatial_dims) if self.augment else []
        self._train_augmented = Dataset(self._train_base, Compose([*augment, *finish[:1]])) if augment else self._train_base

    def _split(self, records: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
        patients = sorted({r["patient"] for r in records})
        split = self.given_split(patients) or self._split_from_file(patients)
        if split is None:
            n_val = max(1, round(self.val_fraction * len(patients)))
            if n_val >= len(patients):
                raise InputError(
                    f"{type(self).__name__} has {len(patients)} patient(s), too few to hold out "
                    f"{n_val} for validation: add images or lower --data.init_args.val_fraction"
                )
            order = np.random.default_rng(self.split_seed).permutation(len(patients))
            held_out = {patients[i] for i in order[:n_val]}
            split = {p: ("val" if p in held_out else "train") for p in patients}
        train = [r for r in records if split[r["patient"]] == "train"]
        val = [r for r in records if split[r["patient"]] == "val"]
        if not train or not val:
            raise InputError(
                f"the split of {type(self).__name__} leaves {len(train)} training and {len(val)} validation "
                "images: both need at least one"
            )
        return train, val

    def _split_from_file(self, patients: Sequence[str]) -> dict[str, str] | None:
        if self.split_file is None:
            return None
        path = Path(self.split_file)
        if not path.is_file():
            raise InputError(f"split_file {path} does not exist: give a CSV with columns patient,split or leave it null")
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"patient", "split"} <= set(rows[0]):
            raise InputError(f"split_file {path} needs the columns patient,split (split is train or val)")
        split = {row["patient"]: row["split"].strip() for row in rows}
        bad = sorted({s for s in split.values() if s not in ("train", "val")})
        if bad:
            raise InputError(f"split_file {path} has split values {bad}: use only train or val")
        missing = [p for p in patients if p not in split]
        if missing:
            raise InputError(
                f"split_file {path} does not list patient {missing[0]!r} ({len(missing)} missing): "
                "add a row for every patient"
            )
        return split

    def _decoded(self, records: list[dict], transforms: list[Callable], name: str) -> Dataset:
        transform = Compose(transforms)
        if self.cache == "memory":
            return CacheDataset(records, transform, num_workers=self.num_workers or None, progress=False)
        if self.cache == "disk":
            # One folder per preprocessing: changing spatial_size, a window... never reads stale images.
            options = {k: v for k, v in self.hparams.items() if k not in self.split_options}
            folder = Path(self.cache_dir) / type(self).__name__ / pickle_hashing(options).decode()[:16] / name
            folder.mkdir(parents=True, exist_ok=True)
            return PersistentDataset(records, transform, cache_dir=folder, hash_func=record_hash)
        return Dataset(records, transform)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self._train_augmented, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self._val_base, shuffle=False)

    def reference_dataset(self, split: Literal["train", "val"]) -> Dataset:
        """The training or validation images without augmentation, in `train_ids`/`val_ids` order."""
        self.setup("fit")
        return self._train_base if split == "train" else self._val_base

    def reference_dataloader(self, split: Literal["train", "val"]) -> DataLoader:
        """Loader over `reference_dataset(split)`, without shuffling."""
        return self._loader(self.reference_dataset(split), shuffle=False)

    def memory_cache(self, split: Literal["train", "val"]) -> list[dict[str, Any]]:
        """The preprocessed items `cache="memory"` holds for `split`, themselves (not copies): what the cache keeps
        alive, for measuring it (bench/data_loading.py). Empty under another `cache`."""
        dataset = self.reference_dataset(split)
        # MONAI's CacheDataset keeps them in `_cache` (None: not filled yet) with no public accessor; indexing the
        # dataset may hand out copies or run transforms.
        cached = (dataset._cache or []) if isinstance(dataset, CacheDataset) else []
        return [item for item in cached if item is not None]

    @property
    def train_ids(self) -> list[str]:
        self.setup("fit")
        return [r["id"] for r in self.train_records]

    @property
    def val_ids(self) -> list[str]:
        self.setup("fit")
        return [r["id"] for r in self.val_records]

    @property
    def train_patients(self) -> list[str]:
        """The patient of each training image, in `train_ids` order (several images may share one)."""
        self.setup("fit")
        return [r["patient"] for r in self.train_records]

    @property
    def val_patients(self) -> list[str]:
        """The patient of each validation image, in `val_ids` order."""
        self.setup("fit")
        return [r["patient"] for r in self.val_records]
