"""What a benchmark ran on, for its JSON and for BENCHMARKS.md."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path


def describe_machine(packages: tuple[str, ...] = ("torch", "numpy")) -> dict:
    """CPU model and count, memory, torch threads, Python and the versions of `packages`."""
    import torch

    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "torch_threads": torch.get_num_threads(),
        **{name: importlib.import_module(name).__version__ for name in packages},
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
