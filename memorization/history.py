"""`memorization_history.csv`: one row per memorization check, written by the callback, read by everything else.

A row holds the check's place (`check`, `epoch`, `step`), its copy rule (`rule`, `margin`), the
headline numbers of `memorization.summary.headline` (counts, fractions, `*_ci` intervals, chance level),
`fd`, `ms_ssim`, what the check cost (`check_seconds`, `overhead`, `seconds_*`) and, when the membership
signal was evaluated at the same step, its `membership_*` columns. `membership_history.csv` holds every
membership evaluation (`epoch`, `step`, `membership_*`), checked or not. Intervals are
written as JSON lists, `"[low, high]"`; a value that could not be computed is empty. Rows resumed
from older runs may lack columns that newer ones have: the header is the union, in first-seen order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memwatch.memorization.stats import logged_scalars

HISTORY_FILE = "memorization_history.csv"
MEMBERSHIP_HISTORY_FILE = (
    "membership_history.csv"  # one row per membership evaluation (epoch, step, membership_*)
)
# Columns that place a check rather than measure it: never logged as scalars.
PLACE_KEYS = ("check", "epoch", "step", "n_train", "n_train_patients", "n_syn", "rule", "margin")
TIMING_PREFIX = "seconds_"  # per-rank timings: in the CSV, not logged, not in summary.json
MEMBERSHIP_PREFIX = "membership_"  # the membership signal's columns; logged as memorization/membership_*


def row_scalars(row: Mapping[str, Any], prefix: str = "memorization/") -> dict[str, float]:
    """A history row's logged scalars `<prefix><key>` (`fd` and `ms_ssim` left out when `None`)."""
    return logged_scalars(
        {k: v for k, v in row.items() if k not in PLACE_KEYS and not k.startswith(TIMING_PREFIX)}, prefix
    )


def history_file(name: str | None) -> str:
    """The history file of a check named `name` (`MemorizationCallback(name=...)`), `HISTORY_FILE` unnamed."""
    return HISTORY_FILE if not name else f"memorization_history_{name}.csv"


def write_history(folder: Path, rows: Sequence[Mapping[str, Any]], name: str = HISTORY_FILE) -> Path:
    """Write `rows` to `folder/name` (the folder is created), replacing the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    columns = dict.fromkeys(key for row in rows for key in row)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(
            {k: json.dumps(v) if isinstance(v, list | tuple) else v for k, v in row.items()} for row in rows
        )
    return path


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a history (the CSV, or the run folder holding it), with numbers as numbers, intervals as
    `[low, high]` lists, and empty cells as `None`."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    with path.open(newline="") as handle:
        return [{key: _value(text) for key, text in row.items()} for row in csv.DictReader(handle)]


def _value(text: str | None) -> Any:
    if text is None or text == "":
        return None
    if text.startswith("["):
        return json.loads(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text in ("True", "False"):
        return text == "True"
    return text
