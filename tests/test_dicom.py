"""DicomDataModule on tiny DICOM files written with pydicom: slice order, rescale, MONOCHROME1, ids, splits, bad input, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    MediaStorageDirectoryStorage,
    generate_uid,
)

from memwatch.datamodules import DicomDataModule, is_dicom_folder
from tests.helpers import (
    AXIAL,
    DATA_OVERRIDES,
    ROOT,
    SAGITTAL,
    embedder_overrides,
    fit,
    input_error,
    last_ckpt,
    reference_images,
    run_cli,
    write_dicom,
    write_dicom_dataset,
    write_series,
)


def images(data: DicomDataModule) -> dict[str, np.ndarray]:
    return {
        i: image[0].numpy()
        for split in ("train", "val")
        for i, image in reference_images(data, split).items()
    }


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_slices_are_ordered_by_image_position_along_the_normal_and_reoriented_to_ras(tmp_path, orientation):
    rows, columns, n = 6, 8, 7
    hu = np.zeros((rows, columns, n))
    hu[:] = 100.0 * np.arange(n)  # slice k holds k × 100 HU
    hu[1, 2, 3] = 1000.0  # a marker: row 1, column 2, slice 3
    iop = AXIAL if orientation == "axial" else SAGITTAL
    write_series(tmp_path / "case_a", hu, orientation=iop, patient="A", seed=1)
    write_series(tmp_path / "case_b", hu, orientation=iop, patient="B", seed=2)
    # In RAS the slice axis is the normal's: Superior (axis 2) for axial, Right (axis 0) for sagittal.
    size = (columns, rows, n) if orientation == "axial" else (n, columns, rows)
    data = DicomDataModule(str(tmp_path), spatial_size=size, hu_min=0.0, hu_max=1000.0, val_fraction=0.5)
    volume = images(data)["case_a"]
    assert volume.shape == size
    slice_axis = 2 if orientation == "axial" else 0
    profile = np.median(np.moveaxis(volume, slice_axis, 0).reshape(n, -1), axis=1)
    np.testing.assert_allclose(profile, np.arange(n) / 10, atol=1e-6)  # increasing: position order
    # Axial: columns run Left (RAS axis 0 reversed), rows Posterior (axis 1 reversed).
    # Sagittal: rows run Posterior (axis 1 reversed), columns Inferior (axis 2 reversed).
    marker = (
        (columns - 1 - 2, rows - 1 - 1, 3) if orientation == "axial" else (3, columns - 1 - 2, rows - 1 - 1)
    )
    assert [tuple(int(i) for i in p) for p in np.argwhere(volume == 1.0)] == [marker]


def test_rescale_is_applied_before_the_window_and_the_volume_is_centre_cropped(tmp_path):
    hu = np.zeros((4, 4, 5))
    hu[:] = np.array([-500.0, -100.0, 100.0, 300.0, 1000.0])  # below, hu_min, middle, hu_max, above
    # Stored as raw = (HU + 1000) / 2: without the rescale the window would see 250 ... 1000.
    write_series(tmp_path / "ct", hu, slope=2.0, intercept=-1000.0)
    write_series(tmp_path / "other", np.zeros((4, 4, 5)), patient="PID-2")
    data = DicomDataModule(str(tmp_path), spatial_size=(2, 2, 5), hu_min=-100, hu_max=300, val_fraction=0.5)
    np.testing.assert_allclose(images(data)["ct"][0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    padded = DicomDataModule(str(tmp_path), spatial_size=(4, 4, 9), hu_min=-100, hu_max=300, val_fraction=0.5)
    column = images(padded)["ct"][0, 0]
    np.testing.assert_allclose(
        column, [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.0], atol=1e-6
    )  # 2 slices padded each side


def test_monochrome1_is_inverted_and_2d_images_are_rows_first(tmp_path):
    gradient = (np.arange(8 * 10).reshape(8, 10) * 50).astype(
        np.uint16
    )  # 12-bit, brightest at the bottom right
    write_dicom(tmp_path / "p1/pa.dcm", gradient, modality="DX", position=None, bits_stored=12, patient="P1")
    inverted = (4095 - gradient).astype(np.uint16)  # the same image, stored with white = 0
    write_dicom(tmp_path / "p2/pa", inverted, modality="CR", position=None, bits_stored=12,
                photometric="MONOCHROME1", patient="P2")  # fmt: skip
    data = DicomDataModule(str(tmp_path), spatial_size=(8, 10), val_fraction=0.5)
    loaded = images(data)
    assert set(loaded) == {"p1/pa", "p2/pa"}  # `.dcm` stripped, a name without extension kept
    expected = gradient / gradient.max()
    np.testing.assert_allclose(loaded["p1/pa"], expected, atol=1e-6)
    np.testing.assert_allclose(loaded["p2/pa"], expected, atol=1e-6)  # bright = dense, as MONOCHROME2
    assert loaded["p2/pa"][0, 0] == 0.0 and loaded["p2/pa"][-1, -1] == 1.0
    smaller = DicomDataModule(str(tmp_path), spatial_size=(4, 5), val_fraction=0.5, batch_size=2)
    batch = next(iter(smaller.reference_dataloader("train")))
    assert batch["image"].shape == (1, 1, 4, 5) and batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0


def test_patients_are_the_patientid_tags_and_the_split_keeps_them_together(tmp_path):
    xray = (np.arange(16 * 16).reshape(16, 16) % 97).astype(np.uint16)
    files = {  # file → PatientID ("" for an empty tag: the folder's name)
        "anna/pa.dcm": "PID-A", "anna/visit_2/lateral.dcm": "PID-A", "bert/1.2.840.1": "PID-B",
        "carl_study1/pa.dcm": "PID-C", "carl_study2/pa.dcm": "PID-C", "dora/x.dcm": "", "emil/x.dcm": "PID-E",
    }  # fmt: skip
    for name, patient in files.items():
        legacy = name == "bert/1.2.840.1"  # no preamble, no file meta header: recognised by its content
        write_dicom(
            tmp_path / "data" / name, xray, modality="DX", position=None, patient=patient, legacy=legacy
        )
    assert (tmp_path / "data/bert/1.2.840.1").read_bytes()[128:132] != b"DICM"
    (tmp_path / "data/anna/.DS_Store").write_bytes(b"\0")  # hidden: ignored
    root = str(tmp_path / "data")
    data = DicomDataModule(root, spatial_size=(16, 16), val_fraction=0.4)
    records = {r["id"]: r["patient"] for r in data.list_records()}
    assert records == {
        "anna/pa": "PID-A", "anna/visit_2/lateral": "PID-A", "bert/1.2.840.1": "PID-B",
        "carl_study1/pa": "PID-C", "carl_study2/pa": "PID-C", "dora/x": "dora", "emil/x": "PID-E",
    }  # fmt: skip
    loaded = images(data)
    assert loaded.keys() == records.keys()
    np.testing.assert_allclose(loaded["bert/1.2.840.1"], xray / xray.max(), atol=1e-6)
    for seed in range(6):
        split = DicomDataModule(root, spatial_size=(16, 16), val_fraction=0.4, split_seed=seed)
        sides = {}
        for image_id, patient in zip(
            split.train_ids + split.val_ids, split.train_patients + split.val_patients, strict=True
        ):
            sides.setdefault(patient, set()).add(image_id in split.train_ids)
        assert all(len(side) == 1 for side in sides.values()), (seed, sides)  # a patient's images on one side
        assert len({p for p in split.val_patients}) == 2
    assert is_dicom_folder(root) and is_dicom_folder(tmp_path / "data/bert")
    split_file = tmp_path / "data/split.csv"  # inside root: ignored as a file, because it is split_file
    split_file.write_text("patient,split\nPID-A,val\nPID-B,train\nPID-C,val\ndora,train\nPID-E,train\n")
    fixed = DicomDataModule(root, spatial_size=(16, 16), split_file=str(split_file))
    assert fixed.val_ids == ["anna/pa", "anna/visit_2/lateral", "carl_study1/pa", "carl_study2/pa"]
    (tmp_path / "pngs/a").mkdir(parents=True)
    (tmp_path / "pngs/a/x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert not is_dicom_folder(tmp_path / "pngs") and not is_dicom_folder(tmp_path / "missing")


def test_val_root_holds_the_held_out_patients(tmp_path):
    xray = (np.arange(8 * 8).reshape(8, 8) * 7).astype(np.uint16)
    for folder, patient in [
        ("train/a", "A"),
        ("train/b", "B"),
        ("train/c", "C"),
        ("val/d", "D"),
        ("val/e", "E"),
    ]:
        write_dicom(tmp_path / folder / "img.dcm", xray, modality="DX", position=None, patient=patient)
    data = DicomDataModule(str(tmp_path / "train"), val_root=str(tmp_path / "val"), spatial_size=(8, 8))
    assert (data.train_ids, data.val_ids) == (["a/img", "b/img", "c/img"], ["d/img", "e/img"])
    assert data.val_patients == ["D", "E"]
    write_dicom(tmp_path / "val/a_again/img.dcm", xray, modality="DX", position=None, patient="A")
    both = DicomDataModule(str(tmp_path / "train"), val_root=str(tmp_path / "val"), spatial_size=(8, 8))
    error = input_error(both.setup)
    assert "patient 'A' is in both roots" in str(error) and str(tmp_path / "val/a_again") in str(error)


def _two_series(root: Path) -> list[str]:
    first = write_series(root / "p", np.zeros((4, 4, 3)), seed=0)
    second = write_series(root / "p/scout", np.zeros((4, 4, 3)), depths=[20.0, 22.5, 25.0], seed=1)
    # The folder and the first file (sorted) of each series.
    return [f"patient folder {root / 'p'} ", f"in {min(map(str, first))},", f"in {min(map(str, second))})"]


def _missing_slice(root: Path) -> str:
    files = write_series(root / "p", np.zeros((4, 4, 6)))
    files[3].unlink()
    return f"between the slices {files[2]} and {files[4]}"


def _uneven_spacing(root: Path) -> str:
    files = write_series(root / "p", np.zeros((4, 4, 6)), depths=[0.0, 2.5, 5.0, 7.6, 10.1, 12.6])
    return f"{files[2]} and {files[3]}"


def _compressed(root: Path) -> str:
    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    path = write_dicom(root / "p/IM1", np.zeros((4, 4), np.int16))
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    # Encapsulated like a PACS export; only the start of a JPEG Lossless frame: the header check never decodes it.
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(28)])
    dataset["PixelData"].VR, dataset["PixelData"].is_undefined_length = "OB", True
    dataset.save_as(path, enforce_file_format=True)
    return f"{path} has compressed pixel data (JPEG Lossless"


def _no_pixel_data(root: Path) -> str:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index = FileDataset(str(root / "p/DICOMDIR"), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    index.SOPClassUID = MediaStorageDirectoryStorage
    (root / "p").mkdir(parents=True)
    index.save_as(root / "p/DICOMDIR", enforce_file_format=True)
    return f"{root / 'p/DICOMDIR'} holds no pixel data"


def _not_dicom(root: Path) -> str:
    write_series(root / "p", np.zeros((4, 4, 3)))
    (root / "p/notes.txt").write_text("scanned 2024-03-01\n")
    return f"{root / 'p/notes.txt'} is not a DICOM file"


def _radiograph_among_slices(root: Path) -> str:
    write_series(root / "p", np.zeros((4, 4, 3)))
    path = write_dicom(root / "p/scout.dcm", np.zeros((4, 4), np.uint16), modality="DX", position=None)
    return f"{path} is a DX radiograph, mixed with 3 slice(s) of a series"


def _two_patients(root: Path) -> str:
    write_series(root / "p", np.zeros((4, 4, 3)), patient="PID-1")
    write_dicom(root / "p/IM9999", np.zeros((4, 4), np.int16), patient="PID-2", position=(0.0, 0.0, 50.0))
    return "holds files of two patients"


def _file_directly_in_root(root: Path) -> str:
    path = write_dicom(root / "IM0001", np.zeros((4, 4), np.int16))
    return f"{path} lies directly in --data.init_args.root"


BAD_SERIES = {
    "two series": (_two_series, "holds two series (SeriesInstanceUID"),
    "missing slice": (_missing_slice, "slices are missing"),
    "uneven spacing": (_uneven_spacing, "has uneven slice spacing (2.5 to 2.6 mm"),
    "compressed without decoder": (_compressed, "gdcmconv --raw"),
    "no pixel data": (_no_pixel_data, "e.g. a DICOMDIR index"),
    "not dicom": (_not_dicom, "move it out of --data.init_args.root"),
    "radiograph among slices": (_radiograph_among_slices, "spatial_size [4, 4, 3] is 3D"),
    "two patients": (_two_patients, "give each patient a folder of their own"),
    "file directly in root": (
        _file_directly_in_root,
        "put each patient's DICOM files in a folder of their own",
    ),
}


@pytest.mark.parametrize("case", BAD_SERIES)
def test_bad_input_is_one_input_error_naming_the_file(tmp_path, case):
    make, reason = BAD_SERIES[case]
    named = make(tmp_path)
    data = DicomDataModule(str(tmp_path), spatial_size=(4, 4, 3))
    error = str(input_error(data.list_records))
    assert (
        all(part in error for part in ([named] if isinstance(named, str) else named)) and reason in error
    ), error


def test_2d_bad_input_multi_frame_and_damaged_pixel_data(tmp_path):
    write_dicom(tmp_path / "a/pa.dcm", np.zeros((8, 8), np.uint16), modality="DX", position=None, patient="A")
    cine = write_dicom(tmp_path / "b/cine.dcm", np.zeros((3, 8, 8), np.uint16), modality="DX", position=None)
    error = str(input_error(DicomDataModule(str(tmp_path), spatial_size=(8, 8)).list_records))
    assert f"{cine} holds 3 frames (a 3D image), but spatial_size [8, 8] is 2D" in error, error
    cine.unlink()
    damaged = write_dicom(tmp_path / "b/pa.dcm", np.zeros((8, 8), np.uint16), modality="DX", position=None)
    damaged.write_bytes(damaged.read_bytes()[:-40])  # truncated: the header is fine, the pixel data are short
    data = DicomDataModule(str(tmp_path), spatial_size=(8, 8), val_fraction=0.5, cache="memory")
    error = str(input_error(data.setup))  # decoded at set-up with cache: memory
    assert f"{damaged} has pixel data that cannot be read" in error, error


def test_the_three_dicom_configs_train_through_the_cli(tmp_path):
    extra = DATA_OVERRIDES["dicom"](write_dicom_dataset(tmp_path / "dicom"))
    ae = fit("dicom_ae.yaml", tmp_path, *extra)
    simclr = fit("dicom_simclr.yaml", tmp_path, *extra)
    ldm = fit(
        "dicom_ldm.yaml", tmp_path, *extra, "--model.init_args.autoencoder_ckpt", str(last_ckpt(ae)),
        *embedder_overrides("dicom_ldm.yaml", last_ckpt(simclr)),
    )  # fmt: skip
    assert embedder_overrides("dicom_ldm.yaml", last_ckpt(simclr))  # the config has a memorization: section
    for cli in (ae, simclr, ldm):
        assert cli.trainer.global_step == 2 and last_ckpt(cli).is_file()
        assert cli.datamodule.train_patients[0].startswith("PID-") and len(cli.datamodule.val_ids) == 2
    assert ldm.model.sample(1, seed=0, num_inference_steps=2).shape == (1, 1, 32, 32, 32)


def test_bad_dicom_stops_the_cli_at_start_up_with_one_line(tmp_path):
    write_dicom_dataset(tmp_path / "dicom", n_patients=2, shape=(8, 8, 8))
    message = _missing_slice(tmp_path / "dicom")
    result = run_cli(
        "fit", "--config", str(ROOT / "configs/dicom_ae.yaml"), "--data.init_args.root", str(tmp_path / "dicom"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.accelerator", "cpu",
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0] and "slices are missing" in errors[0], errors
    assert not (tmp_path / "runs").exists()  # stopped before the trainer wrote anything
