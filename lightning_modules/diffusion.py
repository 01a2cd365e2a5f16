"""Unconditional DDPMs: what the latent and the pixel-space model share, and the pixel-space model.

`DiffusionModule` holds MONAI's `DiffusionModelUNet`, DDPM training (noise or v prediction)
and DDIM/DDPM sampling in a space of its subclass's choosing: `LatentDiffusionModule` works in
a frozen autoencoder's latents, `PixelDiffusionModule` (here) on the images themselves, scaled to
`[-1, 1]`. `sample(n, seed)` makes sample `i` a function of `(seed, i)` only, never of the batch
size, the rank or the world size: that is what makes memorization counts identical on 1 or N
processes, for either model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from memwatch.errors import InputError
from memwatch.lightning_modules.base import MemwatchModule, check_spatial_dims, nearest_multiple


def sample_generator(
    seed: int | Sequence[int], index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded from `(seed..., index)` through NumPy's SeedSequence (no collisions between pairs)."""
    entropy = [*(seed if isinstance(seed, Sequence) else [seed]), index]
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


# A membership score's noise comes from its own stream, apart from every sample's `(seed, check, i)`.
MEMBERSHIP_SEED = 0x6D656D62
# Low noise (t = T/10): where a model that memorized denoises its training images better than others
# (loss-based membership inference on diffusion models: Matsumoto et al. 2023; PIA, ICLR 2024). One
# timestep keeps a score at one UNet forward per image.
MEMBERSHIP_TIMESTEP_FRACTIONS = (0.1,)


class DiffusionModule(MemwatchModule):
    """DDPM training and sampling in the space `to_model_space` maps images to.

    Subclasses build `self.unet` (`build_unet`), set `self.spatial_dims`, `self.image_channels`,
    `self.model_channels` and `self.downsample` (model-space size = image size // it), and
    define `to_model_space(images)`, `to_images(x)` (into `[0, 1]`) and `clip_sample`.

    The UNet, noise-schedule and sampling arguments are described here once, for every subclass
    (LightningCLI's help reads base classes' docstrings too). Those whose default is the same for
    every model are declared here; a subclass declares `channels`, `schedule`, `beta_start`,
    `beta_end`, `prediction_type` and `lr` with its own defaults and passes the rest on as keywords.

    Args:
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
        schedule: MONAI noise schedule name, e.g. `linear_beta` or `scaled_linear_beta`.
        beta_start: the schedule's first beta.
        beta_end: the schedule's last beta.
        prediction_type: what the UNet predicts, `epsilon` (the noise) or `v_prediction`.
        lr: Adam learning rate.
        default_sample_batch_size: images per UNet pass when `sample` is called without `sample_batch_size`
            (a memorization check passes its own block, `memorization.sample_batch_size`).
        num_inference_steps: default sampling steps.
        sample_batch_size: the 0.1 spelling of `default_sample_batch_size` (one FutureWarning).
    """

    clip_sample = False  # latents have unit std, not a [-1, 1] range: clipping x0 would distort them
    downsample = 1

    def __init__(
        self,
        *,
        attention_levels: Sequence[bool] | None = None,
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        use_flash_attention: bool | None = None,
        norm_num_groups: int = 32,
        num_train_timesteps: int = 1000,
        default_sample_batch_size: int = 16,
        num_inference_steps: int = 50,
        sample_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        # Saves these and the calling subclass's own arguments (Lightning reads every constructor frame);
        # the UNet, the scheduler and `sample` read them from `self.hparams`.
        self.save_hyperparameters(ignore=["sample_batch_size"])
        if sample_batch_size is not None:  # a 0.1 config or checkpoint
            warnings.warn(
                "model.init_args.sample_batch_size is deprecated: use default_sample_batch_size", FutureWarning, stacklevel=2
            )
            self.hparams.default_sample_batch_size = sample_batch_size

    def build_unet(self, in_channels: int) -> DiffusionModelUNet:
        hp = self.hparams
        if hp.prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"prediction_type={hp.prediction_type!r} must be 'epsilon' or 'v_prediction'")
        if any(c % hp.norm_num_groups for c in hp.channels):
            raise InputError(
                f"channels={list(hp.channels)} must all be multiples of norm_num_groups={hp.norm_num_groups}"
            )
        return DiffusionModelUNet(
            spatial_dims=self.spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(hp.channels),
            attention_levels=tuple(hp.attention_levels)
            if hp.attention_levels
            else (False,) * len(hp.channels),
            num_res_blocks=hp.num_res_blocks,
            num_head_channels=hp.num_head_channels,
            norm_num_groups=hp.norm_num_groups,
            use_flash_attention=torch.cuda.is_available()
            if hp.use_flash_attention is None
            else hp.use_flash_attention,
        )

    def make_scheduler(self, kind: Literal["ddpm", "ddim"]) -> DDPMScheduler | DDIMScheduler:
        """A new DDPM or DDIM scheduler with this model's noise schedule and prediction type: training keeps a
        DDPM one as `self.scheduler`; each `sample` call makes its own, to set its own inference timesteps."""
        hp = self.hparams
        cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
        return cls(
            num_train_timesteps=hp.num_train_timesteps,
            schedule=hp.schedule,
            beta_start=hp.beta_start,
            beta_end=hp.beta_end,
            prediction_type=hp.prediction_type,
            clip_sample=self.clip_sample,
        )

    def check_data(self, datamodule: LightningDataModule) -> None:
        super().check_data(datamodule)
        factor = self.downsample * 2 ** (len(self.hparams.channels) - 1)
        size = list(datamodule.spatial_size)
        if any(s % factor for s in size):
            fixed = [nearest_multiple(s, factor) for s in size]
            parts = (
                f"autoencoder ×{self.downsample}, UNet ×{factor // self.downsample}"
                if self.downsample > 1
                else "the UNet's downsampling"
            )
            raise InputError(
                f"data spatial_size={size} is not divisible by {factor} ({parts}): set --data.init_args.spatial_size {fixed}"
            )

    # --- subclass hooks ------------------------------------------------------------------

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ready_to_sample(self) -> str | None:
        """Why this model cannot sample yet, or `None`."""
        if self.image_spatial_size is None:
            return "this model does not know its image size: sample from a checkpoint written by fit, or fit it first"
        return None

    # --- training ----------------------------------------------------------------------

    def diffusion_loss(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The DDPM loss on model-space images `z` (from `to_model_space`): the mean squared error of the UNet's
        noise (or v) prediction at a random timestep per image, noise and timesteps drawn from `generator`
        (default: torch's global one). `training_step` and `validation_step` log it."""
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
        loss = self.diffusion_loss(self.to_model_space(batch["image"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.can_validate():
            return
        generator = torch.Generator().manual_seed(batch_idx)  # same noise every epoch: comparable curves
        loss = self.diffusion_loss(self.to_model_space(batch["image"]), generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["id"]))

    def can_validate(self) -> bool:
        return True

    # --- membership ----------------------------------------------------------------------

    def membership_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images → the model space without randomness (the LDM encodes to the KL posterior's mean)."""
        return self.to_model_space(images)

    def membership_timesteps(self) -> list[int]:
        """The fixed timesteps a membership score averages over: `MEMBERSHIP_TIMESTEP_FRACTIONS` of the schedule."""
        last = self.scheduler.num_train_timesteps - 1
        return [
            min(last, round(f * self.scheduler.num_train_timesteps)) for f in MEMBERSHIP_TIMESTEP_FRACTIONS
        ]

    @torch.no_grad()
    def membership_scores(
        self, images: torch.Tensor, ids: Sequence[int] | None = None, timesteps: Sequence[int] | None = None
    ) -> torch.Tensor:
        """`[B]`: minus each image's denoising loss at fixed timesteps (higher = more likely a training image).

        Image `k`'s noise at timestep `t` is seeded by `(MEMBERSHIP_SEED, t, ids[k])` (default ids: `0..B-1`), so an
        image's score depends on its id and the weights only: the same at every epoch, in any batch and on any
        number of processes (to float rounding; in fixed blocks, bitwise). The loss is the training loss
        (noise or v, as the model predicts), in eval mode, averaged over the image's elements.
        """
        problem = self.ready_to_sample()
        if problem:
            raise InputError(problem)
        ids = list(range(len(images))) if ids is None else [int(i) for i in ids]
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        steps = self.membership_timesteps() if timesteps is None else [int(t) for t in timesteps]
        was_training = self.training
        self.eval()
        try:
            z = self.membership_space(images.to(self.device)).float()
            losses = torch.zeros(len(z), device=z.device)
            for t in steps:
                noise = torch.stack(
                    [
                        torch.randn(z.shape[1:], generator=sample_generator((MEMBERSHIP_SEED, t), i))
                        for i in ids
                    ]
                ).to(z)
                timestep = torch.full((len(z),), t, device=z.device, dtype=torch.long)
                noisy = self.scheduler.add_noise(original_samples=z, noise=noise, timesteps=timestep)
                target = (
                    noise
                    if self.hparams.prediction_type == "epsilon"
                    else self.scheduler.get_velocity(z, noise, timestep)
                )
                prediction = self.unet(noisy, timesteps=timestep).float()
                losses += (prediction - target.float()).pow(2).flatten(1).mean(1)
        finally:
            self.train(was_training)
        return -losses / len(steps)

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
        decode_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Draw `n` images, `[n, C, *spatial]` in `[0, 1]`, on this module's device.

        Sample `start_index + k` is a function of `(seed, start_index + k)` only: its initial
        noise (and, for DDPM, its per-step noise) comes from its own generator, so it does not
        depend on `sample_batch_size`, on the other samples, on the rank or the world size.
        `seed` may be a tuple, e.g. `(seed, check)`, to draw fresh samples per check.
        DDIM (eta 0) is deterministic given the initial noise. (On a GPU the rounding also depends on
        the batch an image is computed in: the memorization check draws fixed blocks for that.)

        The UNet runs on `sample_batch_size` images at a time and the decoder back to images on
        `decode_batch_size` (default: the same): in 3D the decoder's full-resolution activations, not
        the UNet's, limit the batch. Timesteps are Python ints, read once: nothing is read back from
        the device at a step. Inside `sampler_graphs()` the UNet's forwards replay CUDA graphs.

        Under autocast (e.g. Lightning's `trainer.precision_plugin.forward_context()` with
        `bf16-mixed`) only the UNet (and decoder) forwards run in low precision: the initial and
        per-step noise, the model-space tensors and the scheduler's arithmetic stay float32, and
        the images come back float32.
        """
        problem = self.ready_to_sample()
        if problem:
            raise InputError(problem)
        steps = num_inference_steps or self.hparams.num_inference_steps
        batch_size = self.hparams.default_sample_batch_size if sample_batch_size is None else sample_batch_size
        decode = batch_size if decode_batch_size is None else decode_batch_size
        for name, value in (("sample_batch_size", batch_size), ("decode_batch_size", decode)):
            if value < 1:
                raise InputError(f"{name}={value} must be at least 1")
        if scheduler not in ("ddim", "ddpm"):
            raise InputError(f"scheduler={scheduler!r} must be 'ddim' or 'ddpm'")
        shape = self.model_space_shape()
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self.decode_samples(
                    self.denoise_indices(
                        range(first, min(first + batch_size, start_index + n)), seed, steps, scheduler, shape
                    ),
                    decode,
                )
                for first in range(start_index, start_index + n, batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.image_channels, *self.image_spatial_size)

    def model_space_shape(self) -> tuple[int, ...]:
        """`(channels, *spatial)` of one sample in model space (latents for the LDM, images for the pixel DDPM)."""
        return (self.model_channels, *(s // self.downsample for s in self.image_spatial_size))

    def denoise_indices(
        self, indices: range, seed: int | Sequence[int], steps: int, kind: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The model-space samples `[k, *shape]` of `indices` after `steps` denoising steps with a `kind` ("ddim"
        or "ddpm") scheduler: the first half of `sample`, without its checks and mode switch, for timing apart."""
        scheduler = self.make_scheduler(kind)
        scheduler.set_timesteps(num_inference_steps=steps)  # on the CPU: Python ints, no read-back per step
        timesteps = scheduler.timesteps.tolist()
        x = torch.stack(
            [torch.randn(shape, generator=sample_generator(seed, i), dtype=torch.float32) for i in indices]
        ).to(self.device)
        step_generators = [sample_generator(seed, i, self.device) for i in indices] if kind == "ddpm" else []
        for t in timesteps:
            prediction = self._unet_forward(x, t).float()  # the UNet in the caller's precision
            with torch.autocast(self.device.type, enabled=False):  # the scheduler in float32, always
                if kind == "ddim":
                    x, _ = scheduler.step(prediction, t, x)
                else:
                    x = torch.cat(
                        [
                            scheduler.step(prediction[k : k + 1], t, x[k : k + 1], generator=g)[0]
                            for k, g in enumerate(step_generators)
                        ]
                    )
        return x

    def decode_samples(self, x: torch.Tensor, decode_batch_size: int) -> torch.Tensor:
        """Model-space samples `x` → float32 images in `[0, 1]`, `decode_batch_size` at a time: the second half
        of `sample` (`to_images`, clamped), for timing apart."""
        return torch.cat(
            [
                self.to_images(x[k : k + decode_batch_size]).float().clamp(0.0, 1.0)
                for k in range(0, len(x), decode_batch_size)
            ]
        )

    def _unet_forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        graphs = getattr(self, "_graphs", None)
        if graphs is None:
            return self.unet(x, timesteps=torch.full((len(x),), t, device=x.device, dtype=torch.long))
        key = (
            tuple(x.shape),
            x.dtype,
            torch.is_autocast_enabled(x.device.type),
            torch.get_autocast_dtype(x.device.type),
        )
        if key not in graphs:
            graphs[key] = UNetGraph(self.unet, x, t)
        return graphs[key].replay(x, t)

    @contextmanager
    def sampler_graphs(self) -> Iterator[None]:
        """Inside, `sample` replays each UNet forward from a CUDA graph captured on its first block (one
        per batch shape and precision): no kernel launches from Python at each of the steps. The graphs
        and their memory are released on exit. On a CPU nothing changes."""
        if self.device.type != "cuda":
            yield
            return
        self._graphs: dict | None = {}
        try:
            yield
        finally:
            self._graphs = None

    def probe_sampler_graphs(self, batch_size: int) -> None:
        """Capture the UNet once at `batch_size` under the current autocast and release it: raises
        `InputError` (naming `memorization.sampler_graphs`) when it cannot be captured. A no-op on a CPU."""
        if self.device.type != "cuda":
            return
        shape = (batch_size, *self.model_space_shape())
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                UNetGraph(
                    self.unet, torch.zeros(shape, device=self.device), self.scheduler.num_train_timesteps - 1
                )
        finally:
            self.train(was_training)


class UNetGraph:
    """One UNet forward `unet(x, timesteps=[t] * B)` captured as a CUDA graph, replayed on new `x` and `t`.

    Captured under the caller's autocast with its weight cache off (cached casts would be freed
    when the caller's autocast region ends, and replays would read them). A model whose forward
    cannot be captured (a read-back to the host, a data-dependent shape) raises `InputError`.
    """

    def __init__(self, unet: torch.nn.Module, x: torch.Tensor, t: int) -> None:
        device = x.device.type
        autocast = torch.autocast(
            device,
            dtype=torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        )
        self.x = x.clone()
        self.t = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        self.graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side), autocast:
                for _ in range(2):  # warm-up outside the graph, as torch.cuda.graph asks
                    unet(self.x, timesteps=self.t)
            torch.cuda.current_stream(x.device).wait_stream(side)
            with torch.cuda.graph(self.graph), autocast:
                self.out = unet(self.x, timesteps=self.t)
        except Exception as error:  # noqa: BLE001 - whatever the capture raises, the model cannot be graphed
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                f"memorization.sampler_graphs: the UNet ({type(unet).__name__}) cannot be captured as a CUDA graph "
                f"({text}): set --memorization.sampler_graphs false"
            ) from None

    def replay(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.x.copy_(x)
        self.t.fill_(t)
        self.graph.replay()
        return self.out.clone()


class PixelDiffusionModule(DiffusionModule):
    """An unconditional DDPM on the images themselves (no autoencoder), 2D or 3D, with the LDM's `sample` contract.

    Images in `[0, 1]` are trained on as `2x − 1` (DDPM's `[-1, 1]`, with the predicted clean
    image clipped there while sampling) and sampled back into `[0, 1]`. Without an autoencoder
    every UNet pass runs at full resolution: use it on small images (the phantoms, patches).

    The UNet, schedule and sampling arguments are `DiffusionModule`'s, with pixel-space defaults:
    Ho et al.'s linear betas, and v-prediction at lr 1e-3 (on the phantoms, epsilon prediction at
    2.5e-4 still drew grey, noisy images after 1500 steps; BENCHMARKS.md).

    Args:
        spatial_dims: 2 or 3; must match the data.
        in_channels: image channels.
    """

    train_command = "python cli.py fit --config configs/<dataset>_ddpm.yaml"
    clip_sample = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        schedule: str = "linear_beta",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction",
        lr: float = 1e-3,
        **unet_and_sampling: Any,
    ) -> None:
        super().__init__(**unet_and_sampling)
        check_spatial_dims(spatial_dims)
        self.spatial_dims = spatial_dims
        self.image_channels = self.model_channels = in_channels
        self.unet = self.build_unet(in_channels)
        self.scheduler = self.make_scheduler("ddpm")

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * 2.0 - 1.0

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1.0) / 2.0
