"""The two plug-in contracts, `Generator` and `Embedder`, and the embedders that need no training.

The callback and the audit talk to models only through these protocols: any model with
`sample` can be checked for copies, any model with `embed` can count them. memwatch ships a
SimCLR embedder (`lightning_modules.SimCLRModule`), a parameter-free `PixelEmbedder` (a second
opinion that needs no training) and `TorchScriptEmbedder` (a network trained elsewhere, exported
with `torch.jit.save`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from memwatch.errors import InputError, one_line

SAMPLE_SIGNATURE = "sample(n, seed: int | tuple[int, ...], num_inference_steps, sample_batch_size, start_index)"


@runtime_checkable
class Generator(Protocol):
    """A generative model the callback samples during training and the audit samples before a release.

    `sample(n, seed, ...)` returns `[n, C, *spatial]` float images in `[0, 1]`, sample `i`
    (counted from `start_index`) a function of `(seed, i)` only: not of `n`, the batch size, the
    rank or the number of processes. `seed` may be an int or a tuple of ints (the callback passes
    `(seed, check)`).
    """

    def sample(
        self,
        n: int,
        seed: int | tuple[int, ...] = 0,
        num_inference_steps: int = 50,
        sample_batch_size: int = 16,
        start_index: int = 0,
    ) -> torch.Tensor: ...


def membership_scorer(generator: object) -> Callable[..., torch.Tensor] | None:
    """The generator's optional `membership_scores(images, ids) -> [B]` (higher = more likely a training image;
    `memorization.membership`), or `None` when it has none."""
    scores = getattr(generator, "membership_scores", None)
    return scores if callable(scores) else None


@runtime_checkable
class Embedder(Protocol):
    """Images `[B, C, *spatial]` in `[0, 1]` → embeddings `[B, embedding_dim]` (eval mode, no grad).

    `spatial_dims` (2 or 3) and `in_channels` say which images it takes; `image_spatial_size`
    the size it was trained on, or `None` when it takes any size. `training_patients` are the
    patients it was trained on (`None`: unknown, or trained on none of this data); a check refuses
    an embedder trained on held-out patients, whose τ would be biased.
    """

    spatial_dims: int
    in_channels: int
    embedding_dim: int
    image_spatial_size: tuple[int, ...] | None
    training_patients: list[str] | None

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...


def probe_generator(
    generator: Generator,
    seed: int | tuple[int, ...],
    in_channels: int,
    spatial_size: Sequence[int] | None,
    name: str,
    options: dict[str, Any] | None = None,
) -> None:
    """Draw 2 samples with 1 inference step, called as a check calls `sample` (its `seed` and further keyword
    `options`); `InputError` unless that works and they are `[2, in_channels, *spatial_size]` (any size when
    `None`) in `[0, 1]`. A cheap check of a user's generator before anything runs for real."""
    keywords = {"seed": seed, "num_inference_steps": 1, "sample_batch_size": 2, "start_index": 0, **(options or {})}
    try:
        with torch.no_grad():
            images = generator.sample(2, **keywords)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a user's sample that cannot take the call fails in many ways
        call = ", ".join(f"{key}={value!r}" for key, value in keywords.items())
        raise InputError(
            f"{name}.sample(2, {call}) failed ({type(error).__name__}: {one_line(error)}): a generator's sample "
            f"must take {SAMPLE_SIGNATURE}, seed an int or a tuple of ints, as "
            "memwatch.memorization.embedders.Generator describes"
        ) from error
    if isinstance(images, torch.Tensor) and images.ndim >= 3:
        expected = [2, in_channels, *(spatial_size if spatial_size is not None else images.shape[2:])]
    else:
        expected = [2, in_channels, *(spatial_size or ["..."])]
    if not isinstance(images, torch.Tensor) or list(images.shape) != expected:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(
            f"{name}.sample(2) returns {shape}, but the embedder takes {expected} ([n, channels, *the data's "
            "spatial_size]): make sample return images of the data's size"
        )
    low, high = float(images.min()), float(images.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < -1e-4 or high > 1 + 1e-4:
        raise InputError(
            f"{name}.sample returns values in [{low:.3g}, {high:.3g}], not [0, 1]: scale (or clip) the samples "
            "to [0, 1], the range of the training images they are compared with"
        )


def mirror_images(images: torch.Tensor) -> Iterator[torch.Tensor]:
    """The images `[B, C, *spatial]` mirrored along every subset of their spatial axes, one at a time.

    The unflipped images first (themselves, not a copy), then `2^spatial_dims - 1` flipped
    copies, each made only when asked for: a caller that drops each before taking the next
    holds one copy at a time, not the whole orbit (8 in 3D).
    """
    axes = range(2, images.ndim)
    for mask in range(2 ** len(axes)):
        subset = [a for k, a in enumerate(axes) if mask >> k & 1]
        yield images.flip(subset) if subset else images


def mirror_orbit(images: torch.Tensor) -> list[torch.Tensor]:
    """All of `mirror_images(images)` at once, the unflipped first: for small images only."""
    return list(mirror_images(images))


class PixelEmbedder(nn.Module):
    """The image itself as its embedding: resized to `size`, flattened. No parameters, no training.

    Pearson correlation of these vectors is the correlation of the (downsampled) pixels, which
    ignores brightness and linear contrast changes. With `mirror_invariant`, the embedding is the
    mean over the image's mirror images (4 in 2D, 8 in 3D), so a flipped copy embeds exactly like
    its source. A second opinion beside a trained embedder: it finds copies that keep the pixels
    and misses copies that move them (rotations, deformations).

    Args:
        size: the size images are resized to before flattening (area averaging), one number per
            spatial axis; its length sets 2D/3D.
        mirror_invariant: average over mirror images (see above).
        in_channels: image channels.
    """

    training_patients = None
    image_spatial_size = None

    def __init__(
        self, size: Sequence[int] = (16, 16), mirror_invariant: bool = True, in_channels: int = 1
    ) -> None:
        super().__init__()
        if len(size) not in (2, 3) or min(size) < 1:
            raise InputError(f"PixelEmbedder size={list(size)} needs 2 or 3 positive numbers, e.g. [16, 16]")
        self.size = tuple(int(s) for s in size)
        self.spatial_dims = len(self.size)
        self.in_channels = in_channels
        self.mirror_invariant = mirror_invariant
        self.embedding_dim = in_channels * int(torch.tensor(self.size).prod())
        self.register_buffer("_device", torch.zeros(0), persistent=False)  # follows .to(device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self, type(self).__name__)
        images = images.to(self._device.device, torch.float32)
        with torch.no_grad():
            small = F.interpolate(images, size=self.size, mode="area")
            if self.mirror_invariant:
                small = torch.stack(mirror_orbit(small)).mean(dim=0)
        return small.flatten(1)


class TorchScriptEmbedder(nn.Module):
    """A network trained elsewhere, saved with `torch.jit.save`: its `forward(images) -> [B, L]` is `embed`.

    Args:
        path: the TorchScript file.
        spatial_size: the image size it takes (its length sets 2D/3D); the audit and the
            callback check the data against it.
        in_channels: image channels it takes.
    """

    training_patients = None

    def __init__(self, path: str, spatial_size: Sequence[int], in_channels: int = 1) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(
                f"TorchScript embedder {path} does not exist: pass the file written by torch.jit.save"
            )
        try:
            self.network = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as error:  # noqa: BLE001 - torch.jit.load raises RuntimeError and others
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                f"TorchScript embedder {path} cannot be loaded ({first_line}): pass a file written by torch.jit.save"
            ) from None
        self.network.eval()
        self.image_spatial_size = tuple(int(s) for s in spatial_size)
        self.spatial_dims = len(self.image_spatial_size)
        self.in_channels = in_channels
        probe = torch.rand(2, in_channels, *self.image_spatial_size)
        try:
            with torch.no_grad():
                out = self.network(probe)
        except Exception as error:  # noqa: BLE001 - whatever the network raises, the file does not fit
            raise InputError(
                f"TorchScript embedder {path} fails on images [2, {in_channels}, {', '.join(map(str, self.image_spatial_size))}] "
                f"({type(error).__name__}): check its spatial_size and in_channels"
            ) from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != 2:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(
                f"TorchScript embedder {path} returns {shape} for 2 images, not [2, L]: export a network whose "
                "forward returns one embedding vector per image"
            )
        self.embedding_dim = int(out.shape[1])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self, f"TorchScript embedder {self.path}")
        parameter = next(self.network.parameters(), None)
        device = parameter.device if parameter is not None else images.device
        with torch.no_grad():
            return self.network(images.to(device, torch.float32)).float()


def check_images(images: torch.Tensor, embedder: Embedder, name: str) -> None:
    if images.ndim != embedder.spatial_dims + 2 or images.shape[1] != embedder.in_channels:
        raise InputError(
            f"images of shape {list(images.shape)} cannot be embedded by {name} ({embedder.spatial_dims}D, "
            f"{embedder.in_channels} channel(s)): pass [B, {embedder.in_channels}, *spatial]"
        )
