"""Each memorization callback alone in a plain Lightning script, and several together across a resume:
MembershipCallback and MemorizationCallback with a user's own DataModule, LastSafeCheckpoint beside EarlyStopping,
two MemorizationCallbacks in one Trainer, and a checkpoint of memwatch 0.1."""

from __future__ import annotations

import contextlib
import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from memwatch.callbacks import LastSafeCheckpoint, MembershipCallback, MemorizationCallback
from memwatch.errors import InputError
from memwatch.memorization.history import (
    HISTORY_FILE,
    MEMBERSHIP_HISTORY_FILE,
    MEMBERSHIP_PREFIX,
    history_file,
    read_history,
)
from tests.doubles import MembershipScriptedGenerator, ScriptedGenerator
from tests.helpers import N_COPIED_TO_STOP, STOP_FRAC_MEM, memorization_phantoms, quiet_trainer

# --- a researcher's own data and generator: nothing of memwatch -----------------------------------

SIZE = 16
N_PATIENTS = 20  # per split: τ at the 95th percentile needs 20 held out, a membership interval 10


def scan(patient: int) -> torch.Tensor:
    """A smooth random image `[1, SIZE, SIZE]` in [0, 1] of its own for each patient."""
    blobs = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(patient))
    return torch.nn.functional.interpolate(blobs, size=(SIZE, SIZE), mode="bilinear")[0].clamp(0, 1)


class Scans(Dataset):
    def __init__(self, patients: range) -> None:
        self.items = [{"image": scan(p), "patient": f"p{p:03d}", "id": f"p{p:03d}"} for p in patients]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class UserData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Scans(range(N_PATIENTS)), batch_size=4, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Scans(range(100, 100 + N_PATIENTS)), batch_size=4)


class UserGenerator(L.LightningModule):
    """A generator that memorized its training scans: sample `i` is a noisy copy of training patient `i`, and
    an image scores minus its distance to the nearest training scan (about 0 for those, lower for others)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.remembered = torch.stack([scan(p) for p in range(N_PATIENTS)])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, n, seed=0, num_inference_steps=50, sample_batch_size=16, start_index=0) -> torch.Tensor:
        indices = range(start_index, start_index + n)
        noise = [torch.randn(1, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in indices]
        copies = [self.remembered[i % N_PATIENTS] + 0.01 * e for i, e in zip(indices, noise, strict=True)]
        return torch.stack(copies).clamp(0, 1)

    def membership_scores(self, images: torch.Tensor, ids) -> torch.Tensor:
        distances = (images.cpu()[:, None] - self.remembered[None]).pow(2).flatten(2).mean(2)
        return -distances.min(1).values


def fit_user_script(tmp_path: Path, callbacks: list[L.Callback], epochs: int) -> Path:
    """A plain Trainer with a CSVLogger on the user's data and generator; the logger's folder."""
    logger = CSVLogger(tmp_path, name="mine")
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, logger=logger, callbacks=callbacks)
    trainer.fit(UserGenerator(), datamodule=UserData())
    return Path(trainer.log_dir)


def logged_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as rows:
        return list(csv.DictReader(rows))


def test_the_membership_callback_alone_logs_its_signal_and_writes_its_history_in_the_logger_s_folder(
    tmp_path,
):
    membership = MembershipCallback()
    log_dir = fit_user_script(tmp_path, [membership], epochs=2)
    written = read_history(log_dir / MEMBERSHIP_HISTORY_FILE)
    assert [row["epoch"] for row in written] == [0, 1]
    # The generator knows its training scans: every training image scores above every held-out one.
    assert all(row["membership_auc"] > 0.99 for row in written), written
    assert membership.evaluation.signal.n_members == membership.evaluation.signal.n_non_members == N_PATIENTS
    logged = [row for row in logged_metrics(log_dir) if row.get("memorization/membership_auc")]
    assert [int(row["step"]) for row in logged] == [row["step"] for row in membership.history]
    assert [float(row["memorization/membership_auc"]) for row in logged] == pytest.approx(
        [row["membership_auc"] for row in written]
    )
    assert not (log_dir / HISTORY_FILE).exists()  # no check without a MemorizationCallback


@pytest.mark.parametrize("arguments", [{}, {"membership_every_n_epochs": 1}], ids=["as_now", "0.1_arguments"])
def test_the_memorization_callback_alone_counts_copies_and_evaluates_no_membership(tmp_path, arguments):
    # The generator has membership_scores: only a MembershipCallback evaluates them (0.1's arguments do nothing).
    with pytest.warns(FutureWarning) if arguments else contextlib.nullcontext():
        callback = MemorizationCallback(embedder="pixel", n_samples=8, sample_batch_size=4, detector_positives=0,
                                        progress_seconds=None, **arguments)  # fmt: skip
    log_dir = fit_user_script(tmp_path, [callback], epochs=1)
    (row,) = read_history(log_dir)
    assert (row["n_train"], row["n_syn"], row["n_copies"]) == (N_PATIENTS, 8, 8)  # every sample a copy
    assert row["n_mem_patients"] >= 4, row  # at least half of the 8 patients copied are found
    assert not [key for key in row if key.startswith(MEMBERSHIP_PREFIX)], row
    assert not (log_dir / MEMBERSHIP_HISTORY_FILE).exists()
    logged = {key for row in logged_metrics(log_dir) for key, value in row.items() if value}
    assert "memorization/n_mem" in logged and not [key for key in logged if "membership" in key], logged


class RecordingScores(MembershipScriptedGenerator):
    """Scores every image by a draw seeded by its id (no membership), recording the size of each block."""

    def __init__(self) -> None:
        super().__init__(members_from_epoch=100)
        self.blocks: list[int] = []

    def membership_scores(self, images: torch.Tensor, ids) -> torch.Tensor:
        self.blocks.append(len(images))
        return super().membership_scores(images, ids)


def test_the_membership_callback_takes_the_check_s_block_size_and_seed_unless_given():
    def evaluate(membership: MembershipCallback, *others: L.Callback) -> tuple[set[int], float]:
        generator = RecordingScores()
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[membership, *others])
        trainer.fit(generator, memorization_phantoms())
        (row,) = membership.history
        return set(generator.blocks), row["membership_auc_control"]  # the control's split follows the seed

    check = MemorizationCallback(embedder="pixel", n_samples=2, sample_batch_size=4, seed=7, num_inference_steps=1,
                                 detector_positives=0, progress_seconds=None)  # fmt: skip
    beside_check = evaluate(MembershipCallback(), check)
    assert beside_check == evaluate(MembershipCallback(batch_size=4, seed=7))
    alone_blocks, alone_control = evaluate(MembershipCallback())
    assert alone_blocks == {16} and alone_control != beside_check[1]


# --- LastSafeCheckpoint beside EarlyStopping ----------------------------------------------------


def fit_with_stopper(tmp_path: Path, callback: MemorizationCallback, stopper: EarlyStopping, epochs: int):
    generator = ScriptedGenerator(
        copied_ids=memorization_phantoms().train_ids[:N_COPIED_TO_STOP], copy_from_epoch=2
    )
    trainer = quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, enable_checkpointing=True, default_root_dir=tmp_path,
        callbacks=[callback, LastSafeCheckpoint(), stopper],
    )  # fmt: skip
    trainer.fit(generator, memorization_phantoms())
    return trainer


def test_last_safe_checkpoint_keeps_the_last_model_within_the_early_stopping_limit(
    embedder_ckpt, tmp_path, caplog
):
    callback = MemorizationCallback(str(embedder_ckpt), num_inference_steps=1, detector_positives=0,
                                    progress_seconds=None)  # fmt: skip
    stopper = EarlyStopping(monitor="memorization/frac_mem", mode="min", divergence_threshold=STOP_FRAC_MEM,
                            check_on_train_epoch_end=True, strict=False)  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer = fit_with_stopper(tmp_path, callback, stopper, epochs=6)
    # Checks 0 and 1 see novel patients (chance level), check 2 the copies: EarlyStopping stops there.
    assert [row["frac_mem"] > STOP_FRAC_MEM for row in callback.history] == [False, False, True]
    assert trainer.should_stop and trainer.current_epoch == 3
    (safe_path,) = tmp_path.rglob("last_safe.ckpt")
    assert safe_path.parent == Path(trainer.checkpoint_callback.dirpath)  # beside the other checkpoints
    safe = torch.load(safe_path, map_location="cpu", weights_only=True)
    (history,) = [state["history"] for key, state in safe["callbacks"].items() if key == callback.state_key]
    assert safe["epoch"] == 1 and [row["check"] for row in history] == [0, 1]
    saved = [r.getMessage() for r in caplog.records if "last_safe.ckpt" in r.getMessage()]
    assert len(saved) == 2 and all("memorization/frac_mem = " in line for line in saved), saved


def test_without_a_divergence_threshold_no_last_safe_checkpoint_is_saved(tmp_path):
    callback = MemorizationCallback(embedder="pixel", n_samples=4, num_inference_steps=1, detector_positives=0,
                                    progress_seconds=None)  # fmt: skip
    stopper = EarlyStopping(monitor="memorization/frac_mem", mode="min", patience=100, check_on_train_epoch_end=True,
                            strict=False)  # fmt: skip
    trainer = fit_with_stopper(tmp_path, callback, stopper, epochs=2)
    assert len(callback.history) == 2 and list(Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt"))
    assert not list(tmp_path.rglob("last_safe.ckpt"))


# --- several callbacks across a resume ------------------------------------------------------------


def fit_resumable(
    tmp_path: Path, generator, callbacks: list[L.Callback], epochs: int, ckpt_path=None, **trainer
):
    """Fit on `memorization_phantoms()`, saving `last.ckpt` in `tmp_path/checkpoints` at every epoch end."""
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, enable_checkpointing=True, callbacks=[*callbacks, every_epoch],
        **trainer,
    ).fit(generator, memorization_phantoms(), ckpt_path=ckpt_path)  # fmt: skip
    return tmp_path / "checkpoints" / "last.ckpt"


def places(history: list[dict]) -> list[tuple[int, int, int, int]]:
    """(check, epoch, step, n_syn) of each row: where each check ran, and with whose options."""
    return [(row["check"], row["epoch"], row["step"], row["n_syn"]) for row in history]


TWO_CHECKS = {  # (embedder, every_n_epochs, n_samples) of each callback: they differ in one part of the state key
    "every_n_epochs": (("pixel", 1, 4), ("pixel", 2, 6)),
    "embedder": (("pixel", 1, 4), ("embedder_ckpt", 1, 6)),
}


@pytest.mark.parametrize("case", TWO_CHECKS)
def test_two_memorization_callbacks_keep_their_own_history_across_a_resume(case, tmp_path, request):
    def two_checks() -> list[MemorizationCallback]:
        return [
            MemorizationCallback(
                embedder=embedder if embedder == "pixel" else None, every_n_epochs=every_n_epochs,
                embedder_ckpt=str(request.getfixturevalue("embedder_ckpt")) if embedder != "pixel" else None,
                n_samples=n_samples, num_inference_steps=1, detector_positives=0, progress_seconds=None,
                name=f"check{k}",
            )
            for k, (embedder, every_n_epochs, n_samples) in enumerate(TWO_CHECKS[case])
        ]  # fmt: skip

    def logger() -> CSVLogger:
        return CSVLogger(tmp_path, name="run", version=0)

    first = two_checks()
    assert first[0].state_key != first[1].state_key
    last = fit_resumable(tmp_path, ScriptedGenerator(), first, epochs=2, logger=logger())
    states = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]
    saved = {key: places(state["history"]) for key, state in states.items() if key.startswith("Memorization")}
    assert saved == {check.state_key: places(check.history) for check in first}
    resumed = two_checks()
    fit_resumable(tmp_path, ScriptedGenerator(), resumed, epochs=4, ckpt_path=last, logger=logger())
    for before, after, (_, every_n_epochs, n_samples) in zip(first, resumed, TWO_CHECKS[case], strict=True):
        epochs = [epoch for epoch in range(4) if (epoch + 1) % every_n_epochs == 0]
        assert [(row["check"], row["epoch"], row["n_syn"]) for row in after.history] == [
            (index, epoch, n_samples) for index, epoch in enumerate(epochs)
        ], case
        assert places(after.history[: len(before.history)]) == places(
            before.history
        )  # its own rows, continued
        written = read_history(tmp_path / "run" / "version_0" / history_file(after.name))
        assert places(written) == places(after.history)  # its own file, every row


def test_two_unnamed_memorization_callbacks_are_refused_in_one_line():
    checks = [
        MemorizationCallback(embedder="pixel", n_samples=4, num_inference_steps=1, detector_positives=0,
                             progress_seconds=None, every_n_epochs=every)
        for every in (1, 2)
    ]  # fmt: skip
    with pytest.raises(InputError, match=r"^2 MemorizationCallbacks in this Trainer would write the same "
                       r"memorization_history.csv and scalars: give each its own name"):  # fmt: skip
        quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=checks).fit(ScriptedGenerator(), memorization_phantoms())


def test_a_0_1_checkpoint_resumes_with_both_histories(tmp_path):
    # memwatch 0.1 kept one MemorizationCallback state, under its class name, holding both histories.
    members = memorization_phantoms().train_ids

    def evaluators() -> tuple[MembershipCallback, MemorizationCallback]:
        check = MemorizationCallback(embedder="pixel", n_samples=4, num_inference_steps=1, detector_positives=0,
                                     progress_seconds=None)  # fmt: skip
        return MembershipCallback(), check

    def generator() -> MembershipScriptedGenerator:
        return MembershipScriptedGenerator(member_ids=members, members_from_epoch=1)

    membership, check = evaluators()
    last = fit_resumable(tmp_path, generator(), [membership, check], epochs=2)
    assert check.history[-1]["membership_auc"] == membership.history[-1]["membership_auc"]
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    states = {
        key: state for key, state in checkpoint["callbacks"].items() if not key.startswith(("Membership", "Memorization"))
    }  # fmt: skip
    states["MemorizationCallback"] = {"history": check.history, "membership_history": membership.history}
    checkpoint["callbacks"] = states
    old = tmp_path / "memwatch-0.1.ckpt"
    torch.save(checkpoint, old)

    resumed_membership, resumed_check = evaluators()
    logger = CSVLogger(tmp_path, name="resumed")
    fit_resumable(
        tmp_path, generator(), [resumed_membership, resumed_check], epochs=3, ckpt_path=old, logger=logger
    )
    assert [row["epoch"] for row in resumed_membership.history] == [0, 1, 2]
    assert resumed_membership.history[:2] == membership.history
    assert [(row["check"], row["epoch"]) for row in resumed_check.history] == [(0, 0), (1, 1), (2, 2)]
    assert places(resumed_check.history[:2]) == places(check.history)
    # The check of epoch 2 carries that epoch's evaluation; the files hold every row, the 0.1 ones included.
    assert resumed_check.history[2]["membership_auc"] == resumed_membership.history[2]["membership_auc"]
    log_dir = Path(logger.log_dir)
    assert [row["epoch"] for row in read_history(log_dir / MEMBERSHIP_HISTORY_FILE)] == [0, 1, 2]
    assert [row["check"] for row in read_history(log_dir)] == [0, 1, 2]
