"""One LightningDataModule per dataset, all sharing `MedicalImageDataModule`."""

from datamodules.base import MedicalImageDataModule
from datamodules.chestxray import ChestXray14DataModule
from datamodules.folder import FolderDataModule
from datamodules.mrnet import MRNetDataModule
from datamodules.nifti import NiftiDataModule
from datamodules.phantom import PhantomDataModule

__all__ = ["ChestXray14DataModule", "FolderDataModule", "MedicalImageDataModule", "MRNetDataModule", "NiftiDataModule", "PhantomDataModule"]
