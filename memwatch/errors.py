"""memwatch's exception types, and how a failure is told apart and put on one line.

`InputError` is a user's mistake (a bad value, path or file): `cli.py` prints it on one line and
exits with status 2, without a traceback. `TrainingFailure` is a run that failed for a reason that
is not the user's input (a diverged model): one line too, exit status 1. `SharedFailure` is raised
on the other ranks when one rank failed. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

FAILURE_KINDS = ("bug", "input", "training")
# A DataLoader worker re-raises a transform's error as text inside another exception's message.
WORKER_INPUT_ERROR = re.compile(r"^errors\.InputError: (.+)$", re.MULTILINE)


class InputError(ValueError):
    """Bad input: the message names the value or file, what is wrong and how to fix it."""


class TrainingFailure(RuntimeError):
    """The run failed, not the input: e.g. the model diverged and its samples are NaN."""


class SharedFailure(RuntimeError):
    """Raised on every other rank when one rank failed, so that all ranks stop together.

    `kind` says what failed there: `input` (an `InputError`), `training` (a `TrainingFailure`)
    or `bug`. The CLI prints its message once, on rank 0.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def one_line(error: BaseException) -> str:
    """An error's message on one line (a library's message may span several), or its type's name."""
    return " ".join(str(error).split()) or type(error).__name__


def _chain(error: BaseException | None) -> list[BaseException]:
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def user_mistake(error: BaseException) -> InputError | None:
    """The `InputError` behind `error`, if any: jsonargparse wraps errors raised while instantiating,
    and a DataLoader worker re-raises a transform's error as text."""
    chain = _chain(error)
    for cause in chain:
        if isinstance(cause, InputError):
            return cause
    for wrapped in chain:
        found = WORKER_INPUT_ERROR.findall(str(wrapped))
        if found:
            return InputError(found[-1])
    return None


def classify_failure(error: BaseException) -> tuple[BaseException | None, str]:
    """The failure behind `error` that is reported on one line, and its kind (`FAILURE_KINDS`):
    `input` for a user's mistake, `training` for a failed run, `bug` for anything else. The failure is
    `None` for a bug on this rank, and the `SharedFailure` for one on another rank."""
    cause = user_mistake(error)
    if cause is not None:
        return cause, "input"
    for cause in _chain(error):
        if isinstance(cause, SharedFailure):
            return cause, cause.kind
        if isinstance(cause, TrainingFailure):
            return cause, "training"
    return None, "bug"
