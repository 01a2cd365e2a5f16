"""The memorization callbacks' checks before training: each refuses, in one line, a run that would fail later.

Data the embedder cannot take, an EarlyStopping that would read an old check or membership evaluation, a
generator without `sample()` or whose samples the embedder cannot take, sampler options it lacks, an
`output_dir` that would overwrite an input, too few held-out images for the membership signal.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from memwatch.callbacks.last_safe import memorization_stoppers
from memwatch.errors import InputError
from memwatch.lightning_modules.base import MemwatchModule
from memwatch.lightning_modules.plugins import TrustedModules, embedder_name, load_embedder
from memwatch.lightning_private import reads_at_train_epoch_end
from memwatch.memorization.chance import check_patients
from memwatch.memorization.check import CheckOptions
from memwatch.memorization.distributed import fail_together
from memwatch.memorization.embedders import SAMPLE_SIGNATURE, Embedder, membership_scorer, probe_generator
from memwatch.memorization.history import MEMBERSHIP_PREFIX
from memwatch.memorization.membership import MIN_HELD_OUT
from memwatch.memorization.output_folders import check_output_folders, data_paths
from memwatch.memorization.stream import rng_preserved

MEMBERSHIP_SCALARS = f"memorization/{MEMBERSHIP_PREFIX}"

EMBEDDER_OPTION = "--memorization.embedder_ckpt"  # how cli.py sets embedder_ckpt, named in errors


def load_callback_embedder(
    embedder_ckpt: str | None, embedder: str | dict[str, Any] | None, trust_modules: Sequence[str] = ()
) -> tuple[str, Embedder]:
    """The callback's embedder and its name: `embedder` when given (a class path in memwatch or in
    `trust_modules`), else the SimCLR checkpoint `embedder_ckpt`."""
    if embedder_ckpt is None and embedder is None:
        raise InputError(
            "MemorizationCallback needs its embedder: embedder_ckpt (a SimCLR checkpoint, "
            f"{EMBEDDER_OPTION} PATH) or embedder (pixel, or a class_path/init_args mapping, "
            "--memorization.embedder)"
        )
    if embedder is not None:
        trusted = TrustedModules(tuple(trust_modules), "--memorization.trust_modules [{module}]")
        return embedder_name(embedder), load_embedder(embedder, "memorization.embedder", trusted=trusted)
    return str(embedder_ckpt), load_embedder(str(embedder_ckpt), EMBEDDER_OPTION.removeprefix("--"))


def check_embedder_fits(
    embedder: Embedder,
    spatial_size: Sequence[int] | None,
    train_patients: Sequence[str] | None,
    val_patients: Sequence[str] | None,
    percentile: float,
) -> None:
    """Raise `InputError` if the embedder takes images of another dimensionality or size than the data's,
    or was trained on a patient the data holds out."""
    trained_on = embedder.image_spatial_size
    if spatial_size is not None and len(spatial_size) != embedder.spatial_dims:
        raise InputError(
            f"the embedder takes {embedder.spatial_dims}D images but the data has spatial_size={list(spatial_size)}: "
            "pass an embedder of the data's dimensionality"
        )
    if spatial_size is not None and trained_on is not None and tuple(spatial_size) != tuple(trained_on):
        raise InputError(
            f"the embedder was trained on images of spatial_size={list(trained_on)} but the data has "
            f"{list(spatial_size)}: train the embedder on this data (python cli.py fit --config configs/<dataset>_simclr.yaml)"
        )
    if train_patients is not None and val_patients is not None:
        check_patients(
            embedder.training_patients, train_patients, val_patients, percentile, "memorization.embedder_ckpt",
            EMBEDDER_OPTION,
        )  # fmt: skip


def check_early_stopping(
    trainer: Trainer, every_n_epochs: int, check_at_start: bool, prefix: str = "memorization/"
) -> None:
    """Raise `InputError` for an EarlyStopping on this check's scalars (`<prefix><key>`) that would read an old
    check or none (one on `memorization/membership_*` with no membership signal to read, too)."""
    for stopper in memorization_stoppers(trainer):
        key = stopper.monitor.removeprefix(prefix)
        if key == stopper.monitor or "/" in key:
            continue  # another check's, named
        if not stopper.monitor.startswith(MEMBERSHIP_SCALARS):
            problem = stale_early_stopping(stopper, trainer, every_n_epochs, check_at_start)
        elif not any(type(callback).__name__ == "MembershipCallback" for callback in trainer.callbacks):
            problem = membership_off(stopper)
        else:
            continue  # the membership callback judges its own
        if problem:
            raise InputError(problem)


def check_distinct_outputs(checks: Sequence[Any]) -> None:
    """Raise `InputError` when two of a Trainer's MemorizationCallbacks (`checks`) would write one history and one
    set of scalars, or one `output_dir`: each of several needs its own `name` (and `output_dir`)."""
    for attribute, what in (("prefix", "memorization_history.csv and scalars"), ("output_dir", "output_dir")):
        given = [getattr(check, attribute) for check in checks if getattr(check, attribute) is not None]
        if len(given) != len(set(given)):
            fix = "name" if attribute == "prefix" else attribute
            raise InputError(
                f"{len(checks)} MemorizationCallbacks in this Trainer would write the same {what}: give each its own "
                f"{fix} (MemorizationCallback({fix}=...))"
            )


def check_schedule(
    every_n_epochs: int, max_overhead: float, membership_every_n_epochs: int | None, membership_n_ref: int | None
) -> None:
    """Raise `InputError` for a MemorizationCallback schedule out of range; one FutureWarning for each 0.1
    membership argument (now `MembershipCallback`'s)."""
    if every_n_epochs < 1:
        raise InputError(f"--memorization.every_n_epochs={every_n_epochs} must be at least 1")
    if not 0.0 < max_overhead <= 10.0:
        raise InputError(f"--memorization.max_overhead={max_overhead} must lie in (0, 10], e.g. 0.25")
    for key, value in (("every_n_epochs", membership_every_n_epochs), ("n_ref", membership_n_ref)):
        if value is not None:
            message = f"memorization.membership_{key} is deprecated: use membership.{key} (MembershipCallback({key}=...))"
            rank_zero_warn(message, category=FutureWarning)


def check_name(name: str | None) -> str:
    """The scalar prefix of a check named `name`; `InputError` unless it can name a file and a scalar group."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise InputError(f"--memorization.name={name!r}: use letters, digits, '_', '.' or '-'")
    return f"memorization/{name}/" if name else "memorization/"


def check_membership_stopping(trainer: Trainer, every_n_epochs: int) -> None:
    """Raise `InputError` for an EarlyStopping on `memorization/membership_*` that would read an old membership
    evaluation or none (`every_n_epochs` 0: the signal is off)."""
    for stopper in memorization_stoppers(trainer):
        if stopper.monitor.startswith(MEMBERSHIP_SCALARS):
            problem = (
                stale_early_stopping(stopper, trainer, every_n_epochs, evaluation="membership evaluation")
                if every_n_epochs
                else membership_off(stopper)
            )
            if problem:
                raise InputError(problem)


def membership_off(stopper: EarlyStopping) -> str:
    return (
        f"EarlyStopping(monitor={stopper.monitor}) reads the membership signal, which is off (the model has no "
        "membership_scores, or --membership.every_n_epochs is 0): monitor memorization/n_mem_patients, or set "
        "--membership.every_n_epochs 1"
    )


def stale_early_stopping(
    stopper: EarlyStopping,
    trainer: Trainer,
    every_n_epochs: int,
    check_at_start: bool = False,
    evaluation: str = "memorization check",
) -> str | None:
    """Why `stopper` (monitoring `memorization/*`) would not read the check that just ran, or `None` if it would.

    Checks end the epochs `e` with `(e + 1) % every_n_epochs == 0`, at validation end when that
    epoch validates. EarlyStopping reads at train epoch end (after every non-monitoring callback,
    whatever the list order) or at validation end; the latter is current only if every check
    epoch validates at its end.
    """
    name = f"EarlyStopping(monitor={stopper.monitor})"
    if not reads_at_train_epoch_end(stopper, trainer):
        every_k = trainer.check_val_every_n_epoch
        validates_each_check = (
            trainer.limit_val_batches != 0
            and every_k is not None
            and trainer.val_check_interval == 1.0
            and every_n_epochs % every_k == 0
        )
        if not validates_each_check:
            return (
                f"{name} reads at validation end (check_val_every_n_epoch={every_k}, "
                f"val_check_interval={trainer.val_check_interval}), but {evaluation}s run every "
                f"{every_n_epochs} epochs, so it would read an old {evaluation.split()[-1]}: set check_on_train_epoch_end: true "
                "in its init_args"
            )
        first_read = every_k - 1
    else:
        first_read = 0
    first_check = 0 if check_at_start else every_n_epochs - 1
    if stopper.strict and first_check > first_read:
        return (
            f"{name} with strict: true would stop the run at the end of epoch {first_read}, before the first "
            f"{evaluation} (end of epoch {first_check}): set strict: false in its init_args, or "
            "check_at_start: true in MemorizationCallback's"
        )
    return None


def check_generator(generator: LightningModule) -> None:
    """Raise `InputError` unless the model can be sampled (`memwatch.memorization.embedders.Generator`)."""
    if not callable(getattr(generator, "sample", None)):
        raise InputError(
            f"MemorizationCallback needs a model with sample(); {type(generator).__name__} has none: implement "
            f"{SAMPLE_SIGNATURE} as memwatch.memorization.embedders.Generator describes, returning "
            "[n, C, *spatial] images in [0, 1]"
        )


def check_sampler_options(generator: LightningModule, device: torch.device, options: CheckOptions) -> None:
    """Raise `InputError` for a sampler option the generator cannot take; a notice where it does nothing."""
    decode_batch_size, sampler_graphs = options.decode_batch_size, options.sampler_graphs
    if decode_batch_size is not None and not accepts_keyword(generator.sample, "decode_batch_size"):
        raise InputError(
            f"--memorization.decode_batch_size: {type(generator).__name__}.sample takes no decode_batch_size: "
            "leave it unset, or add the keyword to sample"
        )
    if sampler_graphs and not callable(getattr(generator, "sampler_graphs", None)):
        raise InputError(
            f"--memorization.sampler_graphs: {type(generator).__name__} has no sampler_graphs() to capture its "
            "sampling step (memwatch's diffusion modules have one): set --memorization.sampler_graphs false"
        )
    if sampler_graphs and device.type != "cuda":
        rank_zero_info(
            "memorization.sampler_graphs: CUDA graphs need a GPU; on this CPU sampling runs as without"
        )


def check_output_dir(trainer: Trainer, output_dir: Path | None, embedder_ckpt: str) -> None:
    """Refuse, on every rank, an `output_dir` that overlaps the data, the embedder or the current folder, or
    cannot be written (`memorization.output_folders.check_output_folders`)."""
    with fail_together(trainer.strategy.root_device, "checking output_dir"):
        if output_dir is not None:
            checkpoint = [("embedder_ckpt", embedder_ckpt)] if Path(embedder_ckpt).is_file() else []
            inputs = [*data_paths(trainer.datamodule).items(), *checkpoint]
            check_output_folders({"output_dir": output_dir}, inputs, replaces=False)


def probe_sampler(
    trainer: Trainer, generator: LightningModule, options: CheckOptions, channels: int, spatial_size: Sequence[int]
) -> None:
    """Sample a user's generator once, refusing in one line samples the embedder cannot take
    (`memorization.embedders.probe_generator`), and capture the sampling step's CUDA graph when asked."""
    device = generator.device
    with rng_preserved(device), fail_together(device, "checking the generator's samples"):
        # memwatch's own generators are tested to fit (and the LDM cannot sample before its first batch).
        if not isinstance(generator, MemwatchModule):
            probe_generator(
                generator, (options.seed, 0), channels, spatial_size, type(generator).__name__,
                options.sample_keywords(),
            )  # fmt: skip
        probe = getattr(generator, "probe_sampler_graphs", None)
        if options.sampler_graphs and device.type == "cuda" and probe is not None:
            with trainer.precision_plugin.forward_context():
                probe(options.sample_batch_size)


def accepts_keyword(method: Callable, name: str) -> bool:
    """Whether `method` takes the keyword `name` (named, or through `**kwargs`)."""
    parameters = inspect.signature(method).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def warn_without_membership_scores(generator: LightningModule, every_n_epochs: int) -> None:
    """One warning when the membership signal is asked for and the generator has no `membership_scores`."""
    if every_n_epochs and membership_scorer(generator) is None:
        rank_zero_warn(
            f"membership.every_n_epochs: {type(generator).__name__} has no membership_scores(images, ids), "
            "so the membership signal is off for this model (memwatch's diffusion and autoencoder modules have one)"
        )


def check_membership_data(n_val: int, n_ref: int | None) -> None:
    """Raise `InputError` when fewer than `MIN_HELD_OUT` held-out images would be scored."""
    if min(n_val, n_ref or n_val) < MIN_HELD_OUT:
        raise InputError(
            f"the data holds {n_val} held-out images, too few for a membership interval (at least {MIN_HELD_OUT}): "
            "hold out more patients, or set --membership.every_n_epochs 0"
        )
