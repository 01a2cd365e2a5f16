"""Lightning glue around `memorization/`: configs name it as `memwatch.callbacks.MemorizationCallback`."""

from memwatch.callbacks.memorization import MemorizationCallback

__all__ = ["MemorizationCallback"]
