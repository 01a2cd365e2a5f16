"""One LightningDataModule per dataset, all sharing `MedicalImageDataModule`; file readers in `memwatch.datamodules.readers`."""

from memwatch.datamodules.base import MedicalImageDataModule
from memwatch.datamodules.chestxray import ChestXray14DataModule
from memwatch.datamodules.dicom import DicomDataModule
from memwatch.datamodules.folder import FolderDataModule
from memwatch.datamodules.mrnet import MRNetDataModule
from memwatch.datamodules.nifti import NiftiDataModule
from memwatch.datamodules.phantom import PhantomDataModule
from memwatch.datamodules.readers.dicom import is_dicom_folder

__all__ = ["ChestXray14DataModule", "DicomDataModule", "FolderDataModule", "MedicalImageDataModule", "MRNetDataModule", "NiftiDataModule", "PhantomDataModule", "is_dicom_folder"]
