"""One LightningModule per model family; configs name them as `lightning_modules.<Class>`."""

from lightning_modules.autoencoder import AutoencoderModule
from lightning_modules.base import MemwatchModule
from lightning_modules.diffusion import PixelDiffusionModule
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.simclr import SimCLRModule

__all__ = ["AutoencoderModule", "LatentDiffusionModule", "MemwatchModule", "PixelDiffusionModule", "SimCLRModule"]
