"""When the collector claims: the batching rule, apart from the database and the clock.

The collector counts notifications and asks :class:`BatchTrigger` whether a batch
is due and until when it may wait.  The trigger holds no connection and reads no
clock: the caller passes ``now`` (``time.monotonic()`` in the collector) and
whether the pipeline is idle, so the rule is tested with plain numbers
(``tests/test_batch_trigger.py``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class BatchTrigger:
    """Notifications counted since the last claim, and when a claim is due.

    ``fixed`` mode is the original's rule: a batch is due at ``limit``
    notifications or ``timeout`` seconds after the first one.  ``adaptive`` mode
    adds a third trigger: the pipeline is idle (nothing handed on is still without
    its outcome).  On a quiet day that claims the first notification at once;
    under load notifications pile up while batches are in flight and are claimed
    together as soon as the pipeline drains (Nagle's algorithm, with the limit and
    the timeout as upper bounds).
    """

    limit: int           # notifications that make a batch due at once
    timeout: float       # seconds after the first notification
    adaptive: bool       # also due as soon as the pipeline is idle
    pending: int = 0     # notifications counted since the last claim
    first_at: float = 0.0  # when the first of them arrived (the caller's clock)

    def notified(self, count: int, now: float) -> None:
        """``count`` notifications arrived at ``now``."""
        if count <= 0:
            return
        if not self.pending:
            self.first_at = now
        self.pending += count

    def due(self, now: float, idle: bool = False) -> bool:
        """Is a batch due at ``now``?  ``idle``: nothing handed on awaits its outcome."""
        if not self.pending:
            return False
        return self.pending >= self.limit or now >= self.first_at + self.timeout or (self.adaptive and idle)

    def deadline(self, now: float, idle: bool = False) -> float | None:
        """When the next batch is due (``now`` if it is already); None: no notification waits."""
        if not self.pending:
            return None
        if self.due(now, idle):
            return now
        return self.first_at + self.timeout

    def claimed(self) -> None:
        """A claim took what was notified: start counting again."""
        self.pending = 0
