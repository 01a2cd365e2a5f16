"""Which model the audit samples: the `--generator` checkpoint by path, sha256, global step and epoch, and a
refusal of a `last.ckpt` that another last checkpoint of the same run has overtaken.

Lightning's ModelCheckpoint writes `last-v1.ckpt` (`last-v2.ckpt`, ...) instead of overwriting `last.ckpt`
when it does not recognise that file as its own, as after a resume in which the run's folder was spelled
differently (memwatch's CLI now spells it one way; runs from before, or other scripts, may still do it).
The newest model is then not `last.ckpt`, and an audit of `last.ckpt` would clear an older model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from memwatch.errors import InputError
from memwatch.memorization.release import checkpoint_record

LAST_CHECKPOINT = re.compile(r"last(-v\d+)?\.ckpt")


def generator_checkpoint(path: str, option: str = "--generator") -> dict[str, Any]:
    """summary.json's `generator`: `{path, sha256, global_step, epoch}` of the readable checkpoint `path`.

    Refuses a `last.ckpt` (or `last-vN.ckpt`) with a last checkpoint of a later global step beside it."""
    file = Path(os.path.abspath(path))  # links kept: a `save_last="link"` last.ckpt is still named last
    global_step, epoch = training_progress(file)
    if LAST_CHECKPOINT.fullmatch(file.name) and global_step is not None:
        later = [
            (step, sibling)
            for sibling in file.parent.glob("last*.ckpt")
            if sibling != file and LAST_CHECKPOINT.fullmatch(sibling.name)
            and (step := training_progress(sibling)[0]) is not None and step > global_step
        ]  # fmt: skip
        if later:
            step, newest = max(later)
            raise InputError(
                f"{option}={path} is at global step {global_step}, but {newest} beside it is at step {step} "
                f"(a resumed run wrote its newer model there): audit that one with {option} {newest}, or move "
                f"the older {file.name} out of {file.parent}"
            )
    return {**checkpoint_record(file), "global_step": global_step, "epoch": epoch}


def training_progress(path: Path) -> tuple[int | None, int | None]:
    """A Lightning checkpoint's `(global_step, epoch)`; `None`s for a file that records none or cannot be read.
    Memory-mapped: the weights are not read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable file is no model to audit instead
        return None, None
    if not isinstance(checkpoint, dict):
        return None, None
    step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
    return (step if isinstance(step, int) else None), (epoch if isinstance(epoch, int) else None)
