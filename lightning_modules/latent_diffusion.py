"""Second stage: an unconditional DDPM in the latent space of a frozen autoencoder.

MONAI's `DiffusionModelUNet` predicts the noise (or v) added to autoencoder latents
scaled by `1 / std(z)` (Rombach et al. 2022), DDPM training with 1000 steps by default,
DDIM or DDPM sampling. `sample(n, seed)` makes sample `i` a function of `(seed, i)` only,
never of the batch size, the rank or the world size: that is what makes memorization
counts identical on 1 or N processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from errors import InputError
from lightning_modules.autoencoder import AutoencoderModule
from lightning_modules.base import MemwatchModule, nearest_multiple


def sample_generator(
    seed: int | Sequence[int], index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded from `(seed..., index)` through NumPy's SeedSequence (no collisions between pairs)."""
    entropy = [*(seed if isinstance(seed, Sequence) else [seed]), index]
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class LatentDiffusionModule(MemwatchModule):
    """Latent diffusion model over a frozen, checkpointed autoencoder.

    Args:
        autoencoder_ckpt: checkpoint of a trained `AutoencoderModule`; its weights are
            copied into this module (and its checkpoints), then frozen.
        channels: UNet channels per level; the UNet downsamples `len(channels) - 1` times.
        attention_levels: self-attention per UNet level; default none.
        num_res_blocks: residual blocks per UNet level.
        num_head_channels: channels per attention head.
        use_flash_attention: compute the UNet's attention with torch's `scaled_dot_product_attention`
            (flash / memory-efficient kernels on CUDA) instead of MONAI's explicit attention
            matrix; same result to float tolerance. `None` (default) means "where CUDA is
            available", resolved when the module is built, so a checkpoint trained on a GPU
            reloads on a CPU.
        norm_num_groups: GroupNorm groups; must divide every entry of `channels`.
        num_train_timesteps: DDPM steps (1000 as in the paper; its VQ-GAN variant used 300).
        schedule, beta_start, beta_end: noise schedule (MONAI's LDM tutorials' defaults).
        prediction_type: `epsilon` or `v_prediction`.
        lr: Adam learning rate.
        sample_batch_size: images per forward pass in `sample`.
        num_inference_steps: default sampling steps.
        autoencoder_config: the autoencoder's hyperparameters; filled in from
            `autoencoder_ckpt`, saved in this module's checkpoints so they reload without it.
    """

    train_command = "python cli.py fit --config configs/<dataset>_ldm.yaml"

    def __init__(
        self,
        autoencoder_ckpt: str | None = None,
        channels: Sequence[int] = (64, 128),
        attention_levels: Sequence[bool] | None = None,
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        use_flash_attention: bool | None = None,
        norm_num_groups: int = 32,
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        lr: float = 1e-4,
        sample_batch_size: int = 16,
        num_inference_steps: int = 50,
        autoencoder_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
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
        if prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"prediction_type={prediction_type!r} must be 'epsilon' or 'v_prediction'")
        if any(c % norm_num_groups for c in channels):
            raise InputError(
                f"channels={list(channels)} must all be multiples of norm_num_groups={norm_num_groups}"
            )
        self.spatial_dims = autoencoder.spatial_dims
        self.autoencoder_downsample = autoencoder.downsample_factor
        self.latent_channels = autoencoder.latent_channels
        self.image_channels = autoencoder.hparams.in_channels
        self.autoencoder = autoencoder.autoencoder.requires_grad_(False).eval()
        self.unet = DiffusionModelUNet(
            spatial_dims=self.spatial_dims,
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels) if attention_levels else (False,) * len(channels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            use_flash_attention=torch.cuda.is_available()
            if use_flash_attention is None
            else use_flash_attention,
        )
        self.scheduler = self._make_scheduler("ddpm")
        # 0 means "not yet computed"; set from the first training batch, then saved in checkpoints.
        self.register_buffer("scale_factor", torch.tensor(0.0))
        self._scale_known = False

    def _make_scheduler(self, kind: Literal["ddpm", "ddim"]) -> DDPMScheduler | DDIMScheduler:
        hp = self.hparams
        cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
        # Latents have unit std, not a [-1, 1] range: clipping x0 would distort them.
        return cls(
            num_train_timesteps=hp.num_train_timesteps,
            schedule=hp.schedule,
            beta_start=hp.beta_start,
            beta_end=hp.beta_end,
            prediction_type=hp.prediction_type,
            clip_sample=False,
        )

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.autoencoder.eval()  # frozen: a VQ codebook in train mode would keep updating
        return self

    def check_data(self, datamodule: LightningDataModule) -> None:
        super().check_data(datamodule)
        factor = self.autoencoder_downsample * 2 ** (len(self.hparams.channels) - 1)
        size = list(datamodule.spatial_size)
        if any(s % factor for s in size):
            fixed = [nearest_multiple(s, factor) for s in size]
            raise InputError(
                f"data spatial_size={size} is not divisible by {factor} (autoencoder ×{self.autoencoder_downsample}, "
                f"UNet ×{factor // self.autoencoder_downsample}): set --data.init_args.spatial_size {fixed}"
            )

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

    def _diffusion_loss(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            z.shape, generator=generator, device=generator.device if generator else z.device
        ).to(z)
        timesteps = torch.randint(
            0,
            self.scheduler.num_train_timesteps,
            (z.shape[0],),
            generator=generator,
            device=generator.device if generator else z.device,
        ).to(z.device)
        noisy = self.scheduler.add_noise(original_samples=z, noise=noise, timesteps=timesteps)
        prediction = self.unet(noisy, timesteps=timesteps)
        target = (
            noise
            if self.hparams.prediction_type == "epsilon"
            else self.scheduler.get_velocity(z, noise, timesteps)
        )
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._diffusion_loss(self._latents(batch["image"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self._scale_known and self.scale_factor.item() == 0.0:
            return  # sanity check before the first training batch: no scale yet
        generator = torch.Generator().manual_seed(batch_idx)  # same noise every epoch: comparable curves
        loss = self._diffusion_loss(self._latents(batch["image"]), generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["id"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.unet.parameters(), lr=self.hparams.lr)

    # --- sampling ----------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        n: int,
        seed: int | Sequence[int] = 0,
        num_inference_steps: int | None = None,
        scheduler: Literal["ddim", "ddpm"] = "ddim",
        sample_batch_size: int | None = None,
        start_index: int = 0,
    ) -> torch.Tensor:
        """Draw `n` images, `[n, C, *spatial]` in `[0, 1]`, on this module's device.

        Sample `start_index + k` is a function of `(seed, start_index + k)` only: its initial
        noise (and, for DDPM, its per-step noise) comes from its own generator, so it does not
        depend on `sample_batch_size`, on the other samples, on the rank or the world size.
        `seed` may be a tuple, e.g. `(seed, check)`, to draw fresh samples per check.
        DDIM (eta 0) is deterministic given the initial noise.

        Under autocast (e.g. Lightning's `trainer.precision_plugin.forward_context()` with
        `bf16-mixed`) only the UNet and decoder forwards run in low precision: the initial and
        per-step noise, the latents and the scheduler's arithmetic stay float32, and the
        images come back float32.
        """
        if self.image_spatial_size is None:
            raise InputError(
                "this LDM does not know its image size: sample from a checkpoint written by fit, or fit it first"
            )
        if float(self.scale_factor) == 0.0:
            raise InputError("this LDM has no latent scale factor yet: it has not seen a training batch")
        steps = num_inference_steps or self.hparams.num_inference_steps
        batch_size = sample_batch_size or self.hparams.sample_batch_size
        latent_shape = (
            self.latent_channels,
            *(s // self.autoencoder_downsample for s in self.image_spatial_size),
        )
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self._sample_indices(
                    range(first, min(first + batch_size, start_index + n)),
                    seed,
                    steps,
                    scheduler,
                    latent_shape,
                )
                for first in range(start_index, start_index + n, batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.image_channels, *self.image_spatial_size)

    def _sample_indices(
        self, indices: range, seed: int | Sequence[int], steps: int, kind: str, latent_shape: tuple[int, ...]
    ) -> torch.Tensor:
        if kind not in ("ddim", "ddpm"):
            raise InputError(f"scheduler={kind!r} must be 'ddim' or 'ddpm'")
        scheduler = self._make_scheduler(kind)
        scheduler.set_timesteps(num_inference_steps=steps, device=self.device)
        x = torch.stack(
            [
                torch.randn(latent_shape, generator=sample_generator(seed, i), dtype=torch.float32)
                for i in indices
            ]
        ).to(self.device)
        step_generators = [sample_generator(seed, i, self.device) for i in indices] if kind == "ddpm" else []
        for t in scheduler.timesteps:
            timesteps = torch.full((x.shape[0],), int(t), device=self.device, dtype=torch.long)
            prediction = self.unet(x, timesteps=timesteps).float()  # the UNet in the caller's precision
            with torch.autocast(self.device.type, enabled=False):  # the scheduler in float32, always
                if kind == "ddim":
                    x, _ = scheduler.step(prediction, int(t), x)
                else:
                    x = torch.cat(
                        [
                            scheduler.step(prediction[k : k + 1], int(t), x[k : k + 1], generator=g)[0]
                            for k, g in enumerate(step_generators)
                        ]
                    )
        images = self.autoencoder.decode_stage_2_outputs(x / self.scale_factor)
        return images.float().clamp(0.0, 1.0)
