"""Test doubles for the memorization callback: generators whose copying we control."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from memwatch.datamodules.phantom import render_phantom
from memwatch.lightning_modules.base import MemwatchModule
from memwatch.memorization.variation import vary


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


class MembershipScriptedGenerator(ScriptedGenerator):
    """A `ScriptedGenerator` with `membership_scores` whose membership signal we control.

    From epoch `members_from_epoch` on, an image's score is minus its mean squared distance to the nearest
    phantom of `member_ids` (about 0 for those training images, lower for every other: AUC near 1); before,
    a standard normal draw seeded by the image's id alone, alike for every image (no membership).
    """

    def __init__(self, member_ids: Sequence[str] = (), members_from_epoch: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.member_ids = list(member_ids)
        self.members_from_epoch = members_from_epoch

    def membership_scores(self, images: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        if epoch < self.members_from_epoch or not self.member_ids:
            return torch.cat([torch.randn(1, generator=torch.Generator().manual_seed(int(i))) for i in ids])
        members = torch.stack([torch.from_numpy(render_phantom(p, self.hparams.spatial_size)) for p in self.member_ids])
        distances = (images.cpu()[:, None].float() - members[None].float()).pow(2).flatten(2).mean(2)
        return -distances.min(1).values
