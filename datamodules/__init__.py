"""One LightningDataModule per dataset, all sharing `MedicalImageDataModule`."""

from datamodules.base import MedicalImageDataModule
from datamodules.chestxray import ChestXray14DataModule
from datamodules.dicom import DicomDataModule, is_dicom_folder
from datamodules.folder import FolderDataModule
from datamodules.mrnet import MRNetDataModule
from datamodules.nifti import NiftiDataModule
from datamodules.phantom import PhantomDataModule

__all__ = ["ChestXray14DataModule", "DicomDataModule", "FolderDataModule", "MedicalImageDataModule", "MRNetDataModule", "NiftiDataModule", "PhantomDataModule", "is_dicom_folder"]
