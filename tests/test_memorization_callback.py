"""MemorizationCallback with scripted generators: counts, thresholds, resume, EarlyStopping, world size."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from callbacks import MemorizationCallback
from cli import main
from datamodules import PhantomDataModule
from errors import InputError
from memorization.report import REPORT_FILES
from tests.conftest import MEMORIZATION_SIZE, N_TRAIN, memorization_phantoms, quiet_trainer, run_cli
from tests.doubles import ScriptedGenerator

phantoms = memorization_phantoms
SIZE = MEMORIZATION_SIZE


def fit_with_callback(generator, callback, epochs: int, **trainer_args) -> L.Trainer:
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[callback], **trainer_args)
    trainer.fit(generator, phantoms())
    return trainer


def test_counts_the_patients_a_copying_generator_copies(embedder_ckpt):
    copied = phantoms().train_ids[:10]
    callback = MemorizationCallback(str(embedder_ckpt), num_inference_steps=1)
    fit_with_callback(ScriptedGenerator(copied_ids=copied), callback, epochs=1)
    (row,) = callback.history
    assert 8 <= row["n_mem"] <= 11, row  # 32 samples, each a variation of one of 10 patients
    assert row["n_copies"] >= 0.8 * N_TRAIN, row
    assert row["frac_mem"] == pytest.approx(row["n_mem"] / N_TRAIN)


def test_a_generator_of_held_out_patients_memorizes_almost_nothing(embedder_ckpt):
    novel = [f"novel-{i:04d}" for i in range(N_TRAIN)]
    callback = MemorizationCallback(str(embedder_ckpt), num_inference_steps=1)
    fit_with_callback(ScriptedGenerator(copied_ids=novel), callback, epochs=1)
    (row,) = callback.history
    # τ is the 95th percentile of real held-out similarity: about 5% by construction
    assert row["frac_mem"] <= 0.15 and row["frac_copies"] <= 0.15, row


def test_checks_every_n_epochs_embed_references_once_and_write_history(embedder_ckpt, tmp_path):
    callback = MemorizationCallback(str(embedder_ckpt), every_n_epochs=2, n_samples=6, num_inference_steps=1)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run")
    fit_with_callback(ScriptedGenerator(), callback, epochs=5, logger=logger)
    assert [row["epoch"] for row in callback.history] == [0, 2, 4]
    assert callback.reference_embeddings_computed == 1
    with (Path(logger.log_dir) / "memorization_history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [0, 2, 4]
    assert {"n_mem", "n_copies", "frac_mem", "frac_copies", "tau"} <= set(rows[0])


def test_bad_configuration_fails_at_construction(embedder_ckpt, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        MemorizationCallback(str(tmp_path / "missing.ckpt"))
    with pytest.raises(InputError, match=r"percentile=100.0 must lie in \(0, 100\)"):
        MemorizationCallback(str(embedder_ckpt), percentile=100.0)
    callback = MemorizationCallback(str(embedder_ckpt))
    with pytest.raises(
        InputError, match=r"trained on images of spatial_size=\[32, 32\] but the data has \[64, 64\]"
    ):
        callback.check_data(PhantomDataModule(spatial_size=(64, 64)))


def scripted_config(
    tmp_path: Path, embedder_ckpt: Path, *, copy_from_epoch: int, max_epochs: int, early_stop: bool
) -> Path:
    """A YAML run of the scripted generator with the callback (and EarlyStopping), as a user writes it."""
    callbacks = [
        {
            "class_path": "callbacks.MemorizationCallback",
            "init_args": {"embedder_ckpt": str(embedder_ckpt), "every_n_epochs": 1, "num_inference_steps": 1},
        }
    ]
    if early_stop:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                "init_args": {
                    "monitor": "memorization/frac_mem",
                    "mode": "min",
                    "divergence_threshold": 0.2,
                    "patience": 100,
                },
            }
        )
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": max_epochs,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "scripted"},
            },
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "tests.doubles.ScriptedGenerator",
            "init_args": {
                "copied_ids": phantoms().train_ids[:12],
                "novel_ids": [f"novel-{i:04d}" for i in range(N_TRAIN)],
                "copy_from_epoch": copy_from_epoch,
                "spatial_size": list(SIZE),
            },
        },
        "data": {
            "class_path": "datamodules.PhantomDataModule",
            "init_args": {
                "spatial_size": list(SIZE),
                "n_patients": 2 * N_TRAIN,
                "val_fraction": 0.5,
                "batch_size": 16,
            },
        },
    }
    path = tmp_path / "scripted.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def history(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "memorization_history.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_early_stopping_from_yaml_stops_when_the_generator_starts_copying(embedder_ckpt, tmp_path):
    config = scripted_config(tmp_path, embedder_ckpt, copy_from_epoch=2, max_epochs=8, early_stop=True)
    cli = main(["fit", "--config", str(config)])
    rows = history(Path(cli.trainer.log_dir))
    assert [float(r["frac_mem"]) > 0.2 for r in rows] == [False, False, True]
    assert cli.trainer.current_epoch == 3 and cli.trainer.should_stop


def test_resume_continues_the_history_without_gaps_or_repeats(embedder_ckpt, tmp_path):
    first = main(
        [
            "fit",
            "--config",
            str(scripted_config(tmp_path, embedder_ckpt, copy_from_epoch=0, max_epochs=2, early_stop=False)),
        ]
    )
    assert len(history(Path(first.trainer.log_dir))) == 2
    checkpoint = Path(first.trainer.checkpoint_callback.last_model_path)
    resumed = main(
        [
            "fit",
            "--config",
            str(tmp_path / "scripted.yaml"),
            "--trainer.max_epochs",
            "5",
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    rows = history(Path(resumed.trainer.log_dir))
    assert [int(r["check"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]


def test_one_and_two_processes_report_the_same_counts(embedder_ckpt, tmp_path):
    config = scripted_config(tmp_path, embedder_ckpt, copy_from_epoch=0, max_epochs=2, early_stop=False)
    runs = {}
    for devices in (1, 2):
        save_dir = tmp_path / f"devices{devices}"
        result = run_cli(
            "fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices == 2 else "auto",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = save_dir.glob("scripted/version_*")
        runs[devices] = history(run_dir)
    keys = ("check", "epoch", "n_mem", "n_copies", "tau")
    assert [[r[k] for k in keys] for r in runs[1]] == [[r[k] for k in keys] for r in runs[2]]
    assert int(runs[1][0]["n_mem"]) > 0


def test_early_stopping_listed_before_the_callback_is_refused(embedder_ckpt):
    callback = MemorizationCallback(str(embedder_ckpt), num_inference_steps=1)
    stopper = L.pytorch.callbacks.EarlyStopping(monitor="memorization/frac_mem", mode="min")
    trainer = quiet_trainer(max_epochs=1, callbacks=[stopper, callback])
    with pytest.raises(InputError, match="list it after the callback"):
        trainer.fit(ScriptedGenerator(), phantoms())


def test_quality_metrics_layout_copy_pairs_and_reports_reach_tensorboard_and_disk(embedder_ckpt, tmp_path):
    copied = phantoms().train_ids[:4]
    callback = MemorizationCallback(
        str(embedder_ckpt), n_samples=8, num_inference_steps=1, log_images=True, output_dir=str(tmp_path / "reports")
    )
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run")
    fit_with_callback(ScriptedGenerator(copied_ids=copied), callback, epochs=2, logger=logger)
    (first, second) = callback.history
    assert first["fd"] > 0 and 0 < first["ms_ssim"] <= 1
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"memorization/fd", "memorization/ms_ssim", "memorization/n_mem"} <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("memorization/fd")] == pytest.approx([first["fd"], second["fd"]])
    assert "memorization/copies" in tags["images"]
    (image,) = [e for e in events.Images("memorization/copies") if e.step == first["step"]][:1]
    # TensorBoard tiles the pairs 8 to a row; each pair is a training image beside its copy
    assert image.height == SIZE[0] and image.width == 2 * SIZE[1] * min(8, first["n_copies"])
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert any("memorization/n_mem" in tags_ and len(tags_) > 1 for tags_ in charts.values())
    assert any(tags_ == ["memorization/fd"] for tags_ in charts.values())
    for check in ("check_000", "check_001"):
        folder = tmp_path / "reports" / check
        assert sorted(p.name for p in folder.iterdir()) == sorted(REPORT_FILES), check
    summary = json.loads((tmp_path / "reports" / "check_001" / "summary.json").read_text())
    assert summary["n_mem"] == second["n_mem"] and summary["step"] == second["step"]
    assert set(summary["memorized_train_ids"]) <= set(copied)


def test_without_log_images_no_patient_pixels_are_written(embedder_ckpt, tmp_path):
    callback = MemorizationCallback(str(embedder_ckpt), n_samples=4, num_inference_steps=1, output_dir=str(tmp_path / "r"))
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run")
    fit_with_callback(ScriptedGenerator(copied_ids=phantoms().train_ids[:2]), callback, epochs=1, logger=logger)
    assert "copies.png" not in {p.name for p in (tmp_path / "r" / "check_000").iterdir()}
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert not events.Tags()["images"]
