"""The one exception type for a user's mistake (a bad value, path or file).

`cli.py` prints it on one line and exits with status 2, without a traceback; any other
exception is a bug and keeps its traceback. `TrainingFailure` is a run that failed for a reason
that is not the user's input (a diverged model): one line too, exit status 1.
"""


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
