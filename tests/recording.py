"""A MemorizationCallback that also saves what each rank embedded: for tests that compare world sizes bitwise."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer

from memwatch.callbacks import MemorizationCallback
from memwatch.memorization.distributed import block_shard
from memwatch.memorization.stream import EmbeddedStream


class RecordingMemorizationCallback(MemorizationCallback):
    """Writes `record_dir/reference.pt` (the gathered training and held-out embeddings, rank 0), per
    check and rank, `check{k}_rank{r}.pt` (the indices it sampled, their embeddings and pair scores),
    and per membership evaluation `membership_step{s}.pt` (the gathered scores, rank 0)."""

    def __init__(self, record_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record_dir = Path(record_dir)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.is_global_zero:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"train": self.reference.train.cpu(), "val": self.reference.val.cpu()}, self.record_dir / "reference.pt")

    def _sample_and_embed(self, trainer: Trainer, generator, check_index: int, where: str) -> EmbeddedStream:
        local = super()._sample_and_embed(trainer, generator, check_index, where)
        n = self.n_samples or len(self.reference.train)
        mine = block_shard(n, min(self.sample_batch_size, n), trainer.global_rank, trainer.world_size)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "indices": list(mine),
                "embeddings": local.embeddings.cpu() if len(local.embeddings) else torch.zeros(0, self.embedder.embedding_dim),
                "pairs": local.pair_scores.cpu(),
            },
            self.record_dir / f"check{check_index}_rank{trainer.global_rank}.pt",
        )
        return local

    def _membership(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super()._membership(trainer, pl_module)
        if trainer.is_global_zero:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            scores = {split: torch.from_numpy(getattr(self.membership, f"{split}_scores")) for split in ("train", "val")}
            torch.save(scores, self.record_dir / f"membership_step{trainer.global_step}.pt")
