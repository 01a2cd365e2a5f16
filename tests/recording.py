"""Callbacks that also save what each rank computed: for tests that compare world sizes bitwise."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer

from memwatch.callbacks import MembershipCallback, MemorizationCallback


class RecordingMemorizationCallback(MemorizationCallback):
    """Writes `record_dir/reference.pt` (the gathered training and held-out embeddings, rank 0) and, per check
    and rank, `check{k}_rank{r}.pt` (the indices it sampled, their embeddings and pair scores)."""

    def __init__(self, record_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record_dir = Path(record_dir)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.is_global_zero:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"train": self.reference.train.cpu(), "val": self.reference.val.cpu()}, self.record_dir / "reference.pt")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record_new_check(trainer, lambda: super(RecordingMemorizationCallback, self).on_validation_epoch_end(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record_new_check(trainer, lambda: super(RecordingMemorizationCallback, self).on_train_epoch_end(trainer, pl_module))

    def _record_new_check(self, trainer: Trainer, hook) -> None:
        checks = len(self.history)
        hook()
        if len(self.history) == checks:
            return
        result, mine = self.result, self.result.shard
        pairs = result.synthetic.pair_scores[mine.start // 2 : (mine.start + len(mine)) // 2]
        self.record_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"indices": list(mine), "embeddings": result.synthetic.embeddings[mine.start : mine.stop].cpu(), "pairs": pairs.cpu()},
            self.record_dir / f"check{checks}_rank{trainer.global_rank}.pt",
        )


class RecordingMembershipCallback(MembershipCallback):
    """Writes, per membership evaluation, `record_dir/membership_step{s}.pt` (the gathered scores, rank 0)."""

    def __init__(self, record_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record_dir = Path(record_dir)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self._record(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._record(trainer)

    def _record(self, trainer: Trainer) -> None:
        if trainer.is_global_zero and self.evaluation_at(trainer.global_step) is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            scores = {split: torch.from_numpy(getattr(self.evaluation, f"{split}_scores")) for split in ("train", "val")}
            torch.save(scores, self.record_dir / f"membership_step{trainer.global_step}.pt")
