"""The one exception type for a user's mistake (a bad value, path or file).

`cli.py` prints it on one line and exits with status 2, without a traceback; any other
exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input: the message names the value or file, what is wrong and how to fix it."""
