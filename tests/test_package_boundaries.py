"""The science in `memorization/` and the package's errors import without Lightning (ARCHITECTURE.md)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import memwatch.memorization

LIGHTNING = ("lightning", "pytorch_lightning")


def first_import_bringing_lightning(*modules: str) -> tuple[str, list[str]] | None:
    """In a fresh interpreter importing `modules` in turn, the first that brings Lightning in, and what."""
    program = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"    found = sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r})\n"
        "    if found:\n"
        "        print(json.dumps([name, found[:5]]))\n"
        "        break\n"
        "else:\n"
        "    print('null')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.splitlines()[-1])
    return None if found is None else (found[0], found[1])


def test_every_memorization_module_imports_without_lightning() -> None:
    modules = [
        module.name
        for module in pkgutil.iter_modules(memwatch.memorization.__path__, "memwatch.memorization.")
    ]
    assert "memwatch.memorization.pipeline" in modules
    assert first_import_bringing_lightning("memwatch.memorization", *modules) is None


def test_the_package_and_its_errors_import_without_lightning() -> None:
    assert first_import_bringing_lightning("memwatch", "memwatch.errors") is None
