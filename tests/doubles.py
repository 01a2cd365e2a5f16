"""Test doubles for the memorization callback: generators whose copying we control."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from datamodules.phantom import render_phantom
from datamodules.transforms import vary
from lightning_modules.base import MemwatchModule


class ScriptedGenerator(MemwatchModule):
    """A "generative model" whose `sample` returns variations of chosen phantom patients.

    Sample `i` is a variation of patient `copied_ids[i % len(copied_ids)]`, seeded by
    `(seed, i)` as the LDM's contract requires. Before epoch `copy_from_epoch` it returns
    variations of `novel_ids` instead (patients in neither split). Trains a dummy parameter.

    Args:
        copied_ids: training patients it copies.
        novel_ids: patients it draws before it starts copying.
        copy_from_epoch: first epoch at whose end samples are copies.
        spatial_size: image size.
        nan_from_sample: samples with this index or higher are NaN (a diverged model); `None` for none.
    """

    def __init__(
        self,
        copied_ids: Sequence[str] = ("phantom-0000",),
        novel_ids: Sequence[str] = ("novel-0000",),
        copy_from_epoch: int = 0,
        spatial_size: Sequence[int] = (32, 32),
        nan_from_sample: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spatial_dims = len(spatial_size)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (self.weight - batch["image"].mean()) ** 2

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", (self.weight - batch["image"].mean()) ** 2, batch_size=len(batch["id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, n: int, seed=0, num_inference_steps=None, sample_batch_size=None, start_index: int = 0) -> torch.Tensor:
        copying = self._trainer is None or self.trainer.current_epoch >= self.hparams.copy_from_epoch
        ids = self.hparams.copied_ids if copying else self.hparams.novel_ids
        images = []
        for i in range(start_index, start_index + n):
            image = torch.from_numpy(render_phantom(ids[i % len(ids)], self.hparams.spatial_size))
            entropy = [*(seed if isinstance(seed, Sequence) else [seed]), i]
            variation_seed = int(np.random.SeedSequence(entropy).generate_state(1)[0] % 2**31)
            images.append(vary(image[None], seed=variation_seed)[0])
            if self.hparams.nan_from_sample is not None and i >= self.hparams.nan_from_sample:
                images[-1] = torch.full_like(images[-1], float("nan"))
        return torch.stack(images).to(self.device) if images else torch.empty(0, 1, *self.hparams.spatial_size)
