"""The DICOM reader over pydicom's real-world test files: each loads, or is refused at setup in one line.

Every file of `pydicom.data.get_testdata_files()` (they ship in the pydicom wheel: JPEG,
JPEG 2000, JPEG-LS and RLE compressed, big endian, deflated, truncated, damaged headers,
DICOMDIRs, segmentations, colour images...) is put alone in a patient folder, beside a
second patient's good file, and read by `DicomDataModule` in 2D and in 3D. It must either
load into finite images in `[0, 1]` of `spatial_size`, or be refused by `setup("fit")` with
one `InputError` line naming it; any other exception, and any error while the images are
read after setup (in training: inside a DataLoader worker, mid-epoch), fails the test.
Then, on files written here: what setup decodes (compressed files once, native files never),
and a damaged compressed file that a decoder is installed for.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import RLELossless

from memwatch.datamodules import DicomDataModule
from memwatch.errors import InputError
from tests.helpers import input_error, write_dicom, write_series


def _test_files() -> dict[str, Path]:
    try:
        files = [Path(f) for f in get_testdata_files() if Path(f).is_file()]
    except Exception:  # pydicom installed without its test data: the parameter set is empty, the test skipped
        return {}
    if not files:
        return {}
    base = Path(*Path(files[0]).parts[: Path(files[0]).parts.index("test_files") + 1])
    return {path.relative_to(base).as_posix(): path for path in sorted(files)}


TEST_FILES = _test_files()
SPATIAL_SIZES = {"2D": (16, 16), "3D": (4, 4, 3)}
# Files that load or are refused whatever decoders are installed (pydicom's own native and RLE decoders).
MUST_LOAD_2D = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm")
MUST_REFUSE = {
    "MR_truncated.dcm": "has pixel data that cannot be read (8130 bytes, but",
    "badVR.dcm": "has NumberOfFrames '1A', not a whole number",
    "liver_1frame.dcm": "is a segmentation (Modality SEG",
    "liver_expb_1frame.dcm": "is a segmentation (Modality SEG",
    "rtplan.dcm": "holds no pixel data",
    "SC_rgb_rle.dcm": "is not a grayscale image (PhotometricInterpretation RGB",
}


def _layout(root: Path, source: Path, spatial_dims: int) -> Path:
    """`root/file/<source's name>` alone, and a second patient's good image(s) in `root/other/`: two patients."""
    copy = root / "file" / source.name
    copy.parent.mkdir(parents=True)
    shutil.copy(source, copy)
    if spatial_dims == 2:
        pixels = (np.arange(16 * 16).reshape(16, 16) * 7).astype(np.uint16)
        write_dicom(root / "other/pa.dcm", pixels, modality="DX", position=None, patient="memwatch-other-patient")
    else:
        write_series(root / "other", np.arange(48.0).reshape(4, 4, 3), patient="memwatch-other-patient")
    return copy


def _outcome(root: Path, spatial_size: tuple[int, ...]) -> str | list[np.ndarray]:
    """The one-line refusal at setup, or every image of both splits `[1, *spatial_size]`, read as training reads them."""
    data = DicomDataModule(str(root), spatial_size=spatial_size, val_fraction=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the damaged files it is given to read
        try:
            data.setup("fit")
        except InputError as error:
            return str(error)
        return [item["image"].numpy() for split in ("train", "val") for item in data.reference_dataset(split)]


@pytest.mark.parametrize("name", list(TEST_FILES))
def test_every_pydicom_test_file_loads_or_is_refused_at_setup(tmp_path, name):
    source = TEST_FILES[name]
    for dims, spatial_size in SPATIAL_SIZES.items():
        root = tmp_path / dims
        copy = _layout(root, source, len(spatial_size))
        outcome = _outcome(root, spatial_size)
        if isinstance(outcome, str):
            assert "\n" not in outcome and str(copy.parent) in outcome, (dims, outcome)
            assert source.name not in MUST_LOAD_2D or dims == "3D", (dims, outcome)
            assert source.name not in MUST_REFUSE or MUST_REFUSE[source.name] in outcome, (dims, outcome)
            continue
        assert source.name not in MUST_REFUSE, (dims, "loaded")
        assert len(outcome) == 2, dims  # the file's image and the other patient's
        for image in outcome:
            assert image.shape == (1, *spatial_size) and image.dtype == np.float32, (dims, image.shape)
            assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0, dims


def test_the_test_files_are_pydicoms_real_world_set():
    if not TEST_FILES:
        pytest.skip("pydicom's test data are not installed")
    assert len(TEST_FILES) > 150 and set(MUST_LOAD_2D) | set(MUST_REFUSE) <= {p.name for p in TEST_FILES.values()}


def _compress(path: Path, keep: float = 1.0) -> None:
    """Rewrite `path` RLE Lossless (pydicom's own codec, always installed), its code stream cut to `keep` of its length."""
    dataset = pydicom.dcmread(path)
    dataset.compress(RLELossless)
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    dataset.PixelData = encapsulate([frame[: int(len(frame) * keep)]])
    dataset.save_as(path, enforce_file_format=True)


def test_setup_decodes_each_compressed_file_once_and_no_native_file(tmp_path, monkeypatch):
    decoded = []
    as_array = Decoder.as_array

    def counted(self, src, **kwargs):
        decoded.append(kwargs.get("index"))
        return as_array(self, src, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", counted)
    hu = np.arange(4 * 4 * 3, dtype=float).reshape(4, 4, 3)
    files = [*write_series(tmp_path / "a", hu, patient="A"), *write_series(tmp_path / "b", hu, patient="B", seed=1)]

    def images() -> tuple[list, list[np.ndarray]]:
        """What setup decoded (frame indices), and every image `[1, 4, 4, 3]` of both splits, read as training reads them."""
        data = DicomDataModule(str(tmp_path), spatial_size=(4, 4, 3), val_fraction=0.5, hu_min=0, hu_max=47)
        decoded.clear()
        data.setup("fit")
        at_setup = list(decoded)
        return at_setup, [item["image"].numpy() for split in ("train", "val") for item in data.reference_dataset(split)]

    at_setup, native = images()
    assert at_setup == []  # native: judged from the headers and the files' lengths
    for path in files:
        _compress(path)
    at_setup, compressed = images()
    assert at_setup == [0] * len(files)  # one frame of every file
    for old, new in zip(native, compressed, strict=True):
        np.testing.assert_array_equal(old, new)  # lossless, and read as before


def test_a_damaged_compressed_file_is_refused_at_setup_though_its_decoder_is_installed(tmp_path):
    pixels = (np.arange(32 * 32).reshape(32, 32) * 3).astype(np.uint16)
    write_dicom(tmp_path / "a/pa.dcm", pixels, modality="DX", position=None, patient="A")
    damaged = write_dicom(tmp_path / "b/pa.dcm", pixels, modality="DX", position=None, patient="B")
    _compress(damaged, keep=0.5)  # the code stream ends half way
    error = str(input_error(DicomDataModule(str(tmp_path), spatial_size=(32, 32), val_fraction=0.5).setup))
    assert f"{damaged} has compressed pixel data (RLE Lossless) that cannot be decoded" in error, error
    assert "\n" not in error and "the file is damaged: replace or remove it" in error
