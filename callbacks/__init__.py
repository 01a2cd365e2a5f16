"""Lightning glue around `memorization/`: configs name them as `memwatch.callbacks.<Name>`.

`MemorizationCallback` checks for copies, `MembershipCallback` evaluates the membership signal,
`LastSafeCheckpoint` keeps the latest model within the memorization limits; each works alone.
"""

from memwatch.callbacks.last_safe import LastSafeCheckpoint
from memwatch.callbacks.membership import MembershipCallback
from memwatch.callbacks.memorization import MemorizationCallback

__all__ = ["LastSafeCheckpoint", "MembershipCallback", "MemorizationCallback"]
