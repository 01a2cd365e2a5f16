"""The streams of a check, shared by the callback and the audit: images in fixed blocks → embeddings.

Every image is produced and embedded in whole blocks `[kB, (k + 1)B)` of global indices
(`memorization.stream.blocks`); a rank takes a contiguous run of whole blocks
(`memorization.distributed.block_shard`) and the embeddings are gathered in rank order. So an
image is computed in the same batch on any number of processes, and the gathered matrix is the
same as one process's (bitwise, under `deterministic_kernels`). With `world_size=1` (the audit)
nothing is gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from monai.transforms import Compose
from torch.utils.data import Dataset, Subset

from memwatch.memorization.chance import positive_rows
from memwatch.memorization.distributed import block_shard, gather_rows
from memwatch.memorization.embedders import Generator
from memwatch.memorization.membership import (
    MembershipEvaluation,
    evaluate_membership,
    reference_rows,
    score_ids,
)
from memwatch.memorization.stream import EmbeddedStream, Progress, blocks, dataset_blocks, embed_stream
from memwatch.memorization.variation import variation_batches

Embed = Callable[[torch.Tensor], torch.Tensor]  # images [B, C, *spatial] in [0, 1] → [B, L]
Score = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]  # images [B, C, *spatial], ids [B] → scores [B]
ProgressFor = Callable[[str], Callable[[int], Progress] | None]  # label → (this rank's count → lines), or None


@dataclass(frozen=True)
class Placement:
    """Where a step runs: this process's rank of `world_size`, its device, its loader workers, its precision
    (`autocast`, e.g. the trainer's precision context), and its progress lines (`progress(label)`)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    autocast: Callable[[], AbstractContextManager] = nullcontext
    progress: ProgressFor = lambda label: None

    def lines(self, label: str, count: int) -> Progress | None:
        """Progress lines about `count` images of this rank, or `None`."""
        progress = self.progress(label)
        return progress(count) if progress else None


def gathered(local: EmbeddedStream, embedding_dim: int, device: torch.device) -> EmbeddedStream:
    """`local` with its embeddings `[N, L]` and pair scores gathered from every rank, in rank order."""
    # An empty share (more ranks than blocks) still has the embedding length, for the gather.
    embeddings = (
        local.embeddings.to(device) if len(local.embeddings) else torch.zeros(0, embedding_dim, device=device)
    )
    return EmbeddedStream(
        embeddings=gather_rows(embeddings),
        pair_scores=gather_rows(local.pair_scores.to(device)),
        kept=local.kept,
        seconds=local.seconds,
    )


def embed_dataset(
    dataset: Dataset, embed: Embed, block_size: int, embedding_dim: int, place: Placement, label: str = ""
) -> torch.Tensor:
    """`dataset[i]["image"]` for every `i`, embedded in blocks of `block_size`: gathered `[N, L]` in dataset
    order (progress lines under `label`)."""
    mine = block_shard(len(dataset), block_size, place.rank, place.world_size)
    local = embed_stream(
        (block.to(place.device) for block in dataset_blocks(dataset, mine, block_size, place.num_workers)),
        embed, first_index=mine.start, autocast=place.autocast, device=place.device,
        progress=place.lines(label, len(mine)),
    )  # fmt: skip
    return gathered(local, embedding_dim, place.device).embeddings


def embed_variations(
    dataset: Dataset,
    n_positives: int,
    embed: Embed,
    block_size: int,
    embedding_dim: int,
    place: Placement,
    *,
    seed: int,
    variation: Compose,
    label: str = "",
) -> torch.Tensor:
    """Embeddings `[P, L]` of variations of `n_positives` evenly spaced training images (the self-check's
    positives; all images when fewer); variation `k` seeded by `(seed, k)`."""
    rows = positive_rows(len(dataset), n_positives)
    mine = block_shard(len(rows), block_size, place.rank, place.world_size)

    def vary_block(block: range) -> torch.Tensor:
        padded = [rows[min(k, len(rows) - 1)] for k in block]  # the last block repeats its last row
        return next(variation_batches(dataset, padded, len(block), seed, variation, block.start))

    local = embed_stream(
        (images.to(place.device) for images in blocks(vary_block, mine, block_size)),
        embed, autocast=place.autocast, device=place.device, progress=place.lines(label, len(mine)),
    )  # fmt: skip
    return gathered(local, embedding_dim, place.device).embeddings


def sample_blocks(
    generator: Generator,
    indices: range,
    block_size: int,
    *,
    seed: int | Sequence[int],
    num_inference_steps: int,
    options: dict[str, Any] | None = None,
) -> Iterator[torch.Tensor]:
    """The generator's samples `indices`, drawn in whole blocks of `block_size` global indices: a lazy stream.

    `options` are further keywords of `sample` (`decode_batch_size`, which memwatch's diffusion modules take).
    """

    def draw(block: range) -> torch.Tensor:
        return generator.sample(
            len(block), seed=seed, num_inference_steps=num_inference_steps, sample_batch_size=block_size,
            start_index=block.start, **(options or {}),
        )  # fmt: skip

    return blocks(draw, indices, block_size)


def sample_block_size(n_samples: int, sample_batch_size: int) -> int:
    """The block samples are drawn in: `sample_batch_size`, or `n_samples` when fewer (a larger block would
    only sample padding)."""
    return min(sample_batch_size, n_samples)


def score_dataset(
    dataset: Dataset,
    score: Score,
    ids: Sequence[int],
    block_size: int,
    place: Placement,
) -> torch.Tensor:
    """`score(images, ids)` of every `dataset[i]["image"]` (image `i` named `ids[i]`), in blocks of `block_size`
    aligned to global indices: gathered `[N]` float32 in dataset order, the same on any number of ranks."""
    mine = block_shard(len(dataset), block_size, place.rank, place.world_size)
    device = place.device
    local = [torch.zeros(0, device=device)]
    with place.autocast():
        for start, images in zip(
            range(mine.start, mine.stop, block_size),
            dataset_blocks(dataset, mine, block_size, place.num_workers),
            strict=True,
        ):
            local.append(score(images.to(device), ids[start : start + len(images)]).float().to(device))
    return gather_rows(torch.cat(local)).cpu()


def score_membership(
    train: Dataset,
    val: Dataset,
    score: Score,
    block_size: int,
    place: Placement,
    *,
    n_ref: int | None = None,
    seed: int = 0,
    option: str = "",
) -> MembershipEvaluation:
    """Score `n_ref` held-out images (all by default) and as many training images (`memorization.membership.
    reference_rows`) with their fixed ids, and compare them (`evaluate_membership`)."""
    train_rows, val_rows = reference_rows(len(train), len(val), n_ref)
    scores = {
        split: score_dataset(
            Subset(dataset, rows), score, score_ids(split, rows, len(train)), block_size, place
        )
        for split, dataset, rows in (("train", train, train_rows), ("val", val, val_rows))
    }
    return evaluate_membership(scores["train"], scores["val"], seed=seed, option=option)
