"""One memorization check, owned once: its options, its reference set, and a check of a generator or a folder.

The callback (during training), the audit (before a release) and the checkpoint watcher call only this:
`CheckOptions` are validated once, when made; `MemorizationCheck.build_reference` embeds the training and
held-out images (and the self-check's variations) once; `MemorizationCheck.run` samples (or reads), embeds,
detects and scores quality, and returns a `CheckResult`. Every step runs in fixed blocks of global indices
(`memorization.pipeline`), so a check is the same on any rank count, device or front door. Lightning-free.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from memwatch.errors import InputError
from memwatch.memorization.detect import (
    DEFAULT_MARGIN,
    DEFAULT_RULE,
    check_percentile,
    check_rule,
    nearest_correlation,
)
from memwatch.memorization.distributed import block_shard, fail_together, gather_kept
from memwatch.memorization.embedders import Embedder, Generator
from memwatch.memorization.pipeline import (
    Placement,
    embed_dataset,
    embed_variations,
    gathered,
    sample_block_size,
    sample_blocks,
)
from memwatch.memorization.reference import Detection, ReferenceSet
from memwatch.memorization.report import copy_order
from memwatch.memorization.stream import (
    EmbeddedStream,
    Stopwatch,
    dataset_blocks,
    deterministic_kernels,
    embed_stream,
    rng_preserved,
)
from memwatch.memorization.summary import check_numbers, detectors_summary, quality_numbers, summary_numbers
from memwatch.memorization.variation import variation_transform


@dataclass(frozen=True)
class CheckOptions:
    """What a check does, validated once. Each name is the YAML key, the callback's argument and the audit's flag.

    Attributes:
        n_samples: synthetic images per check; `None`: the training-set size (the paper's N_syn = N_train).
        num_inference_steps: the sampler's denoising steps per sample.
        sample_batch_size: images per sampling (UNet) and embedding pass; every image is drawn and embedded in
            fixed blocks of this many global indices, so the counts are the same on any number of processes.
        decode_batch_size: latents decoded to images at a time (`None`: `sample_batch_size`), passed to the
            generator's `sample` when set.
        sampler_graphs: replay the sampling step's UNet forward as a CUDA graph (the generator's
            `sampler_graphs()`).
        percentile: τ is this percentile of the training→held-out nearest-neighbour correlations.
        rule, margin: the copy rule (`memorization.detect.RULES`) and the `distinct` rule's margin.
        seed: sample `i` of check `k` is seeded by `(seed, k, i)`; of a single check (`index=None`) by `(seed, i)`.
        detector_positives: varied training images of the self-check (0: none).
        variation: strengths of the self-check's variation (`memorization.variation.variation_transform`).
        keep_copies: the copy pairs a check shows: the samples most similar to a training image, kept as images on
            every rank (`CheckResult.copies`); 0 keeps none.
        flags: how an error names an option: `"--memorization.{}"` (the CLI's) or `"--{}"` (the audit's, with
            hyphens).
    """

    n_samples: int | None = None
    num_inference_steps: int = 50
    sample_batch_size: int = 16
    decode_batch_size: int | None = None
    sampler_graphs: bool = False
    percentile: float = 95.0
    rule: str = DEFAULT_RULE
    margin: float = DEFAULT_MARGIN
    seed: int = 0
    detector_positives: int = 1000
    variation: Mapping[str, Any] = field(default_factory=dict)
    keep_copies: int = 0
    flags: str = "--memorization.{}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "variation", MappingProxyType(dict(self.variation)))
        rule, margin = check_rule(self.rule, self.margin, self.flag("rule"), self.flag("margin"))
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "margin", margin)
        object.__setattr__(self, "percentile", check_percentile(self.percentile, self.flag("percentile")))
        for name, minimum, otherwise in (
            ("n_samples", 1, " (or null for the training-set size)"), ("num_inference_steps", 1, ""),
            ("sample_batch_size", 1, ""), ("decode_batch_size", 1, " (or null for sample_batch_size)"),
            ("detector_positives", 0, " (0 skips the self-check)"),
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise InputError(f"{self.flag(name)}={value} must be at least {minimum}{otherwise}")
        self.variation_for(2)  # unknown strengths fail now, not at the first check

    def flag(self, name: str) -> str:
        """The option `name` as the user spells it (`--memorization.sample_batch_size`, `--sample-batch-size`)."""
        return self.flags.format(name if "." in self.flags else name.replace("_", "-"))

    def variation_for(self, spatial_dims: int):
        """The self-check's variation transform for images of `spatial_dims` dimensions."""
        try:
            return variation_transform(spatial_dims, **self.variation)
        except TypeError as error:
            raise InputError(
                f"{self.flag('variation')}={dict(self.variation)} ({error}): use rotation_degrees, contrast_gamma "
                "and noise_std"
            ) from None

    def sample_keywords(self) -> dict[str, Any]:
        """The keywords of the generator's `sample` beyond the contract's that a check passes."""
        return {} if self.decode_batch_size is None else {"decode_batch_size": self.decode_batch_size}


@dataclass
class CheckResult:
    """One check: each embedder's detection (the first is the headline's), the quality numbers and the cost.

    Attributes:
        detections: embedder name → `Detection`, in the order the embedders were given.
        synthetic: the samples' gathered embeddings (all embedders side by side) and pair scores.
        fd, ms_ssim: the quality numbers of the first embedder (`None` when too few samples).
        seconds: this rank's time sampling, gathering, embedding and detecting, and scoring quality.
        elapsed: this rank's seconds for the whole check.
        shard: the samples this rank drew and embedded (its rows of `synthetic`).
        copies: the kept samples, global index → image `[C, *spatial]` (CPU), most similar first, on every rank.
    """

    detections: dict[str, Detection]
    synthetic: EmbeddedStream
    train_patients: list[str]
    n_val: int
    fd: float | None
    ms_ssim: float | None
    seconds: dict[str, float]
    copies: dict[int, torch.Tensor] = field(default_factory=dict)
    elapsed: float = 0.0
    shard: range = range(0)

    @property
    def detection(self) -> Detection:
        """The first embedder's detection: the headline numbers."""
        return next(iter(self.detections.values()))

    def numbers(self) -> dict[str, Any]:
        """A history row's numbers: the copy rule, the headline counts and the quality metrics."""
        return check_numbers(self.detection, self.train_patients, self.fd, self.ms_ssim)

    def summary(self, syn_ids: Sequence[str] | None = None) -> dict[str, Any]:
        """`summary.json`'s numbers; with `syn_ids` (each sample's name) also every embedder's (`detectors`)."""
        numbers = summary_numbers(self.detection, self.train_patients, self.n_val, self.fd, self.ms_ssim)
        if syn_ids is not None:
            numbers["detectors"] = detectors_summary(self.detections, syn_ids, self.train_patients)
        return numbers

    def withheld(self) -> torch.Tensor:
        """`[N_syn]` bool: the samples any embedder flags as a copy."""
        return torch.stack([d.report.is_copy.cpu() for d in self.detections.values()]).any(dim=0)


class MemorizationCheck:
    """A check of one generator (or folder of samples) against one data set's reference images.

    `embedders` is one `Embedder` or several by name: several see each image in the same pass, and each gets
    its own reference set and detection; the first gives the headline numbers.
    """

    def __init__(self, options: CheckOptions, embedders: Embedder | Mapping[str, Embedder]) -> None:
        self.options = options
        self.embedders = dict(embedders) if isinstance(embedders, Mapping) else {"embedder": embedders}
        self.references: dict[str, ReferenceSet] | None = None
        self.image_shape: tuple[int, ...] | None = None

    @property
    def embedding_dim(self) -> int:
        return sum(embedder.embedding_dim for embedder in self.embedders.values())

    @property
    def reference(self) -> ReferenceSet | None:
        """The first embedder's reference set (`None` before `build_reference`)."""
        return next(iter(self.references.values())) if self.references is not None else None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, L]`: every embedder's embeddings of `images`, side by side."""
        if len(self.embedders) == 1:
            return next(iter(self.embedders.values())).embed(images)
        return torch.cat(
            [embedder.embed(images).float().to(images.device) for embedder in self.embedders.values()], 1
        )

    def _per_embedder(self, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        lengths = [embedder.embedding_dim for embedder in self.embedders.values()]
        return dict(zip(self.embedders, torch.split(matrix, lengths, dim=1), strict=True))

    def build_reference(
        self,
        train: Dataset,
        val: Dataset,
        train_patients: Sequence[str],
        val_patients: Sequence[str] | None,
        place: Placement,
    ) -> dict[str, ReferenceSet]:
        """Embed the training and held-out images (`dataset[i]["image"]`) and the self-check's variations of
        training images, and build each embedder's reference set. Leaves every random stream as it was."""
        options, device = self.options, place.device
        block, dim = options.sample_batch_size, self.embedding_dim
        with rng_preserved(device), deterministic_kernels(), fail_together(device, "embedding the reference images"):
            for embedder in self.embedders.values():
                embedder.to(device)
            embedded = {
                split: embed_dataset(dataset, self.embed, block, dim, place, f"embedding the {name} images")
                for split, dataset, name in (("train", train, "training"), ("val", val, "held-out"))
            }
            self.image_shape = tuple(train[0]["image"].shape)
            varied = None
            if options.detector_positives:
                varied = self._per_embedder(embed_variations(
                    train, options.detector_positives, self.embed, block, dim, place, seed=options.seed,
                    variation=options.variation_for(len(self.image_shape) - 1), label="embedding varied training images",
                ))  # fmt: skip
        self.references = {
            name: ReferenceSet.build(
                train_embeddings, val_embeddings, train_patients, val_patients, percentile=options.percentile,
                rule=options.rule, margin=options.margin, varied=None if varied is None else varied[name],
            )
            for name, train_embeddings, val_embeddings in zip(
                self.embedders, self._per_embedder(embedded["train"]).values(),
                self._per_embedder(embedded["val"]).values(), strict=True,
            )
        }  # fmt: skip
        return self.references

    def run(
        self,
        source: Generator | Dataset,
        place: Placement,
        index: int | None = None,
        *,
        where: str = "a memorization check",
        save_samples: Path | None = None,
    ) -> CheckResult:
        """Check `source`: a generator's samples (check number `index`, `None` for a single check) or a dataset of
        synthetic images (`dataset[j]["image"]`). Samples are drawn in this rank's whole blocks, embedded as they
        come (with `save_samples`, each also written as `sample_{j:06d}.npy`), gathered, and detected on every
        rank. `where` starts the error of a sample that is not finite (e.g. "training failed at check 3 (step 1200)"). Leaves every random stream as it was."""
        if self.references is None:
            raise RuntimeError("build_reference before run")
        device = place.device
        started = Stopwatch(device)
        with rng_preserved(device), deterministic_kernels():
            local, shard = self._sample_and_embed(source, place, index, where, save_samples)
            clock = Stopwatch(device)
            synthetic = gathered(local, self.embedding_dim, device)  # waits for the slowest rank
            gathering = clock.lap()
            embeddings = self._per_embedder(synthetic.embeddings)
            detections = {
                name: reference.detect(embeddings[name]) for name, reference in self.references.items()
            }
            detecting = clock.lap()
            first = next(iter(self.references))
            fd, ms_ssim = quality_numbers(
                embeddings[first], self.references[first].val, synthetic.pair_scores
            )
            seconds = {
                "seconds_sampling": round(local.seconds["images"], 4), "seconds_gather": round(gathering, 4),
                "seconds_embed_detect": round(local.seconds["embed"] + detecting, 4),
                "seconds_quality": round(local.seconds["pairs"] + clock.lap(), 4),
            }  # fmt: skip
            result = CheckResult(
                detections,
                synthetic,
                self.reference.train_patients,
                len(self.reference.val),
                fd,
                ms_ssim,
                seconds,
            )
            if self.options.keep_copies:
                order = copy_order(result.detection.report)
                result.copies = gather_kept(
                    local.kept, order, self.options.keep_copies, self.image_shape, device
                )
        result.elapsed, result.shard = started.lap(), shard
        return result

    def _sample_and_embed(
        self,
        source: Generator | Dataset,
        place: Placement,
        index: int | None,
        where: str,
        save_samples: Path | None,
    ) -> tuple[EmbeddedStream, range]:
        options, device = self.options, place.device
        sampling = callable(getattr(source, "sample", None))
        n_syn = (options.n_samples or len(self.reference.train)) if sampling else len(source)
        block_size = sample_block_size(n_syn, options.sample_batch_size)
        mine = block_shard(n_syn, block_size, place.rank, place.world_size)
        if sampling:
            images = sample_blocks(
                source, mine, block_size, seed=options.seed if index is None else (options.seed, index),
                num_inference_steps=options.num_inference_steps, options=options.sample_keywords(),
            )  # fmt: skip
            graphs = source.sampler_graphs() if options.sampler_graphs else nullcontext()
        else:
            images = (
                block.to(device) for block in dataset_blocks(source, mine, block_size, place.num_workers)
            )
            graphs = nullcontext()
        if save_samples is not None:
            images = saved(images, save_samples, mine.start)

        with fail_together(device, "sampling"), graphs, self._out_of_memory_named():
            local = embed_stream(
                images, self.embed, first_index=mine.start, score_pairs=True,
                # twice the pairs shown: the running ranking and detect_copies may round near-ties differently
                keep=2 * options.keep_copies,
                rank_by=lambda embeddings: nearest_correlation(
                    self._per_embedder(embeddings)[next(iter(self.embedders))], self.reference.train
                ),
                autocast=place.autocast, require_finite=where if sampling else None, device=device,
                progress=place.lines("samples", len(mine)),
            )  # fmt: skip
        return local, mine

    @contextmanager
    def _out_of_memory_named(self) -> Iterator[None]:
        """A check that runs out of GPU memory is one line naming the options that size its blocks."""
        options = self.options
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            raise InputError(
                f"a memorization check ran out of GPU memory with blocks of sample_batch_size={options.sample_batch_size} "
                f"(decode_batch_size={options.decode_batch_size or options.sample_batch_size}): lower "
                f"{options.flag('decode_batch_size')} first (decoding to full-size images takes the most), then "
                f"{options.flag('sample_batch_size')}"
            ) from None


def saved(samples: Iterator[torch.Tensor], folder: Path, start: int = 0) -> Iterator[torch.Tensor]:
    """Pass `samples` on, writing each as `sample_{i:06d}.npy` (float32 `[*spatial]` in `[0, 1]`) as it comes."""
    folder.mkdir(parents=True, exist_ok=True)
    for images in samples:
        for offset, image in enumerate(images.float().cpu().numpy()):
            np.save(folder / f"sample_{start + offset:06d}.npy", image[0])
        start += len(images)
        yield images
