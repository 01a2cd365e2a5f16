"""A verifiable release: `manifest.json` records what the audit checked, `verify_release` checks a folder against it.

The manifest lists every released file with its sha256, its nearest-training correlation and
its margin below τ, together with τ, the percentile, the path and sha256 of the embedder (and generator)
checkpoint (the generator's with its global step and epoch), memwatch's version, the date and the audit's summary. It names no training patient:
a release leaves the hospital, so the summary's lists of memorized patients and images stay in
the audit's own report. Anyone holding the folder can re-hash it later and learn whether a file
was added, removed or changed since the audit, and, where a checkpoint still lies at its recorded
path, whether it is still the model that was audited.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memwatch.errors import InputError

MANIFEST = "manifest.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Lists of training ids: they identify patients and stay in the audit's report.
PRIVATE_SUMMARY_KEYS = (
    "memorized_train_ids",
    "memorized_patient_ids",
    "copy_syn_ids",
    "inputs",
    "release",
    "out",
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def memwatch_version() -> dict[str, str | None]:
    """The package version and, in a git clone of memwatch, its commit."""
    import memwatch

    commit = None
    if (PROJECT_ROOT / ".git").exists():  # installed under site-packages: no commit to name
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"version": memwatch.__version__, "git_commit": commit or None}


def checkpoint_record(path: str | Path) -> dict[str, Any]:
    """A checkpoint as the summary and the manifest name it: its absolute path (links kept) and sha256."""
    absolute = Path(os.path.abspath(path))
    return {"path": str(absolute), "sha256": sha256(absolute)}


def describe_checkpoint(record: Mapping[str, Any]) -> str:
    """`checkpoint_record` (with the generator's `global_step` and `epoch`) in one line, for the terminal and
    report.html."""
    progress = ", ".join(
        f"{label} {record[key]}" for key, label in (("global_step", "global step"), ("epoch", "epoch"))
        if record.get(key) is not None
    )  # fmt: skip
    return f"{record['path']} ({progress + ', ' if progress else ''}sha256 {record['sha256']})"


@dataclass(frozen=True)
class ReleasedFile:
    path: str  # relative to the release folder, with "/"
    nearest_train_correlation: dict[str, float]  # per embedder, the audit's first one first


def release_non_copies(
    files: Sequence[Path], relative: Sequence[Path], withheld: Sequence[bool], folder: Path
) -> list[tuple[str, int]]:
    """Copy the synthetic `files` not `withheld` into `folder` at their `relative` paths; returns each released
    file's relative path and row."""
    released = []
    for row, (path, inside, held) in enumerate(zip(files, relative, withheld, strict=True)):
        if not held:
            (folder / inside).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / inside)
            released.append((inside.as_posix(), row))
    return released


def released_files(
    released: Sequence[tuple[str, int]], nearest: Mapping[str, Sequence[float]]
) -> list[ReleasedFile]:
    """The manifest's entries of `released` (path, row), with each embedder's nearest training correlations."""
    return [
        ReleasedFile(path, {name: float(values[row]) for name, values in nearest.items()})
        for path, row in released
    ]


def write_manifest(
    folder: Path,
    files: Sequence[ReleasedFile],
    *,
    taus: Mapping[str, float],
    percentile: float,
    n_withheld: int,
    checkpoints: Mapping[str, str | Mapping[str, Any] | None],
    summary: Mapping[str, Any],
) -> Path:
    """Write `folder/manifest.json` for the released `files` (already in `folder`); `taus` holds each
    embedder's τ (the first is the headline's), `checkpoints` maps a role to its checkpoint path or to its
    `checkpoint_record` (hashed already, perhaps with more fields such as the generator's global step).

    A file's `nearest_train_correlation` and `margin_below_tau` are the first embedder's; with
    several embedders `by_embedder` gives every one's.
    """
    primary = next(iter(taus))
    manifest = {
        "format": "memwatch-release-manifest/1",
        "memwatch": memwatch_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tau": taus[primary],
        "taus": dict(taus),
        "percentile": percentile,
        "n_released": len(files),
        "n_withheld": n_withheld,
        "checkpoints": {
            role: {"file": Path(record["path"]).name, **record}
            for role, record in (
                (role, checkpoint if isinstance(checkpoint, Mapping) else checkpoint_record(checkpoint))
                for role, checkpoint in checkpoints.items()
                if checkpoint is not None
            )
        },
        "files": [_entry(folder, released, taus, primary) for released in files],
        "summary": {key: value for key, value in summary.items() if key not in PRIVATE_SUMMARY_KEYS},
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _entry(folder: Path, released: ReleasedFile, taus: Mapping[str, float], primary: str) -> dict[str, Any]:
    def closeness(name: str) -> dict[str, float]:
        correlation = released.nearest_train_correlation[name]
        return {
            "nearest_train_correlation": round(correlation, 6),
            "margin_below_tau": round(taus[name] - correlation, 6),
        }

    entry = {"path": released.path, "sha256": sha256(folder / released.path), **closeness(primary)}
    if len(taus) > 1:
        entry["by_embedder"] = {name: closeness(name) for name in taus}
    return entry


def verify_release(folder: Path) -> dict[str, Any]:
    """Re-hash `folder` against its manifest: the files `added`, `missing` and `changed` since the audit, and
    each recorded checkpoint (`checkpoints`: role, path, and `state` unchanged, changed or missing)."""
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise InputError(f"--verify-release {folder} is not a folder: pass the --release-dir of an audit")
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    except FileNotFoundError:
        raise InputError(
            f"{manifest_path} does not exist: --verify-release needs a folder written by cli.py audit --release-dir"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"{manifest_path} is not a memwatch release manifest ({type(error).__name__}: {error}): "
            "restore it from the audit's --release-dir"
        ) from None
    present = {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path != manifest_path
    }
    changed = [
        name for name in sorted(recorded.keys() & present.keys()) if sha256(present[name]) != recorded[name]
    ]
    added, missing = sorted(present.keys() - recorded.keys()), sorted(recorded.keys() - present.keys())
    checkpoints = checkpoint_states(manifest.get("checkpoints") or {})
    return {
        "verified": not (added or missing or changed or any(c["state"] == "changed" for c in checkpoints)),
        "dir": str(folder),
        "n_files": len(recorded),
        "added": added,
        "missing": missing,
        "changed": changed,
        "checkpoints": checkpoints,
        "created": manifest.get("created"),
        "tau": manifest.get("tau"),
    }


def checkpoint_states(recorded: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """Each recorded checkpoint with its path (older manifests record none: not checked) and whether the
    file there is still the one audited: `unchanged`, `changed`, or `missing` (moved or deleted, so unknown)."""
    states = []
    for role, record in recorded.items():
        if not isinstance(record, Mapping) or not record.get("path"):
            continue
        path = Path(record["path"])
        state = (
            "missing"
            if not path.is_file()
            else "unchanged"
            if sha256(path) == record.get("sha256")
            else "changed"
        )
        states.append({"role": role, "path": str(path), "state": state})
    return states
