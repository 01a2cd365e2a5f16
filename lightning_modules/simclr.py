"""The self-supervised embedder that copy detection compares images with (SimCLR, NT-Xent).

Chen et al. 2020 (SimCLR) as used by Dar et al., arXiv 2402.01054: the positive pair is
an image and its variation v(image) (flip, ±5° rotation, slight contrast change); the
other 2(K−1) views of the batch are the negatives; NT-Xent at temperature 0.07, Adam 1e-4
with a cosine schedule. 2D: ResNet-50 with a 1-channel stem → 128. 3D: a VQ-GAN-style
conv encoder to 4×4×4×8, then dense layers → 32 (`encoder="conv"`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from monai.networks.nets import ResNet
from torch import nn

from memwatch.errors import InputError
from memwatch.lightning_modules.base import MemwatchModule, check_spatial_dims
from memwatch.memorization.embedders import mirror_images, mirror_orbit
from memwatch.memorization.variation import CONTRAST_GAMMA, variation_transform, vary
from memwatch.networks.conv_encoder import ConvEmbeddingEncoder

# MONAI's ContrastiveLoss takes exp(cos / temperature) without a log-sum-exp: float32
# overflows once 1 / temperature exceeds ~88, so smaller temperatures are refused.
MIN_TEMPERATURE = 0.02


def embedding_std(embeddings: torch.Tensor) -> torch.Tensor:
    """Std over the batch of L2-normalised embeddings `[N, L]`, averaged over the L dimensions.

    The collapse signal: 0 when every image maps to one point, about 1/sqrt(L) when the
    embeddings spread evenly over the sphere.
    """
    return F.normalize(embeddings.float(), dim=1).std(dim=0).mean()


def top1_retrieval(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Fraction of queries `[N, L]` whose most cosine-similar row of `references` `[N, L]` is their own."""
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(references.float(), dim=1).T
    return (similarity.argmax(dim=1) == torch.arange(len(queries), device=queries.device)).float().mean()


def _id_key(image_id: str) -> int:
    """A 63-bit key of an image id, equal on every process (Python's `hash` of a str is not)."""
    return int.from_bytes(hashlib.blake2b(str(image_id).encode(), digest_size=8).digest(), "little") >> 1


class Representation(nn.Module):
    """What `SimCLRModule.embed` computes, as a plain module (the one `export_torchscript` traces)."""

    def __init__(
        self, encoder: nn.Module, standardize: nn.Module, flip_invariant: bool, standardize_input: bool
    ) -> None:
        super().__init__()
        self.encoder, self.standardize = encoder, standardize
        self.flip_invariant, self.standardize_input = flip_invariant, standardize_input

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.standardize_input:
            spatial = tuple(range(2, images.ndim))
            mean, std = images.mean(dim=spatial, keepdim=True), images.std(dim=spatial, keepdim=True)
            images = (images - mean) / std.clamp_min(1e-3)
        if not self.flip_invariant:
            embeddings = self.encoder(images)
        elif self._normalizes_by_batch():
            # A BatchNorm that normalises by its batch (training) must see the whole orbit as one batch,
            # and update its running statistics once, for training to stay what it was.
            orbit = mirror_orbit(images)
            embeddings = self.encoder(torch.cat(orbit)).unflatten(0, (len(orbit), -1)).mean(dim=0)
        else:
            embeddings = self._orbit_mean(images)
        return self.standardize(embeddings)

    def _orbit_mean(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the encoder's embeddings over the mirror images, embedded one at a time.

        Each flipped copy and its activations are dropped before the next is made, so memory is
        that of one `encoder(images)`; under `torch.jit.trace` the loop unrolls (4 or 8 passes).
        """
        total, count = None, 0
        for view in mirror_images(images):
            embedding = self.encoder(view)
            del view
            total = embedding if total is None else total + embedding
            count += 1
        return total / count

    def _normalizes_by_batch(self) -> bool:
        """Whether the encoder's output for an image depends on the rest of its batch (BatchNorm in training)."""
        return any(
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (module.training or not module.track_running_stats)
            for module in self.encoder.modules()
        )


class SimCLRModule(MemwatchModule):
    """Contrastive embedder: `embed(images [B, C, *spatial]) -> [B, embedding_dim]`.

    Negatives come from the whole global batch: under DDP each process's embeddings (of
    both views) are all-gathered with their gradients before NT-Xent (`gather_negatives`),
    so N processes × `batch_size` images train like one process with N × `batch_size`
    images, the paper's single-GPU batch (the same loss and gradient, checked in
    tests/test_ddp_training.py; the ResNet's BatchNorm statistics stay per process unless
    `--trainer.sync_batchnorm true`). Images that DistributedSampler repeats to pad the last
    batches of an epoch are counted once (by `id`), so no image is its own negative, and
    processes may hold batches of different sizes. Validation keeps each process's own
    batch as negatives (no collectives in `validation_step`): `val/loss` is the mean over
    processes of the per-batch NT-Xent, which depends on the per-process batch size.

    Args:
        spatial_dims: 2 or 3; must match the data.
        in_channels: image channels.
        embedding_dim: length L of the embedding (the paper: 128 in 2D, 32 in 3D).
        encoder: `resnet` for MONAI's `ResNet` (the paper's 2D choice), `conv` for
            `ConvEmbeddingEncoder` (the paper's 3D choice).
        resnet_block: `basic` or `bottleneck` ResNet blocks (`resnet` only).
        resnet_layers: blocks in each of the 4 ResNet stages; (3, 4, 6, 3) with
            bottleneck blocks is ResNet-50 (`resnet` only).
        channels: the 4 ResNet stage widths (`block_inplanes`), or the conv encoder's
            channels per downsampling level (multiples of 8), e.g. (32, 64, 128).
        hidden_dim: width of the conv encoder's hidden dense layer (`conv` only).
        temperature: NT-Xent temperature, at least 0.02.
        lr: Adam learning rate, the peak of the cosine schedule.
        weight_decay: Adam weight decay.
        gather_negatives: under DDP, take the negatives from every process's batch (default);
            `False` uses each process's own batch only.
        projection_dim: length of the projection head's output, on which NT-Xent is computed
            (an MLP `embedding_dim → embedding_dim → projection_dim`, as SimCLR); 0 trains on
            the representation itself. `embed()` always returns the representation before the
            head, which SimCLR found to transfer better.
        brightness_shift: training only: each variation also gets a uniform intensity offset
            within ±this (then clipped to `[0, 1]`), so copies of another brightness still pair.
        standardize_embedding: end the representation with a BatchNorm without affine
            parameters: each of the L entries is centred and scaled by its running mean and std
            over the training images, so that the direction every embedding shares does not
            make all Pearson correlations high (it would compress the gap between copies and
            novel images against τ).
        contrast_gamma: training only: the range of the variation's contrast gamma
            (`variation_transform`'s; the paper's "slight contrast change" by default).
        flip_invariant: the representation is the mean of the encoder's embeddings of the image
            and its mirror images along every spatial axis (4 in 2D, 8 in 3D), so a flipped copy
            embeds exactly like its source: the network need not learn the flip of the
            paper's variation. The mirror images are embedded one at a time, so memory is as
            without it and time is proportional to the orbit (4× in 2D, 8× in 3D), in `embed` and in
            training; an encoder with BatchNorm in training mode (the ResNet) instead embeds the
            orbit as one batch, as its batch statistics need, with the orbit's memory.
        standardize_input: each image is centred and scaled to unit std (per channel) before the
            encoder, so a brightness offset or a linear contrast change does not move its embedding.
        orbit_in_training: with `flip_invariant`, whether training (and `val/loss`) also averages
            over the mirror images. `False` trains on single views, which the variation flips along
            every axis (p=0.5), and averages over the orbit in `embed` only: training then costs
            and needs the memory it would without `flip_invariant` (8× less time in 3D, and 8× less
            activation memory for an encoder whose backward keeps every mirror image's activations).

    Attributes:
        training_patients: sorted patient ids of the DataModule's training images at fit
            (`train_patients`), kept in checkpoints as `checkpoint["memwatch"]["training_patients"]`; `None`
            when unknown (an older checkpoint, or a fit without a memwatch DataModule). A later
            stage refuses an embedder whose training patients overlap its validation patients.
    """

    train_command = "python cli.py fit --config configs/<dataset>_simclr.yaml"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        embedding_dim: int = 128,
        encoder: Literal["resnet", "conv"] = "resnet",
        resnet_block: Literal["basic", "bottleneck"] = "bottleneck",
        resnet_layers: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (64, 128, 256, 512),
        hidden_dim: int = 256,
        temperature: float = 0.07,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        gather_negatives: bool = True,
        projection_dim: int = 0,
        brightness_shift: float = 0.0,
        contrast_gamma: Sequence[float] = CONTRAST_GAMMA,
        standardize_embedding: bool = False,
        flip_invariant: bool = False,
        standardize_input: bool = False,
        orbit_in_training: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_spatial_dims(spatial_dims)
        for name, value in (
            ("in_channels", in_channels),
            ("embedding_dim", embedding_dim),
            ("hidden_dim", hidden_dim),
        ):
            if value < 1:
                raise InputError(f"{name}={value} must be at least 1: set --model.init_args.{name}")
        if not temperature >= MIN_TEMPERATURE:
            raise InputError(
                f"temperature={temperature} must be at least {MIN_TEMPERATURE} (NT-Xent overflows float32 below "
                "about 0.012): set --model.init_args.temperature, e.g. 0.07"
            )
        if not lr > 0 or not weight_decay >= 0:
            raise InputError(f"lr={lr} must be positive and weight_decay={weight_decay} non-negative")
        if len(contrast_gamma) != 2 or not 0 < contrast_gamma[0] <= 1 <= contrast_gamma[1]:
            raise InputError(
                f"contrast_gamma={list(contrast_gamma)} must be [low, high] with 0 < low <= 1 <= high: "
                "set --model.init_args.contrast_gamma, e.g. [0.8, 1.25]"
            )
        self.variation = variation_transform(
            spatial_dims, contrast_gamma=tuple(float(g) for g in contrast_gamma)
        )
        if projection_dim < 0:
            raise InputError(
                f"projection_dim={projection_dim} must be 0 (no head) or positive: set --model.init_args.projection_dim"
            )
        if not 0 <= brightness_shift < 1:
            raise InputError(
                f"brightness_shift={brightness_shift} must lie in [0, 1): set --model.init_args.brightness_shift, e.g. 0.1"
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        channels = [int(c) for c in channels]
        if encoder == "resnet":
            self.encoder = self._resnet(resnet_block, [int(n) for n in resnet_layers], channels)
        elif encoder == "conv":
            self.encoder = ConvEmbeddingEncoder(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                channels=channels,
                embedding_dim=embedding_dim,
                hidden_dim=hidden_dim,
            )
        else:
            raise InputError(f"encoder={encoder!r} must be 'resnet' or 'conv'")
        self.standardize = (
            nn.BatchNorm1d(embedding_dim, affine=False) if standardize_embedding else nn.Identity()
        )
        self.projection = (
            nn.Sequential(
                nn.Linear(embedding_dim, embedding_dim),
                nn.ReLU(inplace=True),
                nn.Linear(embedding_dim, projection_dim),
            )
            if projection_dim
            else nn.Identity()
        )
        self.nt_xent = ContrastiveLoss(temperature=temperature)

    def _resnet(self, block: str, layers: list[int], channels: list[int]) -> ResNet:
        if block not in ("basic", "bottleneck"):
            raise InputError(f"resnet_block={block!r} must be 'basic' or 'bottleneck'")
        if len(layers) != 4 or min(layers) < 1:
            raise InputError(
                f"resnet_layers={layers} must be 4 positive block counts, e.g. [3, 4, 6, 3] (ResNet-50)"
            )
        if len(channels) != 4 or min(channels) < 1:
            raise InputError(
                f"channels={channels} must be 4 positive ResNet stage widths, e.g. [64, 128, 256, 512]"
            )
        return ResNet(
            block=block,
            layers=layers,
            block_inplanes=channels,
            spatial_dims=self.spatial_dims,
            n_input_channels=self.in_channels,
            conv1_t_stride=2,  # MONAI defaults to 1; torchvision's ResNet-50 stem has stride 2
            num_classes=self.hparams.embedding_dim,
        )

    # --- the interface the memorization callback and audit use -------------------------

    def embed(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Raw (not normalised) embeddings `[B, embedding_dim]` float32 of images `[B, C, *spatial]` in `[0, 1]`.

        Runs in eval mode without grad on the module's device, `batch_size` images at a time
        (the images may stay on the CPU: each chunk is moved on its own), then restores each
        submodule's train/eval state. The result is on the module's device.
        """
        if images.ndim != self.spatial_dims + 2 or images.shape[1] != self.in_channels:
            raise InputError(
                f"images of shape {list(images.shape)} cannot be embedded by a {self.spatial_dims}D embedder "
                f"with {self.in_channels} channel(s): pass [B, {self.in_channels}, *spatial]"
            )
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} must be at least 1")
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            parameter = next(self.encoder.parameters())
            with torch.no_grad():
                chunks = [
                    self.represent(
                        images[start : start + batch_size].to(device=parameter.device, dtype=parameter.dtype)
                    ).float()
                    for start in range(0, len(images), batch_size)
                ]
            if not chunks:
                return torch.empty(0, self.hparams.embedding_dim, device=parameter.device)
            return torch.cat(chunks)
        finally:
            for module, training in modes:
                module.training = training

    def represent(self, images: torch.Tensor) -> torch.Tensor:
        """The representation `[B, embedding_dim]` that `embed` returns (see `flip_invariant`, `standardize_input`)."""
        return self.representation()(images)

    def representation(self, training: bool = False) -> Representation:
        """What `embed` computes, as one module over this module's networks: the module `export_torchscript`
        traces. `training=True` gives what training embeds instead (no orbit with `orbit_in_training` false)."""
        flip_invariant = bool(self.hparams.get("flip_invariant"))
        if training:
            flip_invariant = flip_invariant and bool(self.hparams.get("orbit_in_training", True))
        return Representation(
            self.encoder, self.standardize, flip_invariant, bool(self.hparams.get("standardize_input"))
        )

    def export_torchscript(self, path: str | Path) -> Path:
        """Save what `embed` computes as a TorchScript file (traced), for `TorchScriptEmbedder` or use elsewhere."""
        size = self.image_spatial_size or (32,) * self.spatial_dims
        example = torch.rand(2, self.in_channels, *size, device=next(self.parameters()).device)
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                traced = torch.jit.trace(self.representation(), example)
        finally:
            for module, training in modes:
                module.train(training)
        torch.jit.save(traced, str(path))
        return Path(path)

    # --- training ----------------------------------------------------------------------

    def positive_views(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """The positive views training pairs `images` with: `vary(images)` under `seed`, plus a brightness offset
        per image when `brightness_shift` > 0."""
        variations = vary(images, seed=seed, transform=self.variation)
        shift = self.hparams.get("brightness_shift", 0.0)
        if shift:
            generator = torch.Generator().manual_seed(seed)
            offsets = (torch.rand(len(images), generator=generator) * 2 - 1) * shift
            shape = (len(images),) + (1,) * (images.ndim - 1)
            variations = (variations + offsets.view(shape).to(variations)).clamp(0.0, 1.0)
        return variations

    def _embed_pairs(self, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Representations of the images and of their variations, `[K, L]` each, in one forward pass."""
        views = torch.cat([images, self.positive_views(images, seed)])
        embeddings = self.representation(training=True)(views).float()
        return embeddings[: len(images)], embeddings[len(images) :]

    def _gathered(self, originals: torch.Tensor, variations: torch.Tensor, ids: list[str] | None):
        """Both views' embeddings of the global batch, `[N, L]` each, with gradients; the local ones without DDP.

        Sizes may differ across processes (padded before `all_gather`, as gloo needs equal
        sizes); a repeated `id` (DistributedSampler's padding) keeps its first occurrence.
        """
        if not self.hparams.gather_negatives or self._trainer is None or self.trainer.world_size < 2:
            return originals, variations
        length = originals.shape[1]
        sizes = self.all_gather(torch.tensor(len(originals), device=originals.device)).flatten()
        padding = int(sizes.max()) - len(originals)
        pairs = F.pad(torch.cat([originals, variations], dim=1), (0, 0, 0, padding))
        pairs = self.all_gather(pairs, sync_grads=True)  # [world_size, longest, 2L]
        valid = torch.arange(pairs.shape[1], device=pairs.device) < sizes[:, None]
        pairs = pairs[valid]
        if ids is not None:
            keys = torch.tensor([_id_key(i) for i in ids], dtype=torch.int64, device=originals.device)
            keys = self.all_gather(F.pad(keys, (0, padding)))[valid]
            _, inverse = torch.unique(keys, return_inverse=True)
            order = torch.arange(len(keys), device=keys.device)
            first = torch.full((int(inverse.max()) + 1,), len(keys), device=keys.device)
            pairs = pairs[first.scatter_reduce(0, inverse, order, "amin").sort().values]
        return pairs[:, :length], pairs[:, length:]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # vary() draws its seed from torch's global generator, which seed_everything makes equal on
        # every rank; the rank is added so that processes vary their images independently (no
        # change on one process).
        seed = (int(torch.randint(0, 2**31 - 1, ())) + self.global_rank) % (2**31 - 1)
        originals, variations = self._embed_pairs(batch["image"], seed=seed)
        health = embedding_std(torch.cat([originals, variations]).detach())
        # Gradient scale under DDP: every rank computes this same loss over the gathered batch, and
        # all_gather's backward sums the world_size copies of dL/d(own embeddings), so each rank holds
        # world_size × its share of the gradient; DDP's mean over ranks then gives exactly the sum of the
        # shares, the one-process gradient over the concatenated batch. Hence no rescaling.
        originals, variations = self._gathered(
            self.projection(originals), self.projection(variations), batch.get("id")
        )
        loss = self.nt_xent(originals, variations)
        batch_size = len(originals)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/embedding_std", health, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # A fixed seed per batch keeps the validation views, and so val/loss, comparable across epochs.
        originals, variations = self._embed_pairs(batch["image"], seed=batch_idx)
        batch_size = len(originals)
        self.log(
            "val/loss",
            self.nt_xent(self.projection(originals), self.projection(variations)),
            prog_bar=True,
            sync_dist=True,
            batch_size=batch_size,
        )
        self.log(
            "val/top1_retrieval", top1_retrieval(variations, originals), sync_dist=True, batch_size=batch_size
        )

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> SimCLRModule:
        # Checkpoints written before the projection head and brightness options were added lack them.
        return super().from_hparams(
            {
                "projection_dim": 0,
                "brightness_shift": 0.0,
                "contrast_gamma": CONTRAST_GAMMA,
                "standardize_embedding": False,
                "flip_invariant": False,
                "standardize_input": False,
                "orbit_in_training": True,
                **hparams,
            }
        )

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise InputError(
                "the cosine learning-rate schedule needs a finite run: set --trainer.max_epochs or --trainer.max_steps"
            )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
