"""memwatch: train generative models of medical images and measure how many patients they copy.

    from memwatch import MemorizationCallback          # the callback, in any Lightning script
    memwatch fit --config phantom_ldm.yaml             # the command line (= python cli.py in a clone)

In a clone the packages live in the repository's top-level folders (`memorization/`, `callbacks/`,
...); installed, they live under `memwatch/`. Either way they import as `memwatch.<package>`, a name
that cannot collide with a user's own `callbacks.py`.
"""

from __future__ import annotations

from pathlib import Path

from memwatch import legacy_names

_HERE = Path(__file__).resolve().parent
_CLONE = _HERE.parent
if (_CLONE / "memorization" / "__init__.py").is_file() and (_CLONE / "pyproject.toml").is_file():
    # A clone (or `pip install -e .`): memwatch.memorization is the folder memorization/ beside memwatch/.
    __path__.append(str(_CLONE))  # noqa: F821  (a package's __path__)
    legacy_names.install(_HERE, *(_CLONE / name for name in legacy_names.PACKAGES))
else:  # installed: the folders are inside memwatch/, and site-packages beside it belongs to others
    legacy_names.install(_HERE)

__version__ = "0.1.0"

_PUBLIC = {
    "MemorizationCallback": "memwatch.callbacks",
    "AutoencoderModule": "memwatch.lightning_modules",
    "LatentDiffusionModule": "memwatch.lightning_modules",
    "PixelDiffusionModule": "memwatch.lightning_modules",
    "SimCLRModule": "memwatch.lightning_modules",
    "MedicalImageDataModule": "memwatch.datamodules",
    "PhantomDataModule": "memwatch.datamodules",
    "FolderDataModule": "memwatch.datamodules",
    "detect_copies": "memwatch.memorization",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    # Imported on first use: `import memwatch` stays cheap, and memwatch.errors needs no Lightning.
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'memwatch' has no attribute {name!r}")
