"""First stage: a KL-regularised VAE or a VQ-GAN that maps images to the latent space of the LDM.

MONAI's `AutoencoderKL` / `VQVAE` as generator, MONAI's `PatchDiscriminator` with
`PatchAdversarialLoss` (least squares) after a warm-up, L1 reconstruction, KL weight or
VQ commitment, and an optional perceptual loss that needs local weights (nothing is
downloaded). Rombach et al. 2022 (LDM) and MONAI's 2D/3D LDM tutorials.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.strategies import DDPStrategy
from monai.losses import PatchAdversarialLoss, PerceptualLoss
from monai.networks.nets import VQVAE, AutoencoderKL, PatchDiscriminator

from memwatch.errors import InputError
from memwatch.lightning_modules.base import MemwatchModule, check_spatial_dims, nearest_multiple


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


def mean_latents(network: AutoencoderKL | VQVAE, images: torch.Tensor) -> torch.Tensor:
    """MONAI autoencoder's latents of `images` without randomness: KL, the posterior's mean; VQ, the codes."""
    if isinstance(network, AutoencoderKL):
        return network.encode(images)[0]
    return network.encode_stage_2_inputs(images)


class AutoencoderModule(MemwatchModule):
    """KL-VAE (`kind="kl"`) or VQ-GAN (`kind="vq"`) in 2D or 3D, trained with manual optimization.

    Args:
        kind: `kl` for MONAI `AutoencoderKL`, `vq` for MONAI `VQVAE`.
        spatial_dims: 2 or 3; must match the data.
        in_channels: image channels.
        channels: feature channels per level. KL downsamples `len(channels) - 1` times,
            VQ `len(channels)` times.
        latent_channels: latent channels (KL), or the codebook vector size (VQ).
        num_res_blocks: residual blocks per level.
        attention_levels: self-attention per level (KL only); default none.
        use_flash_attention: compute that attention with torch's `scaled_dot_product_attention`
            (flash / memory-efficient kernels) instead of MONAI's explicit attention matrix
            (KL only); `None` (default) means "where CUDA is available". Resolved when the
            module is built, so a checkpoint trained on a GPU reloads on a CPU.
        norm_num_groups: GroupNorm groups (KL only); must divide every entry of `channels`.
        num_embeddings: codebook size (VQ only).
        kl_weight: weight of the KL term (KL only).
        commitment_cost: VQ commitment cost (VQ only).
        adv_weight: weight of the adversarial term; 0 disables the discriminator.
        adv_warmup_steps: training batches before the adversarial term starts.
        disc_channels: discriminator base channels.
        disc_layers: discriminator layers.
        perceptual_weight: weight of MONAI's perceptual loss; 0 (default) disables it.
        perceptual_network: MONAI `PerceptualLoss` network type.
        perceptual_weights_path: local weights for it (a torchvision `resnet50` state dict,
            or a torch.hub folder holding the RadImageNet/MedicalNet repository and weights).
        lr: generator learning rate (Adam).
        disc_lr: discriminator learning rate (Adam).

    Under DDP (`--trainer.strategy ddp`) the module turns on DDP's unused-parameter
    detection itself when it has a discriminator (see `setup`); nothing to add to a config.
    """

    train_command = "python cli.py fit --config configs/<dataset>_ae.yaml"

    def __init__(
        self,
        kind: Literal["kl", "vq"] = "kl",
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        latent_channels: int = 3,
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] | None = None,
        use_flash_attention: bool | None = None,
        norm_num_groups: int = 32,
        num_embeddings: int = 256,
        kl_weight: float = 1e-6,
        commitment_cost: float = 0.25,
        adv_weight: float = 0.01,
        adv_warmup_steps: int = 500,
        disc_channels: int = 32,
        disc_layers: int = 3,
        perceptual_weight: float = 0.0,
        perceptual_network: str = "resnet50",
        perceptual_weights_path: str | None = None,
        lr: float = 1e-4,
        disc_lr: float = 1e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        check_spatial_dims(spatial_dims)
        self.kind = kind
        self.spatial_dims = spatial_dims
        channels = tuple(channels)
        if kind == "kl":
            if any(c % norm_num_groups for c in channels):
                raise InputError(
                    f"channels={list(channels)} must all be multiples of norm_num_groups={norm_num_groups}"
                )
            self.autoencoder = AutoencoderKL(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=in_channels,
                channels=channels,
                latent_channels=latent_channels,
                num_res_blocks=num_res_blocks,
                attention_levels=tuple(attention_levels) if attention_levels else (False,) * len(channels),
                norm_num_groups=norm_num_groups,
                with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False,
                use_flash_attention=torch.cuda.is_available()
                if use_flash_attention is None
                else use_flash_attention,
            )
            self.downsample_factor = 2 ** (len(channels) - 1)
        elif kind == "vq":
            self.autoencoder = VQVAE(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=in_channels,
                channels=channels,
                num_res_layers=num_res_blocks,
                num_res_channels=channels,
                downsample_parameters=((2, 4, 1, 1),) * len(channels),
                upsample_parameters=((2, 4, 1, 1, 0),) * len(channels),
                num_embeddings=num_embeddings,
                embedding_dim=latent_channels,
                commitment_cost=commitment_cost,
            )
            self.downsample_factor = 2 ** len(channels)
        else:
            raise InputError(f"kind={kind!r} must be 'kl' or 'vq'")
        self.latent_channels = latent_channels
        self.discriminator = (
            PatchDiscriminator(
                spatial_dims=spatial_dims,
                channels=disc_channels,
                in_channels=in_channels,
                num_layers_d=disc_layers,
            )
            if adv_weight > 0
            else None
        )
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
        self.perceptual_loss = self._perceptual_loss() if perceptual_weight > 0 else None

    def _perceptual_loss(self) -> PerceptualLoss:
        path = self.hparams.perceptual_weights_path
        if not path:
            raise InputError(
                f"perceptual_weight={self.hparams.perceptual_weight} needs local pretrained weights and nothing is "
                "downloaded: set --model.init_args.perceptual_weights_path, or perceptual_weight 0"
            )
        network = self.hparams.perceptual_network
        location = {"pretrained_path": path} if network == "resnet50" else {"cache_dir": path}
        try:
            loss = PerceptualLoss(
                spatial_dims=self.spatial_dims,
                network_type=network,
                is_fake_3d=self.spatial_dims == 3 and not network.startswith("medicalnet"),
                **location,
            )
        except Exception as error:  # noqa: BLE001 - MONAI raises many types for a missing/bad file
            raise InputError(
                f"perceptual_weights_path={path} could not be loaded for {network} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}): give weights on disk or set perceptual_weight 0"
            ) from None
        return loss.eval().requires_grad_(False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy
        if stage == "fit" and self.discriminator is not None and isinstance(strategy, DDPStrategy):
            # Each backward pass leaves the other network's parameters unused (the discriminator before
            # warm-up and in the generator pass, the generator in the discriminator pass): DDP must find
            # them or it waits for their gradients. Set here, before the strategy wraps the model; Lightning
            # has no public setter for the DDP arguments of a strategy already built.
            if strategy._ddp_kwargs.get("find_unused_parameters") is False or strategy._ddp_kwargs.get(
                "static_graph"
            ):
                raise InputError(
                    "the autoencoder's discriminator needs DDP's unused-parameter detection, which this strategy "
                    "turns off: use --trainer.strategy ddp (the module turns it on itself)"
                )
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def check_data(self, datamodule: LightningDataModule) -> None:
        super().check_data(datamodule)
        size = list(datamodule.spatial_size)
        if any(s % self.downsample_factor for s in size):
            fixed = [nearest_multiple(s, self.downsample_factor) for s in size]
            raise InputError(
                f"data spatial_size={size} is not divisible by {self.downsample_factor}, the autoencoder's "
                f"downsampling factor: set --data.init_args.spatial_size {fixed}"
            )
        if self.discriminator is not None and min(size) < 4 * 2**self.hparams.disc_layers:
            raise InputError(
                f"data spatial_size={size} is too small for a {self.hparams.disc_layers}-layer patch discriminator "
                f"(needs at least {4 * 2**self.hparams.disc_layers} per axis): lower --model.init_args.disc_layers"
            )

    # --- the interface the LDM uses ----------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, *spatial]` → latents `[B, latent_channels, *spatial / downsample_factor]`.

        KL: a sample of the posterior (as the LDM is trained on); VQ: the quantized codes.
        """
        return self.autoencoder.encode_stage_2_inputs(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images `[B, C, *spatial]` (not clipped)."""
        return self.autoencoder.decode_stage_2_outputs(latents)

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """Images → latents without randomness: KL, the posterior's mean; VQ, the quantized codes."""
        return mean_latents(self.autoencoder, images)

    @torch.no_grad()
    def membership_scores(self, images: torch.Tensor, ids: Sequence[int] | None = None) -> torch.Tensor:
        """`[B]`: minus each image's mean squared reconstruction error (higher = more likely a training image).

        Deterministic (the KL posterior's mean, in eval mode), so `ids` (the generator protocol's noise seeds)
        are not needed.
        """
        was_training = self.training
        self.eval()
        try:
            reconstruction = self.decode(self.encode_mean(images)).float()
        finally:
            self.train(was_training)
        return -(reconstruction - images.float()).pow(2).flatten(1).mean(1)

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, regularisation loss): the KL term times its weight, or the VQ loss."""
        if self.kind == "kl":
            reconstruction, z_mu, z_sigma = self.autoencoder(images)
            return reconstruction, self.hparams.kl_weight * kl_divergence(z_mu, z_sigma)
        reconstruction, quantization_loss = self.autoencoder(images)
        return reconstruction, quantization_loss

    # --- training ----------------------------------------------------------------------

    def _adversarial_active(self) -> bool:
        return (
            self.discriminator is not None
            and self.trainer.fit_loop.total_batch_idx >= self.hparams.adv_warmup_steps
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        adversarial = self._adversarial_active()

        # Toggling makes each pass compute gradients for its own optimizer's parameters only: the
        # generator pass leaves the discriminator's weights without gradients, and vice versa.
        self.toggle_optimizer(opt_g)
        reconstruction, regularisation = self.reconstruct(images)
        l1 = F.l1_loss(reconstruction.float(), images.float())
        loss_g = l1 + regularisation
        if self.perceptual_loss is not None:
            loss_g = loss_g + self.hparams.perceptual_weight * self.perceptual_loss(
                reconstruction.float(), images.float()
            )
        if adversarial:
            logits_fake = self.discriminator(reconstruction.contiguous().float())[-1]
            generator_adv = self.adversarial_loss(logits_fake, target_is_real=True, for_discriminator=False)
            loss_g = loss_g + self.hparams.adv_weight * generator_adv
            self.log("train/adv_g", generator_adv, batch_size=len(images))
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        if adversarial:
            self.toggle_optimizer(opt_d)
            logits_fake = self.discriminator(reconstruction.contiguous().detach().float())[-1]
            logits_real = self.discriminator(images.contiguous().detach().float())[-1]
            loss_d = 0.5 * (
                self.adversarial_loss(logits_fake, target_is_real=False, for_discriminator=True)
                + self.adversarial_loss(logits_real, target_is_real=True, for_discriminator=True)
            )
            opt_d.zero_grad()
            self.manual_backward(self.hparams.adv_weight * loss_d)
            # Stepped through the strategy, not `opt_d.step()`, so that global_step counts
            # batches rather than optimizer calls (Lightning issue #17958).
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None, model=self)
            self.untoggle_optimizer(opt_d)
            self.log("train/adv_d", loss_d, batch_size=len(images))

        self.log("train/l1", l1, prog_bar=True, batch_size=len(images))
        self.log("train/regularisation", regularisation, batch_size=len(images))
        return loss_g

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        reconstruction = self.decode(self.encode_mean(images))
        l1 = F.l1_loss(reconstruction.float(), images.float())
        self.log("val/l1", l1, prog_bar=True, sync_dist=True, batch_size=len(images))

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.autoencoder.parameters(), lr=self.hparams.lr)
        if self.discriminator is None:
            return opt_g
        return [opt_g, torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.disc_lr)]
