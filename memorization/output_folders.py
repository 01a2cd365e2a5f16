"""Output folders that cannot destroy data: checked before any work, written beside and renamed into place.

`check_output_folders` refuses, in one line, an output folder that is or holds the folder the command runs
in, that overlaps another output or an input (either inside the other), that is a file, that already holds
files without `--overwrite`, or that this process cannot create or write. `staged_outputs` writes each
folder under a hidden temporary name beside it and renames all of them into place only when everything is
written: an error, Ctrl-C or SIGTERM before then removes the temporary folders and leaves the old ones as
they were, and an old folder is deleted only after its replacement is in place (put back if that fails).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from memwatch.errors import InputError

# A DataModule's attributes that name the files it reads (memwatch's DataModules: roots, split and centre files).
DATA_PATH_ATTRIBUTES = ("root", "val_root", "train_dir", "val_dir", "split_file", "centers_file")
# Write errors that name the disk, not the data: a one-line error instead of a traceback.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)

PathLike = str | os.PathLike


def data_paths(datamodule: Any, option: str = "--data.init_args.{}") -> dict[str, Path]:
    """The files and folders `datamodule` reads (`DATA_PATH_ATTRIBUTES` it sets), by `option` formatted with
    the attribute's name."""
    paths = {name: getattr(datamodule, name, None) for name in DATA_PATH_ATTRIBUTES}
    return {option.format(name): Path(path) for name, path in paths.items() if isinstance(path, (str, os.PathLike))}


def check_output_folders(
    outputs: Mapping[str, PathLike | None],
    inputs: Iterable[tuple[str, PathLike | None]],
    overwrite: bool = False,
    replaces: bool = True,
) -> None:
    """Raise `InputError` now, before any work, for an output folder that writing could destroy data through.

    Args:
        outputs: folders by the option that names them; `None` ones are left out.
        inputs: the files and folders read, each with its option (an option may name several); `None` ones are
            left out.
        overwrite: whether an output folder that holds files may be replaced (`--overwrite`).
        replaces: whether writing replaces each output folder as a whole (the audit's `--out`); `False` for a
            folder that is written into and may hold files (the callback's `output_dir`, one `check_NNN/` each).
    """
    outputs = {option: Path(folder) for option, folder in outputs.items() if folder is not None}
    inputs = [(option, Path(path)) for option, path in inputs if path is not None]
    here = Path.cwd().resolve()
    for option, folder in outputs.items():
        others = [(other, path, "output") for other, path in outputs.items() if other != option] + [
            (other, path, "input") for other, path in inputs
        ]
        try:
            _check_output_folder(option, folder, others, here, overwrite, replaces)
        except OSError as error:  # a folder on the way that this process may not even look into
            raise InputError(
                f"{option}={folder} cannot be checked ({error.strerror}: {error.filename}): choose a folder you "
                f"can write for {option}"
            ) from None


def _check_output_folder(
    option: str, folder: Path, others: list[tuple[str, Path, str]], here: Path, overwrite: bool, replaces: bool
) -> None:
    target = folder.resolve()
    if here.is_relative_to(target):
        where = "is the folder this runs in" if here == target else "holds the folder this runs in"
        raise InputError(
            f"{option}={folder} {where}, which writing {option} would replace: give {option} a new folder "
            f"of its own, e.g. {option}={folder / 'report'}"
        )
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option}={folder} is a file, not a folder: choose another {option}")
    for other, path, kind in others:
        relation = _overlap(target, path.resolve())
        if relation is not None:
            fix = (
                "give each its own folder, neither inside the other"
                if kind == "output"
                else f"give {option} a new folder outside the inputs"
            )
            raise InputError(f"{option}={folder} {relation} {other}={path}: {fix}")
    if replaces and not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise InputError(
            f"{option}={folder} already holds files: choose another {option} or pass --overwrite to replace it"
        )
    problem = _write_problem(folder, beside=replaces)
    if problem is not None:
        raise InputError(f"{option}={folder} is not writable ({problem}): choose a folder you can write for {option}")


def _overlap(output: Path, other: Path) -> str | None:
    """How the resolved `output` overlaps the resolved `other`, as words between their names, or `None`."""
    if output == other:
        return "is the same folder as"
    if output.is_relative_to(other):
        return "lies inside"
    if other.is_relative_to(output):
        return "holds"
    return None


def _write_problem(folder: Path, beside: bool) -> str | None:
    """Why a folder cannot be created in and written at `folder` (and, `beside`, next to it), or `None`.

    A real probe, not permission bits: those say nothing of read-only mounts, ACLs or root."""
    places = [folder] if folder.is_dir() else []
    if beside or not places:
        places.append(next(parent for parent in folder.parents if parent.exists()))
    for place in places:
        if not place.is_dir():
            return f"{place} is a file, not a folder"
        try:
            os.rmdir(tempfile.mkdtemp(dir=place, prefix=".memwatch-write-test-"))
        except OSError as error:
            return f"{error.strerror or type(error).__name__} in {place}"
    return None


@contextmanager
def staged_outputs(folders: Mapping[str, PathLike], overwrite: bool = False) -> Iterator[dict[str, Path]]:
    """Yield a hidden temporary folder beside each of `folders` (by option) to write into; when the block ends
    without an error all of them take their folders' places at once (old folders are removed only then).

    On an error, Ctrl-C or SIGTERM the temporary folders are removed and `folders` are left as they were.
    """
    folders = {option: Path(folder) for option, folder in folders.items()}
    check_output_folders(folders, [], overwrite)
    stagings: dict[str, Path] = {}

    def remove_stagings() -> None:  # what is left of them: none once they are in place
        with signals_held():
            for staging in stagings.values():
                shutil.rmtree(staging, ignore_errors=True)

    with ExitStack() as cleanup:
        cleanup.enter_context(sigterm_raises())
        cleanup.callback(remove_stagings)
        try:
            for option, folder in folders.items():
                folder.parent.mkdir(parents=True, exist_ok=True)
                # mkdir, not mkdtemp: the folder keeps the mode the umask gives (a release is read by others)
                stagings[option] = folder.parent / f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
                stagings[option].mkdir()
            yield dict(stagings)
        except OSError as error:
            if error.errno not in FULL_DISK:
                raise
            options = " and ".join(f"{option}={folder}" for option, folder in folders.items())
            raise InputError(
                f"writing {options} failed ({error.strerror}{f': {error.filename}' if error.filename else ''}): "
                "nothing was replaced; free space on that disk or choose a folder on another disk"
            ) from None
        with signals_held():
            _move_into_place({folders[option]: staging for option, staging in stagings.items()})


@contextmanager
def staged_output(folder: PathLike, option: str = "--out", overwrite: bool = False) -> Iterator[Path]:
    """`staged_outputs` of one folder."""
    with staged_outputs({option: folder}, overwrite) as stagings:
        yield stagings[option]


def _move_into_place(stagings: Mapping[Path, Path]) -> None:
    """Rename each staging folder to its folder; on a failure put every folder back as it was."""
    moved: list[tuple[Path, Path, Path | None]] = []  # (folder, its staging, the old folder's temporary name)
    try:
        for folder, staging in stagings.items():
            old = None
            if os.path.lexists(folder):
                old = staging.with_name(staging.name.replace(".partial-", ".replaced-", 1))
                folder.rename(old)
            try:
                staging.rename(folder)
            except BaseException:
                if old is not None:
                    old.rename(folder)
                raise
            moved.append((folder, staging, old))
    except BaseException:
        for folder, staging, old in reversed(moved):
            folder.rename(staging)  # removed with the other staging folders
            if old is not None:
                old.rename(folder)
        raise
    for _, _, old in moved:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `SystemExit(143)`, so that clean-up runs, where it would otherwise kill
    the process on the spot (Python's default; a handler someone installed is left alone)."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on them as before: the folders are swapped
    and the old ones removed as one step."""
    if not _in_main_thread():
        yield
        return
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    handlers = {number: handler for number, handler in handlers.items() if handler is not None}
    received: list[int] = []
    for number in handlers:
        signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for number in received:
            signal.raise_signal(number)
