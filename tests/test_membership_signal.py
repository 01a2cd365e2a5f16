"""The membership signal end to end: each model's scores, the callback's evaluations, logging, EarlyStopping, bad input."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memwatch.callbacks import MembershipCallback, MemorizationCallback
from memwatch.cli import main
from memwatch.datamodules import PhantomDataModule
from memwatch.errors import InputError
from memwatch.lightning_modules import LatentDiffusionModule, PixelDiffusionModule
from memwatch.memorization.history import MEMBERSHIP_HISTORY_FILE, read_history
from memwatch.memorization.membership import evaluate_membership
from memwatch.memorization.pipeline import Placement, score_dataset
from tests.doubles import MembershipScriptedGenerator, ScriptedGenerator
from tests.helpers import (
    MEMORIZATION_SIZE,
    ROOT,
    memorization_phantoms,
    printed_config,
    quiet_trainer,
    run_cli,
    scripted_config,
    tiny_autoencoder,
)

SIZE = (16, 16)
TINY_UNET = dict(channels=(16, 32), norm_num_groups=8, num_head_channels=8, num_train_timesteps=100)
# 30 training and 30 held-out patients at 16×16: enough held out for an interval, small enough for a CPU
PHANTOMS = {"spatial_size": SIZE, "n_patients": 60, "val_fraction": 0.5, "batch_size": 8}


def trained_scale(model: LatentDiffusionModule, data: PhantomDataModule) -> LatentDiffusionModule:
    """An LDM that has seen one training batch (its latent scale factor), ready to score."""
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, data)
    return model


@pytest.fixture(scope="module")
def models(autoencoder_ckpt) -> dict[str, torch.nn.Module]:
    L.seed_everything(0)
    data = PhantomDataModule(**PHANTOMS)
    pixel = PixelDiffusionModule(**TINY_UNET)
    pixel.image_spatial_size = SIZE
    return {
        "ldm": trained_scale(
            LatentDiffusionModule(autoencoder_ckpt=str(autoencoder_ckpt), **TINY_UNET), data
        ),
        "pixel_ddpm": pixel,
        "autoencoder": tiny_autoencoder(),
    }


@pytest.mark.parametrize("name", ["ldm", "pixel_ddpm", "autoencoder"])
def test_each_model_scores_an_image_by_its_id_alone(models, name):
    model = models[name]
    data = PhantomDataModule(**PHANTOMS)
    images = data.reference_dataset("train")
    ids = list(range(100, 100 + len(images)))

    def scores(block_size: int) -> torch.Tensor:
        return score_dataset(images, model.membership_scores, ids, block_size, Placement(torch.device("cpu")))

    first = scores(4)
    assert first.shape == (len(images),) and torch.isfinite(first).all() and first.std() > 0
    assert (first <= 0).all()  # minus a loss
    assert torch.equal(scores(4), first)  # an epoch later without training: the same bits
    torch.testing.assert_close(scores(7), first, rtol=1e-5, atol=1e-6)  # other batches: the same to rounding
    assert model.training  # left in the mode it was in
    if name != "autoencoder":  # the noise is the image's id's: another id, another score
        other = model.membership_scores(torch.stack([images[0]["image"]] * 2), ids=[100, 101])
        assert other[0] == pytest.approx(float(first[0]), rel=1e-5) and other[1] != other[0]


def test_a_diffusion_model_before_its_scale_factor_says_so(autoencoder_ckpt):
    model = LatentDiffusionModule(autoencoder_ckpt=str(autoencoder_ckpt), **TINY_UNET)
    model.image_spatial_size = SIZE
    with pytest.raises(InputError, match="has not seen a training batch"):
        model.membership_scores(torch.rand(2, 1, *SIZE), ids=[0, 1])


def fit_scripted(generator, callbacks: list[L.Callback], epochs: int, logger=False) -> L.Trainer:
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=callbacks, logger=logger)
    trainer.fit(generator, memorization_phantoms())
    return trainer


def test_a_generator_that_knows_its_training_images_scores_auc_near_one_and_one_that_does_not_covers_half(
    tmp_path,
):
    data = memorization_phantoms()
    generator = MembershipScriptedGenerator(
        member_ids=data.train_ids, members_from_epoch=1, spatial_size=MEMORIZATION_SIZE
    )
    membership = MembershipCallback()
    callback = MemorizationCallback(embedder="pixel", n_samples=2, num_inference_steps=1, every_n_epochs=3,
                                    detector_positives=0, progress_seconds=None)  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="run")
    fit_scripted(generator, [membership, callback], epochs=3, logger=logger)
    alike, *members = membership.history
    assert [row["epoch"] for row in membership.history] == [0, 1, 2]
    # Epoch 0: scores alike for every image (seeded by id): the interval covers 0.5, as the control's does
    assert alike["membership_auc_low"] < 0.5 < alike["membership_auc_high"], alike
    assert alike["membership_auc_control_low"] < 0.5 < alike["membership_auc_control_high"], alike
    assert not alike["membership_above_control"]
    for row in members:  # training images scored above every held-out one
        assert row["membership_auc"] > 0.99 and row["membership_tpr_at_5fpr"] > 0.9, row
        assert row["membership_above_control"], row
    # 32 held-out and as many training images, each once; the control is two halves of the training scores
    assert (membership.evaluation.signal.n_members, membership.evaluation.signal.n_non_members) == (32, 32)
    assert membership.evaluation.control.n_members == 16
    # Beside N_mem: in the check's row, in membership_history.csv, in TensorBoard and its custom-scalars page
    (check,) = callback.history
    assert check["membership_auc"] == members[-1]["membership_auc"] and check["n_mem"] >= 0
    written = read_history(Path(logger.log_dir) / MEMBERSHIP_HISTORY_FILE)
    assert [row["membership_auc"] for row in written] == pytest.approx(
        [r["membership_auc"] for r in membership.history]
    )
    assert "DeLong" in written[0]["membership_method"]
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    logged = events.Scalars("memorization/membership_auc")
    assert [e.step for e in logged] == [row["step"] for row in membership.history]  # once per evaluation
    for key in (
        "membership_auc_low",
        "membership_auc_high",
        "membership_tpr_at_5fpr",
        "membership_auc_control",
    ):
        assert f"memorization/{key}" in events.Tags()["scalars"], key


def test_membership_every_n_epochs_sets_its_period_and_zero_turns_it_off():
    data = memorization_phantoms()
    generator = MembershipScriptedGenerator(member_ids=data.train_ids, spatial_size=MEMORIZATION_SIZE)
    every_two = MembershipCallback(every_n_epochs=2, n_ref=12)
    check = MemorizationCallback(embedder="pixel", n_samples=2, num_inference_steps=1, every_n_epochs=5,
                                 detector_positives=0)  # fmt: skip
    fit_scripted(generator, [every_two, check], epochs=4)
    assert [row["epoch"] for row in every_two.history] == [1, 3] and not check.history
    assert every_two.evaluation.signal.n_non_members == 12 and every_two.evaluation.signal.n_members == 12
    off = MembershipCallback(every_n_epochs=0)
    check = MemorizationCallback(embedder="pixel", n_samples=2, num_inference_steps=1, detector_positives=0)
    fit_scripted(generator, [off, check], epochs=1)
    assert not off.history and "membership_auc" not in check.history[0]


def test_a_generator_without_membership_scores_gets_one_warning_and_no_signal():
    membership = MembershipCallback()
    callback = MemorizationCallback(
        embedder="pixel", n_samples=2, num_inference_steps=1, detector_positives=0
    )
    with pytest.warns(
        UserWarning, match=r"ScriptedGenerator has no membership_scores.*signal is off for this model"
    ) as caught:
        fit_scripted(ScriptedGenerator(), [membership, callback], epochs=2)
    assert len([w for w in caught if "membership_scores" in str(w.message)]) == 1
    assert not membership.history and len(callback.history) == 2


def test_too_few_held_out_images_is_one_error_line_naming_the_option(tmp_path):
    with pytest.raises(InputError, match=r"^--membership\.n_ref=9 is too few .* at least 10"):
        MembershipCallback(n_ref=9)
    with pytest.raises(InputError, match=r"^--membership\.every_n_epochs=-1 must be at least 0"):
        MembershipCallback(every_n_epochs=-1)
    result = run_cli(
        "fit", "--config", str(ROOT / "configs" / "phantom_ddpm.yaml"), "--memorization.embedder", "pixel",
        "--data.init_args.n_patients", "12", "--data.init_args.val_fraction", "0.5", "--trainer.max_steps", "1",
        "--memorization.percentile", "50",
        "--trainer.logger", "false", "--checkpoint.dirpath", str(tmp_path / "checkpoints"), cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[
        -2000:
    ]
    assert re.match(r"error: the data holds 6 held-out images, too few for a membership interval .*"
                    r"--membership.every_n_epochs 0", lines[0]), lines  # fmt: skip


def test_the_0_1_membership_arguments_of_the_check_warn_once_naming_the_membership_callback():
    for key, value in (("every_n_epochs", 2), ("n_ref", 9)):  # 9: not validated, as it does nothing here
        with pytest.warns(FutureWarning) as caught:
            MemorizationCallback(embedder="pixel", **{f"membership_{key}": value})
        assert [str(w.message) for w in caught if w.category is FutureWarning] == [
            f"memorization.membership_{key} is deprecated: use membership.{key} (MembershipCallback({key}=...))"
        ]


def membership_stop_config(tmp_path: Path, embedder_ckpt: Path, model: str, **model_args) -> Path:
    """A scripted run with the early_stopping section of configs/phantom_ldm_membership.yaml, as shipped."""
    path = scripted_config(
        tmp_path, embedder_ckpt, copy_from_epoch=100, max_epochs=8, early_stop=False,
        callback_args={"every_n_epochs": 4, "detector_positives": 0, "progress_seconds": None},
    )  # fmt: skip
    config = yaml.safe_load(path.read_text())
    shipped = printed_config("--config", str(ROOT / "configs" / "phantom_ldm_membership.yaml"))
    config["early_stopping"] = shipped["early_stopping"]
    config["model"]["class_path"] = f"tests.doubles.{model}"
    config["model"]["init_args"] |= model_args
    path.write_text(yaml.safe_dump(config))
    return path


def test_early_stopping_on_the_membership_signal_stops_and_keeps_the_last_safe_model(
    embedder_ckpt, tmp_path, caplog
):
    members = memorization_phantoms().train_ids
    config = membership_stop_config(
        tmp_path, embedder_ckpt, "MembershipScriptedGenerator", member_ids=members, members_from_epoch=2
    )
    with caplog.at_level(logging.INFO):
        cli = main(["fit", "--config", str(config)])
    history = read_history(Path(cli.trainer.log_dir) / MEMBERSHIP_HISTORY_FILE)
    # Epochs 0 and 1 without membership (an interval about 0.5), epoch 2 with: EarlyStopping stops there
    assert [row["epoch"] for row in history] == [0, 1, 2] and cli.trainer.should_stop
    assert history[2]["membership_auc_low"] > 0.9 and max(r["membership_auc_low"] for r in history[:2]) < 0.6
    checkpoints = Path(cli.trainer.checkpoint_callback.dirpath)
    safe = torch.load(checkpoints / "last_safe.ckpt", map_location="cpu", weights_only=True)
    assert safe["epoch"] == 1  # the last model whose membership interval stayed within the limit
    saved = [r.getMessage() for r in caplog.records if "last_safe.ckpt" in r.getMessage()]
    assert len(saved) == 2 and "memorization/membership_auc_low = " in saved[-1], saved


def test_early_stopping_on_membership_without_the_signal_is_refused(embedder_ckpt, tmp_path, capsys):
    config = membership_stop_config(tmp_path, embedder_ckpt, "ScriptedGenerator")
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config)])
    assert stop.value.code == 2
    assert re.search(r"^error: EarlyStopping\(monitor=memorization/membership_auc_low\) reads the membership signal, "
                     r"which is off .*--membership.every_n_epochs 1$", capsys.readouterr().err, flags=re.M)  # fmt: skip


def test_the_control_of_a_real_model_trained_a_few_steps_covers_half(tmp_path):
    L.seed_everything(0)
    model = PixelDiffusionModule(**TINY_UNET)
    membership = MembershipCallback()
    callback = MemorizationCallback(embedder="pixel", n_samples=2, num_inference_steps=1, detector_positives=0,
                                    progress_seconds=None)  # fmt: skip
    quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[membership, callback]).fit(
        model, PhantomDataModule(**PHANTOMS)
    )
    assert len(membership.history) == 2
    for row in membership.history:
        assert row["membership_auc_control_low"] < 0.5 < row["membership_auc_control_high"], row
    assert membership.evaluation.control.n_members == membership.evaluation.control.n_non_members == 15


def test_evaluation_keeps_the_scores_and_judges_above_control_by_intervals():
    rng = np.random.default_rng(0)
    apart = evaluate_membership(rng.normal(3, 1, 40), rng.normal(0, 1, 40), seed=1)
    alike = evaluate_membership(rng.normal(0, 1, 40), rng.normal(0, 1, 40), seed=1)
    assert apart.above_control and not alike.above_control
    assert len(apart.train_scores) == 40 and apart.control.n_members + apart.control.n_non_members == 40
    assert set(apart.summary()) >= {
        "auc",
        "auc_ci",
        "tpr_at_5fpr",
        "auc_control",
        "auc_control_ci",
        "above_control",
        "method",
    }
    assert evaluate_membership(rng.normal(0, 1, 3), rng.normal(0, 1, 12)).control is None  # too few to halve


def test_a_3d_pixel_ddpm_scores_volumes_the_same_in_any_batch():
    model = PixelDiffusionModule(spatial_dims=3, **TINY_UNET)
    model.image_spatial_size = (16, 16, 16)
    volumes = torch.rand(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    together = model.membership_scores(volumes, ids=[5, 6, 7])
    apart = torch.cat(
        [model.membership_scores(volumes[:1], ids=[5]), model.membership_scores(volumes[1:], ids=[6, 7])]
    )
    assert together.shape == (3,) and torch.isfinite(together).all()
    torch.testing.assert_close(apart, together, rtol=1e-5, atol=1e-6)
