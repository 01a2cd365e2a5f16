"""One LightningDataModule per dataset, all sharing `MedicalImageDataModule`."""

from datamodules.base import MedicalImageDataModule
from datamodules.folder import FolderDataModule
from datamodules.phantom import PhantomDataModule

__all__ = ["FolderDataModule", "MedicalImageDataModule", "PhantomDataModule"]
