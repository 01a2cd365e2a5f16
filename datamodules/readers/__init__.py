"""File readers, one module per format, apart from the DataModules (as torchgeo keeps datasets apart from datamodules).

A reader judges a file when a DataModule is set up (its header: readable, of the right
dimensionality, decodable) and turns a record into a one-channel float32 tensor later,
raising `errors.InputError` in one line naming the file and the fix. A DataModule only lists
records, splits them and chains a reader's transform with its own.

- `folders`: the visible files under an image folder, symbolic links followed and loops refused (`visible_files`).
- `image_files`: PNG, `.npy` and NIfTI files by extension (`image_records`, `LoadImageFile`).
- `nifti`: NIfTI volume headers and their RAS shape (`check_volume_file`).
- `dicom`: DICOM files (`is_dicom_file`, `read_header`, `LoadDicom`).
- `dicom_pixels`: whether a DICOM file's pixel data will load (`check_pixels`), and what that costs.
- `dicom_series`: patients and series of DICOM headers (`patient_of`, `series_geometry`).
"""
