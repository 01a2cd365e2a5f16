"""Lightning glue around `memorization/`: configs name it as `callbacks.MemorizationCallback`."""

from callbacks.memorization import MemorizationCallback

__all__ = ["MemorizationCallback"]
