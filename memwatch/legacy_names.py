"""The package names of memwatch 0.1's clone layout (`callbacks.MemorizationCallback`,
`class_path: lightning_modules.LatentDiffusionModule`), kept for one release as aliases of
`memwatch.<package>`, with one deprecation line each.

Only memwatch's own folders are aliased: a user's own `callbacks` module elsewhere on `sys.path`
is imported as usual.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

PACKAGES = ("audit", "callbacks", "datamodules", "lightning_modules", "memorization", "networks")


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass


class LegacyNames(importlib.abc.MetaPathFinder):
    """Resolves `lightning_modules.X` to `memwatch.lightning_modules.X` when the name would otherwise
    be memwatch's own folder, or nothing at all."""

    def __init__(self, *roots: Path) -> None:
        self.roots = [str(root) for root in roots]
        self.warned: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in PACKAGES:
            return None
        found = importlib.machinery.PathFinder.find_spec(fullname, path)
        if found is not None and not self.owns(found):
            return None  # someone else's module of that name
        if top not in self.warned:
            self.warned.add(top)
            warnings.warn(
                f"the module name '{top}' is deprecated and will be removed in memwatch 0.3: "
                f"use 'memwatch.{top}' (in configs: class_path: memwatch.{top}.<Class>)",
                FutureWarning,
                stacklevel=2,
            )
        return importlib.util.spec_from_loader(fullname, _Alias("memwatch." + fullname))

    def owns(self, found: importlib.machinery.ModuleSpec) -> bool:
        origin = str(found.origin or "")
        return any(origin.startswith(root + os.sep) for root in self.roots)


def is_old_name(module: str) -> bool:
    """Whether importing `module` gives memwatch's own module under its old name: found without running any code."""
    top = module.partition(".")[0]
    finder = next((f for f in sys.meta_path if isinstance(f, LegacyNames)), None)
    if top not in PACKAGES or finder is None:
        return False
    found = importlib.machinery.PathFinder.find_spec(top)
    return found is None or finder.owns(found)


def install(*roots: Path) -> None:
    if not any(isinstance(finder, LegacyNames) for finder in sys.meta_path):
        sys.meta_path.insert(0, LegacyNames(*roots))
