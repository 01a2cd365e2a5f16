"""The paper's 3D embedder encoder: VQ-GAN-style convolutions down to a 4×4×4×8 code, then dense layers.

Dar et al., arXiv 2402.01054: "a VQ-GAN-style conv encoder down to 4×4×4 with 8 channels,
flatten, dense layers to a 32-vector". MONAI has the blocks but not this head, hence a
small module of our own; it works in 2D (a 4×4×8 code) as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.factories import Pool
from torch import nn

from memwatch.errors import InputError


class ConvEmbeddingEncoder(nn.Module):
    """Images `[B, C, *spatial]` → embeddings `[B, embedding_dim]`.

    A stem convolution to `channels[0]`, then per entry of `channels` one residual unit
    that halves every spatial size (stride 2), GroupNorm and SiLU as in VQ-GAN; an adaptive
    average pool to `pooled_size` per axis, a 1×1 convolution to `code_channels`, flatten
    (`code_channels · pooled_size^spatial_dims` values: 512 in 3D, 128 in 2D), and two
    dense layers (`hidden_dim`, then `embedding_dim`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: feature channels per downsampling level, each a multiple of `norm_num_groups`.
        embedding_dim: length of the output vector (the paper's L: 32 in 3D).
        hidden_dim: width of the hidden dense layer.
        pooled_size: spatial size per axis of the code.
        code_channels: channels of the code.
        norm_num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        embedding_dim: int = 32,
        hidden_dim: int = 256,
        pooled_size: int = 4,
        code_channels: int = 8,
        norm_num_groups: int = 8,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims={spatial_dims} must be 2 or 3")
        if not channels or any(c % norm_num_groups for c in channels) or min(channels) < 1:
            raise InputError(
                f"channels={list(channels)} must be one or more positive multiples of norm_num_groups={norm_num_groups}"
            )
        sizes = {
            "in_channels": in_channels,
            "embedding_dim": embedding_dim,
            "hidden_dim": hidden_dim,
            "pooled_size": pooled_size,
            "code_channels": code_channels,
        }
        for name, value in sizes.items():
            if value < 1:
                raise InputError(f"{name}={value} must be at least 1")
        norm = ("group", {"num_groups": norm_num_groups})
        layers: list[nn.Module] = [
            Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, act="SWISH", norm=norm)
        ]
        for previous, current in zip((channels[0], *channels[:-1]), channels, strict=True):
            layers.append(ResidualUnit(spatial_dims, previous, current, strides=2, act="SWISH", norm=norm))
        self.features = nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](pooled_size)
        self.to_code = Convolution(spatial_dims, channels[-1], code_channels, kernel_size=1, conv_only=True)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(code_channels * pooled_size**spatial_dims, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, embedding_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, in_channels, *spatial]` → `[B, embedding_dim]`, for any spatial size."""
        return self.head(self.to_code(self.pool(self.features(images))))
