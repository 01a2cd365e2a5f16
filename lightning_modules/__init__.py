"""One LightningModule per model family; configs name them as `lightning_modules.<Class>`."""

from memwatch.lightning_modules.autoencoder import AutoencoderModule
from memwatch.lightning_modules.base import MemwatchModule
from memwatch.lightning_modules.diffusion import PixelDiffusionModule
from memwatch.lightning_modules.latent_diffusion import LatentDiffusionModule
from memwatch.lightning_modules.simclr import SimCLRModule

__all__ = ["AutoencoderModule", "LatentDiffusionModule", "MemwatchModule", "PixelDiffusionModule", "SimCLRModule"]
