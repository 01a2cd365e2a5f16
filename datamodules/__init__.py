"""One LightningDataModule per dataset, all sharing `MedicalImageDataModule`; file readers in `datamodules.readers`."""

from datamodules.base import MedicalImageDataModule
from datamodules.chestxray import ChestXray14DataModule
from datamodules.dicom import DicomDataModule
from datamodules.folder import FolderDataModule
from datamodules.mrnet import MRNetDataModule
from datamodules.nifti import NiftiDataModule
from datamodules.phantom import PhantomDataModule
from datamodules.readers.dicom import is_dicom_folder

__all__ = ["ChestXray14DataModule", "DicomDataModule", "FolderDataModule", "MedicalImageDataModule", "MRNetDataModule", "NiftiDataModule", "PhantomDataModule", "is_dicom_folder"]
