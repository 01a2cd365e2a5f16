"""Walking an image folder: every visible file under it, symbolic links followed, loops refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from memwatch.errors import InputError


def visible_files(folder: Path, option: str) -> Iterator[Path]:
    """Every file under `folder` whose name and folders do not start with a dot, sorted folder by folder.

    Symbolic links are followed, to files and to folders, but a link to a folder that contains it (itself,
    one above it, or above `folder`) would be walked forever: it raises `InputError` naming the link and
    `option`, the command-line argument that gave `folder`; so does a link that leads nowhere.
    """
    for parent, dirs, files in os.walk(folder, followlinks=True):
        here = Path(parent).resolve()
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs:
            link = Path(parent) / name
            if link.is_symlink() and here.is_relative_to(target := link.resolve()):
                raise InputError(
                    f"{link} is a symbolic link to {target}, which contains the link, so reading {option} would "
                    f"loop forever: remove the link or point it at a folder outside {target}"
                )
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(parent) / name
            if path.is_symlink() and not path.exists():  # os.walk lists a link it cannot follow as a file
                raise InputError(
                    f"{path} is a symbolic link that leads nowhere (a loop of links, or a target that is gone): "
                    f"remove it from {option} or point it at an image"
                )
            yield path
