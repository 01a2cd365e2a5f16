"""MemorizationCallback with scripted generators: counts, thresholds, resume, EarlyStopping, world size."""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import instantiate_class
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from memwatch.callbacks import MemorizationCallback
from memwatch.callbacks.memorization import row_scalars
from memwatch.callbacks.preflight import stale_early_stopping
from memwatch.cli import main
from memwatch.datamodules import PhantomDataModule
from memwatch.errors import InputError
from memwatch.memorization.report import REPORT_FILES
from tests.doubles import ScriptedGenerator
from tests.helpers import (
    MEMORIZATION_SIZE,
    N_COPIED_TO_STOP,
    N_TRAIN,
    ROOT,
    STOP_FRAC_MEM,
    chance_ceiling,
    memorization_history,
    memorization_phantoms,
    printed_config,
    quiet_trainer,
    run_cli,
    scripted_config,
)

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
    # 32 samples, each a variation of one of 10 patients: most of the 10 are found, and the other 22 training
    # patients only as often as chance makes them pass τ (each compared with the 10 copied ones)
    assert 8 <= row["n_mem"] <= len(copied) + chance_ceiling(N_TRAIN - len(copied), len(copied)), row
    assert row["n_copies"] >= 0.8 * N_TRAIN, row
    assert row["frac_mem"] == pytest.approx(row["n_mem"] / N_TRAIN)


def test_a_generator_of_held_out_patients_memorizes_almost_nothing(embedder_ckpt):
    novel = [f"novel-{i:04d}" for i in range(N_TRAIN)]
    callback = MemorizationCallback(str(embedder_ckpt), num_inference_steps=1)
    fit_with_callback(ScriptedGenerator(copied_ids=novel), callback, epochs=1)
    (row,) = callback.history
    # τ is the 95th percentile of real held-out similarity: about 5% by construction, but τ from 32 held-out
    # patients scatters (6/32 was measured), so the bound is what chance reaches but once in a thousand
    ceiling = chance_ceiling(N_TRAIN, N_TRAIN)
    assert row["n_mem"] <= ceiling and row["n_copies"] <= ceiling, (row, ceiling)


def test_checks_end_every_nth_epoch_embed_references_once_and_write_history(embedder_ckpt, tmp_path):
    callback = MemorizationCallback(
        str(embedder_ckpt), every_n_epochs=2, n_samples=6, num_inference_steps=1, rule="distinct", margin=0.7
    )
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run")
    fit_with_callback(ScriptedGenerator(), callback, epochs=5, logger=logger)
    # The epochs Lightning validates and checkpoints with the same period: (epoch + 1) % 2 == 0.
    assert [row["epoch"] for row in callback.history] == [1, 3]
    assert callback.reference_embeddings_computed == 1
    rows = memorization_history(Path(logger.log_dir))
    assert [int(r["epoch"]) for r in rows] == [1, 3]
    assert {"n_mem", "n_copies", "frac_mem", "frac_copies", "tau"} <= set(rows[0])
    # the rule in every row, in memory and on disk; not a TensorBoard scalar
    assert all(row["rule"] == "distinct" and row["margin"] == 0.7 for row in callback.history)
    assert all(row["rule"] == "distinct" and float(row["margin"]) == 0.7 for row in rows)
    assert not {"memorization/rule", "memorization/margin"} & set(row_scalars(callback.history[-1]))


def test_check_at_start_adds_a_check_at_the_end_of_the_first_epoch(embedder_ckpt):
    callback = MemorizationCallback(
        str(embedder_ckpt), every_n_epochs=3, check_at_start=True, n_samples=4, num_inference_steps=1
    )
    fit_with_callback(ScriptedGenerator(), callback, epochs=6)
    assert [(row["epoch"], row["step"]) for row in callback.history] == [(0, 2), (2, 6), (5, 12)]


def test_a_checkpoint_saved_at_a_check_carries_its_row(embedder_ckpt, tmp_path):
    callback = MemorizationCallback(str(embedder_ckpt), every_n_epochs=2, n_samples=4, num_inference_steps=1)
    saver = L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_epochs=2, save_top_k=-1)
    # Validation every 2 epochs: the check runs at validation end, which is where the checkpoint is saved.
    trainer = quiet_trainer(
        max_epochs=4, limit_val_batches=1, check_val_every_n_epoch=2, callbacks=[callback, saver],
        enable_checkpointing=True,
    )  # fmt: skip
    trainer.fit(ScriptedGenerator(), phantoms())
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert len(saved) == 2
    for path in saved:
        checkpoint = torch.load(path, weights_only=True)
        (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("MemorizationCallback")]
        assert state["history"][-1]["step"] == checkpoint["global_step"], path.name


def test_bad_configuration_fails_at_construction(embedder_ckpt, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        MemorizationCallback(str(tmp_path / "missing.ckpt"))
    with pytest.raises(InputError, match=r"--memorization.percentile=100.0 is outside the open interval \(0, 100\)"):
        MemorizationCallback(str(embedder_ckpt), percentile=100.0)
    callback = MemorizationCallback(str(embedder_ckpt))
    with pytest.raises(
        InputError, match=r"trained on images of spatial_size=\[32, 32\] but the data has \[64, 64\]"
    ):
        callback.check_data(PhantomDataModule(spatial_size=(64, 64)))
    with pytest.raises(InputError, match=r"embedder_ckpt was trained on \d+ patient\(s\) held out here"):
        callback.check_data(memorization_phantoms(split_seed=1))  # another split: some of its training patients are held out
    callback.check_data(memorization_phantoms())  # the embedder's own split
    with pytest.raises(InputError, match=r"^--memorization.rule 'strict' is not one of paper, distinct"):
        MemorizationCallback(str(embedder_ckpt), rule="strict")
    with pytest.raises(InputError, match=r"^--memorization.margin 1.5 must lie in \(0, 1\]"):
        MemorizationCallback(str(embedder_ckpt), rule="distinct", margin=1.5)
    with pytest.raises(InputError, match="detector_positives=-1 must be at least 0"):
        MemorizationCallback(str(embedder_ckpt), detector_positives=-1)
    with pytest.raises(InputError, match="use rotation_degrees, contrast_gamma and noise_std"):
        MemorizationCallback(str(embedder_ckpt), variation={"brightness": 0.1})


def test_early_stopping_from_yaml_stops_when_the_generator_starts_copying(embedder_ckpt, tmp_path, caplog):
    config = scripted_config(
        tmp_path, embedder_ckpt, copy_from_epoch=2, max_epochs=8, early_stop=True,
        callback_args={"sample_batch_size": 8, "progress_seconds": 0},
        generator_args={"copied_ids": phantoms().train_ids[:N_COPIED_TO_STOP]},
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        cli = main(["fit", "--config", str(config)])
    rows = memorization_history(Path(cli.trainer.log_dir))
    # Checks 0 and 1 see novel patients (chance level, below the threshold), check 2 the copies.
    assert [float(r["frac_mem"]) > STOP_FRAC_MEM for r in rows] == [False, False, True]
    assert cli.trainer.current_epoch == 3 and cli.trainer.should_stop
    # The model to share: the last one whose check stayed within the threshold (check 1, epoch 1).
    checkpoints = Path(cli.trainer.checkpoint_callback.dirpath)
    safe = torch.load(checkpoints / "last_safe.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    (history,) = [v["history"] for k, v in safe["callbacks"].items() if k.startswith("MemorizationCallback")]
    assert safe["epoch"] == 1 and [row["check"] for row in history] == [0, 1]
    assert last["epoch"] > safe["epoch"]
    saved = [r.getMessage() for r in caplog.records if "last_safe.ckpt" in r.getMessage()]
    assert len(saved) == 2, saved
    # Each line names its step, the monitor, the check's value (chance level, 0 or not) and the threshold.
    for line, row in zip(saved, rows[:2], strict=True):
        named = re.match(
            rf"memorization at step {row['step']} within the limit "
            r"\(memorization/frac_mem = (\S+) ≤ (\S+)\): saved ",
            line,
        )
        assert named, line
        value, threshold = float(named[1]), float(named[2])  # the value as printed, to 4 significant digits
        assert threshold == STOP_FRAC_MEM and value <= threshold, line
        assert value == pytest.approx(float(row["frac_mem"]), rel=1e-3), (line, row["frac_mem"])
    # A check of N_train = 32 samples in chunks of 8 says where it is after each chunk, then at its end.
    step = re.escape(f"memorization check 0 (epoch 0, step {rows[0]['step']}): samples: ")
    lines = [r.getMessage() for r in caplog.records if re.match(step, r.getMessage())]
    assert len(lines) == 4, lines
    for line, done in zip(lines[:3], (8, 16, 24), strict=True):
        assert re.fullmatch(step + rf"{done}/32 \({done / 32:.0%}\) in \d+ s, about \d+ s left", line), line
    assert re.fullmatch(step + r"32/32 \(100%\) in \d+ s", lines[3]), lines


def test_resume_continues_the_history_without_gaps_or_repeats(embedder_ckpt, tmp_path):
    first = main(
        [
            "fit",
            "--config",
            str(scripted_config(tmp_path, embedder_ckpt, copy_from_epoch=0, max_epochs=2, early_stop=False)),
        ]
    )
    assert len(memorization_history(Path(first.trainer.log_dir))) == 2
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
    rows = memorization_history(Path(resumed.trainer.log_dir))
    assert [int(r["check"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]


def test_one_and_two_processes_report_the_same_counts(embedder_ckpt, tmp_path):
    config = scripted_config(tmp_path, embedder_ckpt, copy_from_epoch=0, max_epochs=2, early_stop=False)

    def fit_on(devices: int) -> list[dict]:
        save_dir = tmp_path / f"devices{devices}"
        result = run_cli(
            "fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices == 2 else "auto",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = save_dir.glob("scripted/version_*")
        return memorization_history(run_dir)

    with ThreadPoolExecutor(2) as pool:  # independent runs, each mostly importing: at once
        runs = {devices: history for devices, history in zip((1, 2), pool.map(fit_on, (1, 2)), strict=True)}
    keys = ("check", "epoch", "n_mem", "n_copies", "tau")
    assert [[r[k] for k in keys] for r in runs[1]] == [[r[k] for k in keys] for r in runs[2]]
    assert int(runs[1][0]["n_mem"]) > 0


def processes_running(marker: str) -> list[int]:
    """PIDs of live processes whose command line mentions `marker` (a test's own temporary path)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


FAILING_RANK = {
    "output_dir not writable": (
        {"callback_args": {"output_dir": "TMP/a_file/reports"}}, 2, "output_dir=TMP/a_file/reports is not writable",
    ),
    "NaN samples on rank 1 only": (
        {"generator_args": {"nan_from_sample": 16}}, 1,
        "rank 1 failed while sampling: training failed at check 0 (epoch 0, step 1): 16 sample(s) have NaN or "
        "infinite pixels (first: sample 16): the model diverged",  # samples 16-31 are rank 1's
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", FAILING_RANK, ids=str)
def test_a_failure_on_one_rank_ends_both_with_one_error_line(embedder_ckpt, tmp_path, case):
    arguments, status, message = FAILING_RANK[case]
    (tmp_path / "a_file").write_text("not a folder")
    arguments = yaml.safe_load(yaml.safe_dump(arguments).replace("TMP", str(tmp_path)))
    config = scripted_config(tmp_path, embedder_ckpt, copy_from_epoch=0, max_epochs=2, early_stop=False, **arguments)
    started = time.perf_counter()
    result = run_cli("fit", "--config", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp", timeout=300)
    elapsed = time.perf_counter() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == status, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message.replace('TMP', str(tmp_path))}"), errors
    assert "Traceback" not in result.stderr
    assert "Starting with 2 processes" in result.stdout + result.stderr
    time.sleep(2)
    assert processes_running(str(config)) == []  # no rank left waiting in a collective
    # Start-up of two ranks included; a rank left waiting would be stopped only by gloo's 30-minute timeout.
    assert elapsed < 240, elapsed


def test_early_stopping_reads_the_current_check_wherever_it_is_listed(embedder_ckpt, tmp_path):
    # Lightning runs EarlyStopping's train-epoch-end hook after every other callback's, so the
    # order of the list does not matter; the history shows which check crossed the threshold.
    stopped_at = {}
    for order in ("before", "after"):
        callback = MemorizationCallback(str(embedder_ckpt), num_inference_steps=1)
        stopper = L.pytorch.callbacks.EarlyStopping(
            monitor="memorization/frac_mem",
            mode="min",
            divergence_threshold=STOP_FRAC_MEM,
            check_on_train_epoch_end=True,
        )
        callbacks = [stopper, callback] if order == "before" else [callback, stopper]
        generator = ScriptedGenerator(copied_ids=phantoms().train_ids[:N_COPIED_TO_STOP], copy_from_epoch=2)
        trainer = quiet_trainer(max_epochs=8, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(generator, phantoms())
        assert [row["frac_mem"] > STOP_FRAC_MEM for row in callback.history] == [False, False, True], order
        stopped_at[order] = trainer.current_epoch
    assert stopped_at == {"before": 3, "after": 3}


class LightningSettings(SimpleNamespace):
    """The trainer settings `stale_early_stopping` reads."""

    def __init__(self, check_val_every_n_epoch=1, val_check_interval=1.0, limit_val_batches=1.0):
        super().__init__(
            check_val_every_n_epoch=check_val_every_n_epoch, val_check_interval=val_check_interval,
            limit_val_batches=limit_val_batches,
        )  # fmt: skip


STALE = {
    "validation end, checks not at every validation": (
        dict(check_on_train_epoch_end=False), LightningSettings(check_val_every_n_epoch=4), 10,
        "reads at validation end (check_val_every_n_epoch=4, val_check_interval=1.0), but memorization checks run "
        "every 10 epochs, so it would read an old check: set check_on_train_epoch_end: true in its init_args",
    ),
    "validation end by default (chestxray_ldm.yaml before)": (
        {}, LightningSettings(check_val_every_n_epoch=5), 12, "set check_on_train_epoch_end: true",
    ),
    "validation end, validation off": (
        dict(check_on_train_epoch_end=False), LightningSettings(limit_val_batches=0), 1, "set check_on_train_epoch_end: true",
    ),
    "validation end, mid-epoch validation": (
        dict(check_on_train_epoch_end=False), LightningSettings(val_check_interval=0.5), 1, "set check_on_train_epoch_end",
    ),
    "strict before the first check": (
        dict(check_on_train_epoch_end=True), LightningSettings(), 3,
        "with strict: true would stop the run at the end of epoch 0, before the first memorization check "
        "(end of epoch 2): set strict: false in its init_args, or check_at_start: true in MemorizationCallback's",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", STALE, ids=str)
def test_early_stopping_that_would_read_an_old_check_is_refused(case):
    stopper_args, settings, every_n_epochs, message = STALE[case]
    stopper = L.pytorch.callbacks.EarlyStopping(monitor="memorization/frac_mem", mode="min", **stopper_args)
    assert message in stale_early_stopping(stopper, settings, every_n_epochs)


def test_early_stopping_that_reads_each_check_is_accepted():
    accepted = [
        (dict(check_on_train_epoch_end=True, strict=False), LightningSettings(check_val_every_n_epoch=7), 10),
        (dict(check_on_train_epoch_end=False), LightningSettings(check_val_every_n_epoch=5), 5),
        (dict(check_on_train_epoch_end=False, strict=False), LightningSettings(check_val_every_n_epoch=5), 25),
        ({}, LightningSettings(), 1),
    ]
    for stopper_args, settings, every_n_epochs in accepted:
        stopper = L.pytorch.callbacks.EarlyStopping(monitor="memorization/frac_mem", mode="min", **stopper_args)
        assert stale_early_stopping(stopper, settings, every_n_epochs) is None, (stopper_args, every_n_epochs)
    strict = L.pytorch.callbacks.EarlyStopping(monitor="memorization/frac_mem", check_on_train_epoch_end=True)
    assert stale_early_stopping(strict, LightningSettings(), 10, check_at_start=True) is None


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*_ldm*.yaml")), ids=lambda p: p.stem)
def test_every_ldm_config_stops_on_the_current_check(config):
    sections = printed_config("--config", str(config))  # an overlay (*_ldm_aug.yaml) with its base
    trainer = {key: value for key, value in sections["trainer"].items() if value is not None}  # None: Lightning's default
    settings = LightningSettings(
        check_val_every_n_epoch=trainer.get("check_val_every_n_epoch", 1),
        val_check_interval=trainer.get("val_check_interval", 1.0),
        limit_val_batches=trainer.get("limit_val_batches", 1.0),
    )
    # The configs carry both as sections of their own (cli.py adds them to the trainer's callbacks).
    memorization, early_stopping = sections["memorization"]["init_args"], sections["early_stopping"]
    assert early_stopping["init_args"]["monitor"].startswith("memorization/"), config.name
    stopper = instantiate_class((), early_stopping)
    every_n_epochs, at_start = memorization.get("every_n_epochs", 1), memorization.get("check_at_start", False)
    assert stale_early_stopping(stopper, settings, every_n_epochs, at_start) is None, config.name


def test_stale_early_stopping_is_refused_before_training(embedder_ckpt):
    callback = MemorizationCallback(str(embedder_ckpt), num_inference_steps=1, every_n_epochs=4)
    stopper = L.pytorch.callbacks.EarlyStopping(monitor="memorization/frac_mem", mode="min")
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback, stopper], check_val_every_n_epoch=3)
    with pytest.raises(InputError, match="set check_on_train_epoch_end: true in its init_args"):
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
    # training patients named by their ids: copied ones, and others only as often as chance has them pass τ
    memorized = set(summary["memorized_train_ids"])
    assert memorized & set(copied) and memorized <= set(phantoms().train_ids), memorized
    assert len(memorized - set(copied)) <= chance_ceiling(N_TRAIN - len(copied), len(copied)), memorized
    # per patient, intervals, chance level and the self-check, in the history, TensorBoard and summary.json
    assert summary["memorized_patient_ids"] == sorted(summary["memorized_train_ids"])
    assert summary["frac_mem_ci"] == second["frac_mem_ci"] and summary["detector"]["n_positive"] == len(phantoms().train_ids)
    for key in ("n_mem_patients", "frac_mem_patients", "excess_frac_mem", "null_frac_mem", "frac_mem_low", "frac_mem_high",
                "frac_mem_patients_low", "frac_mem_patients_high", "detector_sensitivity", "detector_specificity"):  # fmt: skip
        assert f"memorization/{key}" in tags["scalars"], key
    (low,) = [e.value for e in events.Scalars("memorization/frac_mem_low") if e.step == second["step"]]
    assert low == pytest.approx(second["frac_mem_ci"][0]) and low <= second["frac_mem"]
    assert second["excess_frac_mem"] == pytest.approx(second["frac_mem"] - second["null_frac_mem"])
    history = memorization_history(Path(logger.log_dir))
    assert history[1]["frac_mem_ci"] == pytest.approx(second["frac_mem_ci"])
    assert int(history[1]["n_mem_patients"]) == second["n_mem_patients"]
    margins = [chart for category in layout.category for chart in category.chart if chart.HasField("margin")]
    assert [series.value for chart in margins for series in chart.margin.series] == [
        "memorization/frac_mem_patients", "memorization/membership_auc"
    ]


def test_without_log_images_no_patient_pixels_are_written(embedder_ckpt, tmp_path):
    callback = MemorizationCallback(str(embedder_ckpt), n_samples=4, num_inference_steps=1, output_dir=str(tmp_path / "r"))
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run")
    fit_with_callback(ScriptedGenerator(copied_ids=phantoms().train_ids[:2]), callback, epochs=1, logger=logger)
    assert "copies.png" not in {p.name for p in (tmp_path / "r" / "check_000").iterdir()}
    page = (tmp_path / "r" / "check_000" / "report.html").read_text()
    assert page.count("<img") == 1 and "Images are not shown" in page  # the histogram alone
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert not events.Tags()["images"]


class WeightRecordingGenerator(ScriptedGenerator):
    """Records the weight of the model it samples from (the EMA copy, when one exists)."""

    seen: list[float] = []

    def sample(self, n: int, *args, **kwargs):
        WeightRecordingGenerator.seen.append(float(self.weight))
        return super().sample(n, *args, **kwargs)


def test_checks_sample_the_ema_weights_wherever_the_averaging_callback_is_listed(embedder_ckpt):
    # The check runs at validation end; EMAWeightAveraging swaps its weights in for validation and back
    # in its own on_validation_epoch_end, which runs after the check when it is listed after it.
    seen = {}
    for order in ("ema first", "ema last"):
        WeightRecordingGenerator.seen = []
        L.seed_everything(0)
        callback = MemorizationCallback(str(embedder_ckpt), n_samples=2, num_inference_steps=1)
        ema = L.pytorch.callbacks.EMAWeightAveraging(decay=0.5, use_buffers=False)
        trainer = quiet_trainer(
            max_epochs=3, limit_val_batches=1, callbacks=[ema, callback] if order == "ema first" else [callback, ema]
        )
        trainer.fit(WeightRecordingGenerator(), phantoms())
        seen[order] = list(WeightRecordingGenerator.seen)
    assert len(seen["ema first"]) == 3
    assert seen["ema first"] == pytest.approx(seen["ema last"], abs=1e-7)


def test_an_embedder_of_another_dimensionality_than_the_data_is_one_line(embedder_ckpt, tmp_path):
    from memwatch.lightning_modules import SimCLRModule

    volumes = PhantomDataModule(spatial_size=(16, 16, 16), n_patients=6, batch_size=2)
    embedder_3d = SimCLRModule(spatial_dims=3, embedding_dim=8, resnet_block="basic", resnet_layers=(1, 1, 1, 1),
                               channels=(4, 4, 4, 4))  # fmt: skip
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(embedder_3d, volumes)
    trainer.save_checkpoint(tmp_path / "embedder_3d.ckpt")

    for checkpoint, data_size, message in [
        (embedder_ckpt, (16, 16, 16), "the embedder takes 2D images but the data has spatial_size=[16, 16, 16]"),
        (tmp_path / "embedder_3d.ckpt", (32, 32), "the embedder takes 3D images but the data has spatial_size=[32, 32]"),
    ]:
        callback = MemorizationCallback(str(checkpoint))
        with pytest.raises(InputError, match=re.escape(message)) as raised:
            callback.check_data(SimpleNamespace(spatial_size=data_size))
        assert "\n" not in str(raised.value) and "pass an embedder of the data's dimensionality" in str(raised.value)
