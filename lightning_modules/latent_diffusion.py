"""Second stage: an unconditional DDPM in the latent space of a frozen autoencoder.

MONAI's `DiffusionModelUNet` predicts the noise (or v) added to autoencoder latents
scaled by `1 / std(z)` (Rombach et al. 2022), DDPM training with 1000 steps by default,
DDIM or DDPM sampling (`lightning_modules.diffusion.DiffusionModule`, shared with the
pixel-space DDPM). `sample(n, seed)` makes sample `i` a function of `(seed, i)` only, never of
the batch size, the rank or the world size: that is what makes memorization counts identical
on 1 or N processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from memwatch.errors import InputError
from memwatch.lightning_modules.autoencoder import AutoencoderModule, mean_latents
from memwatch.lightning_modules.diffusion import DiffusionModule, sample_generator

__all__ = ["LatentDiffusionModule", "sample_generator"]


class LatentDiffusionModule(DiffusionModule):
    """Latent diffusion model over a frozen, checkpointed autoencoder.

    The UNet, schedule and sampling arguments are `DiffusionModule`'s, with the defaults of
    MONAI's LDM tutorials (scaled linear betas, epsilon prediction).

    Args:
        autoencoder_ckpt: checkpoint of a trained `AutoencoderModule`; its weights are
            copied into this module (and its checkpoints), then frozen.
        autoencoder_config: the autoencoder's hyperparameters; filled in from
            `autoencoder_ckpt`, saved in this module's checkpoints so they reload without it.
    """

    train_command = "python cli.py fit --config configs/<dataset>_ldm.yaml"

    def __init__(
        self,
        autoencoder_ckpt: str | None = None,
        channels: Sequence[int] = (64, 128),
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        lr: float = 1e-4,
        autoencoder_config: dict[str, Any] | None = None,
        **unet_and_sampling: Any,
    ) -> None:
        super().__init__(**unet_and_sampling)
        if autoencoder_config is not None:
            autoencoder = AutoencoderModule.from_hparams(autoencoder_config)
        elif autoencoder_ckpt:
            autoencoder = AutoencoderModule.from_checkpoint(
                autoencoder_ckpt, "model.init_args.autoencoder_ckpt"
            )
            self.hparams["autoencoder_config"] = {
                k: v for k, v in autoencoder.hparams.items() if not k.startswith("_")
            }
        else:
            raise InputError(
                "model.init_args.autoencoder_ckpt is not set: pass the autoencoder's checkpoints/last.ckpt "
                f"(train it with {AutoencoderModule.train_command})"
            )
        self.spatial_dims = autoencoder.spatial_dims
        self.downsample = autoencoder.downsample_factor
        self.model_channels = autoencoder.latent_channels
        self.image_channels = autoencoder.hparams.in_channels
        self.autoencoder = autoencoder.autoencoder.requires_grad_(False).eval()
        self.unet = self.build_unet(self.model_channels)
        self.scheduler = self.make_scheduler("ddpm")
        # 0 means "not yet computed"; set from the first training batch, then saved in checkpoints.
        self.register_buffer("scale_factor", torch.tensor(0.0))
        self._scale_known = False

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.autoencoder.eval()  # frozen: a VQ codebook in train mode would keep updating
        return self

    # --- training ----------------------------------------------------------------------

    @torch.no_grad()
    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        z = self.autoencoder.encode_stage_2_inputs(images).float()
        if not self._scale_known:
            if self.scale_factor.item() == 0.0:
                self._set_scale_factor(z)
            self._scale_known = True
        return z * self.scale_factor

    def _set_scale_factor(self, z: torch.Tensor) -> None:
        stats = torch.stack(
            [z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=z.device)]
        ).double()
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        mean = stats[0] / stats[2]
        std = torch.sqrt(stats[1] / stats[2] - mean**2)
        self.scale_factor.fill_(float(1.0 / std))

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        return self._latents(images)

    @torch.no_grad()
    def membership_space(self, images: torch.Tensor) -> torch.Tensor:
        return mean_latents(self.autoencoder, images) * self.scale_factor

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(x / self.scale_factor)

    def can_validate(self) -> bool:
        return (
            self._scale_known or self.scale_factor.item() != 0.0
        )  # no scale before the first training batch

    def ready_to_sample(self) -> str | None:
        if self.image_spatial_size is None:
            return "this LDM does not know its image size: sample from a checkpoint written by fit, or fit it first"
        if float(self.scale_factor) == 0.0:
            return "this LDM has no latent scale factor yet: it has not seen a training batch"
        return None
