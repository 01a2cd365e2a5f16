"""The arrays copy detection and the quality metrics take, converted and validated: one-line `InputError`s naming the argument."""

from __future__ import annotations

import numpy as np
import torch

from memwatch.errors import InputError


def as_real_tensor(x: torch.Tensor | np.ndarray, name: str, kind: str, shape: str) -> torch.Tensor:
    """`x` as a detached real-valued torch tensor; `kind` and `shape` (e.g. "matrix", "[N, L]") word the error."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise InputError(
                f"`{name}` is not a numeric {kind} ({err}); pass a tensor or array of shape {shape}"
            ) from err
    if x.dtype == torch.bool or x.is_complex():
        raise InputError(f"`{name}` has dtype {x.dtype}; expected a real-valued {kind} {shape}")
    return x.detach()


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise `InputError` naming the count of NaN/inf entries of `x` `[N, ...]` and the first row holding one."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = int(bad.reshape(x.shape[0], -1).any(dim=1).nonzero()[0, 0])
        raise InputError(
            f"`{name}` has {int(bad.sum())} NaN/inf entries (first in row {first}); remove or fix those samples first"
        )
