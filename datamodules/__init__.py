"""One LightningDataModule per dataset, all sharing `MedicalImageDataModule`."""

from datamodules.base import MedicalImageDataModule
from datamodules.phantom import PhantomDataModule

__all__ = ["MedicalImageDataModule", "PhantomDataModule"]
