"""The streaming check: images arrive in chunks, are embedded and scored, and only the results are kept.

One function, `embed_stream`, serves every embedding loop of memwatch (through
`memorization.pipeline`, for the callback and the audit alike): reference sets, varied images,
folders and a generator's samples. Per chunk it embeds
the images, optionally scores the MS-SSIM of consecutive pairs `(2k, 2k + 1)` (an odd image
waits for the next chunk, so pairs never depend on the chunking), and optionally keeps the
few images ranked highest by a caller's score (the copy pairs a report shows). Nothing of
size `N × image` is ever held: memory is O(chunk) plus the `[N, L]` embeddings.
"""

from __future__ import annotations

import heapq
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import DataLoader
from torch.utils.data import Dataset, Subset

from memwatch.errors import TrainingFailure
from memwatch.memorization.quality import ms_ssim_diversity


class SamplesNotFinite(TrainingFailure):
    """A generator produced NaN or infinite pixels: training diverged (not a user's bad input)."""


class Stopwatch:
    """Seconds between laps, waiting for queued GPU work so that each lap is charged to the right step."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """A line every `every_seconds` on a long stream of images, and a last one if any was said.

    A check of 10 000 samples runs for many minutes; a log file (SLURM's, where no progress bar
    is drawn) must still show that it runs and when it will end. A stream shorter than
    `every_seconds` says nothing.
    """

    def __init__(
        self, label: str, total: int, say: Callable[[str], None], every_seconds: float = 30.0
    ) -> None:
        self.label, self.total, self.say, self.every_seconds = label, total, say, every_seconds
        self.done = 0
        self.started = self.last = time.perf_counter()
        self.lines = 0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.every_seconds and self.done < self.total:
            self._say(now)

    def finish(self) -> None:
        if self.lines:
            self._say(time.perf_counter())

    def _say(self, now: float) -> None:
        elapsed = now - self.started
        share = self.done / self.total if self.total else 1.0
        left = (
            f", about {duration(elapsed / self.done * (self.total - self.done))} left"
            if 0 < self.done < self.total
            else ""
        )
        self.say(f"{self.label}: {self.done}/{self.total} ({share:.0%}) in {duration(elapsed)}{left}")
        self.lines += 1
        self.last = now


@dataclass
class EmbeddedStream:
    """What `embed_stream` keeps of a stream of images.

    Attributes:
        embeddings: `[N, L]` float32, in stream order, on the embedder's output device.
        pair_scores: `[N // 2]` MS-SSIM of images `(2k, 2k + 1)` (empty unless asked).
        kept: stream index → image `[C, *spatial]` (CPU) of the at most `keep` images with the
            highest `rank_by` score.
        seconds: time spent producing the images (`images`), embedding them (`embed`) and
            scoring pairs (`pairs`).
    """

    embeddings: torch.Tensor
    pair_scores: torch.Tensor
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def embed_stream(
    chunks: Iterable[torch.Tensor],
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    first_index: int = 0,
    score_pairs: bool = False,
    keep: int = 0,
    rank_by: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    require_finite: str | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> EmbeddedStream:
    """Embed a stream of image chunks `[k, C, *spatial]` in `[0, 1]`, keeping only results.

    Args:
        chunks: image batches in order (a generator that samples or reads them lazily).
        embed: images `[k, C, *spatial]` → embeddings `[k, L]`.
        first_index: stream index of the first image (a rank's offset into a sharded set); with
            `score_pairs` it must be even, so pairs are `(2k, 2k + 1)` of the whole set.
        score_pairs: also score MS-SSIM of consecutive pairs (`memorization/ms_ssim`).
        keep: keep this many images, the highest by `rank_by(embeddings of a chunk) -> [k]`.
        autocast: context for producing and embedding images (e.g. the trainer's precision
            context); scores are computed in float32 outside it.
        require_finite: when set, a chunk with NaN/inf pixels raises `SamplesNotFinite` whose
            message starts with this text (e.g. "check 3 at step 1200").
        device: where time is measured (CUDA work is waited for at each lap).
        progress: told the size of every chunk embedded, and finished at the end.

    Returns:
        `EmbeddedStream`.
    """
    if score_pairs and first_index % 2:
        raise ValueError(f"first_index={first_index} must be even when scoring pairs (2k, 2k + 1)")
    if keep and rank_by is None:
        raise ValueError("keep > 0 needs rank_by, the score that chooses which images to keep")
    clock = Stopwatch(device)
    seconds = {"images": 0.0, "embed": 0.0, "pairs": 0.0}
    embeddings: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    best: list[tuple[float, int, torch.Tensor]] = []  # min-heap of (score, -index, image)
    unpaired: torch.Tensor | None = None
    position = first_index
    iterator = iter(chunks)
    while True:
        with autocast():
            images = next(iterator, None)
        seconds["images"] += clock.lap()
        if images is None:
            break
        if require_finite is not None:
            _require_finite(images, position, require_finite)
        with autocast():
            chunk_embeddings = embed(images).float()
        embeddings.append(chunk_embeddings)
        seconds["embed"] += clock.lap()
        if keep:
            for offset, score in enumerate(rank_by(chunk_embeddings).tolist()):
                item = (score, -(position + offset), images[offset].detach().float().cpu())
                (heapq.heappush if len(best) < keep else heapq.heappushpop)(best, item)
        if score_pairs:
            if unpaired is not None:
                images = torch.cat([unpaired.to(images.device, images.dtype), images])
            paired = len(images) - len(images) % 2
            scores.append(ms_ssim_diversity(images[0:paired:2].float(), images[1:paired:2].float()))
            unpaired = images[paired:] if paired < len(images) else None
            seconds["pairs"] += clock.lap()
        position += len(chunk_embeddings)
        if progress is not None:
            progress.advance(len(chunk_embeddings))
    if progress is not None:
        progress.finish()
    return EmbeddedStream(
        embeddings=torch.cat(embeddings) if embeddings else torch.empty(0, 0),
        pair_scores=torch.cat(scores) if scores else torch.empty(0),
        kept={-negative_index: image for _, negative_index, image in best},
        seconds=seconds,
    )


def _require_finite(images: torch.Tensor, first_index: int, context: str) -> None:
    bad = ~torch.isfinite(images.reshape(len(images), -1)).all(dim=1)
    if bool(bad.any()):
        rows = (bad.nonzero().flatten() + first_index).tolist()
        raise SamplesNotFinite(
            f"{context}: {len(rows)} sample(s) have NaN or infinite pixels (first: sample {rows[0]}): "
            "the model diverged; resume from an earlier checkpoint with a lower learning rate"
        )


def blocks(
    produce: Callable[[range], torch.Tensor], indices: range, block_size: int
) -> Iterator[torch.Tensor]:
    """The images of `indices`, produced in whole blocks `[kB, (k + 1)B)` of global indices: a lazy stream.

    `produce(range)` is always called with a full block of `block_size` indices; the last block
    reaches past `indices.stop` and its padding is dropped. So every image is computed in the same
    batch on any number of ranks and at any `n` (on a GPU the arithmetic depends on the batch), and
    one batch shape serves the whole run (one CUDA graph). `indices.start` must be a multiple of
    `block_size` (`memorization.distributed.block_shard` gives such shares).
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be at least 1")
    if len(indices) and indices.start % block_size:
        raise ValueError(f"indices start at {indices.start}, not at a multiple of block_size={block_size}")
    for start in range(indices.start, indices.stop, block_size):
        yield produce(range(start, start + block_size))[: min(block_size, indices.stop - start)]


def dataset_blocks(
    dataset: Dataset, indices: range, block_size: int, num_workers: int = 0
) -> Iterator[torch.Tensor]:
    """`dataset[i]["image"]` for `indices`, stacked in blocks as `blocks` draws them (the last block padded
    with repeats of its last image, the padding dropped), read by a DataLoader with `num_workers`."""
    if not len(indices):
        return
    if indices.start % block_size:
        raise ValueError(f"indices start at {indices.start}, not at a multiple of block_size={block_size}")
    rows = [*indices, *[indices.stop - 1] * (-len(indices) % block_size)]
    loader = DataLoader(Subset(dataset, rows), batch_size=block_size, num_workers=num_workers)
    for start, batch in zip(range(indices.start, indices.stop, block_size), loader, strict=True):
        yield batch["image"][: min(block_size, indices.stop - start)]


@contextmanager
def deterministic_kernels() -> Iterator[None]:
    """cuDNN benchmarking off and deterministic algorithms on (warn-only) inside; the caller's settings after.

    Autotuning may pick another convolution algorithm on each rank and at each check, and some
    kernels accumulate with atomics: either would make an image's arithmetic differ between runs.
    """
    benchmark, cudnn_deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
            yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, cudnn_deterministic
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@contextmanager
def rng_preserved(device: torch.device | str = "cpu") -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states (CPU and `device`) on exit.

    Building or iterating a DataLoader draws from (and MONAI's DataLoader reseeds) torch's
    global generator; a check that did so would change the noise that training draws next.
    """
    device = torch.device(device)
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - the global state is the point
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else None):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)  # noqa: NPY002
