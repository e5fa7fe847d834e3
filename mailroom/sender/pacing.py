"""Pacing for the sender: the recipients-per-second limit and the retry schedule.

- :class:`TokenBucket` is the thread-safe recipients-per-second limit.
- :class:`Schedule` is the time-ordered queue that lets a retry wait without
  holding a thread.
- :class:`Concurrency` is how many SES calls may be in flight (Little's law).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import Any


class TokenBucket:
    """Thread-safe recipients-per-second limit (token bucket with debt).

    ``acquire(n)`` waits until the bucket is not in debt, then takes ``n`` tokens
    at once, so a call larger than the bucket (50 recipients at a 1/s sandbox
    rate) still goes, and the calls after it wait until it is paid for.  The
    bucket holds at most one second's worth, so neither a fresh start nor an
    idle spell allows a burst above ``rate`` plus one call.  It starts full, as
    after an idle spell: a burst right after a start (the backlog of a restart,
    a 20-token transaction) is not made to wait for tokens SES would have
    granted.  ``rate=None`` means no limit.

    A waiting caller sleeps on a condition, not for a wait computed once: an
    operator's :meth:`set_rate` wakes every waiter to recompute at the new rate
    (issue 19: after ``set-rate 0.01`` then ``set-rate 10000``, threads that had
    computed an hour's wait must go at once), and :meth:`interrupt` wakes them to
    see their stop event.
    """

    def __init__(self, rate: float | None, *, clock: Any = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._cond = threading.Condition()
        self._capacity = max(rate or 0.0, 1.0)
        self._tokens = self._capacity
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        if self.rate is not None:
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def set_rate(self, rate: float | None) -> None:
        """Change the limit from now on (an operator's ``set_rate``); None: no limit.

        The debt left by calls already made stays, to be paid at the new rate."""
        with self._cond:
            self._refill()  # settle what the old rate earned so far
            self.rate = rate
            self._capacity = max(rate or 0.0, 1.0)
            self._tokens = min(self._tokens, self._capacity)
            self._cond.notify_all()

    def interrupt(self) -> None:
        """Wake every waiter to look at its stop event (set it first)."""
        with self._cond:
            self._cond.notify_all()

    def take(self, n: int) -> float:
        """Take ``n`` tokens if the bucket is not in debt and return 0.0; else take
        nothing and return the seconds until it is out of debt at the current rate."""
        with self._cond:
            if self.rate is None:
                return 0.0
            self._refill()
            if self._tokens >= 0:
                self._tokens -= n
                return 0.0
            return -self._tokens / self.rate

    def acquire(self, n: int, stop: threading.Event) -> bool:
        """Take ``n`` tokens, waiting as needed; False if ``stop`` was set meanwhile."""
        with self._cond:
            while not stop.is_set():
                wait = self.take(n)  # the condition's lock is reentrant
                if wait <= 0:
                    return True
                self._cond.wait(wait)
            return False


class Schedule:
    """Time-ordered work queue: ``get`` blocks until the earliest item is due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()  # ties keep submission order
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: Any, due: float = 0.0) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), item))
            self._cond.notify()

    def get(self) -> Any:
        """Return the next due item, or None once closed."""
        with self._cond:
            while not self._closed:
                if self._heap:
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        return heapq.heappop(self._heap)[2]
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            return None

    def take_all(self) -> list[tuple[float, Any]]:
        """Remove and return every queued item with its due time."""
        with self._cond:
            items = [(due, item) for due, _, item in self._heap]
            self._heap.clear()
            return items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_due(self, wanted: Callable[[Any], int | None], budget: int) -> list[Any]:
        """Remove due items that ``wanted`` accepts, in order, while ``budget`` lasts.

        ``wanted(item)`` returns the item's size, or None to leave it queued; an
        item larger than what is left of ``budget`` stays queued too.
        """
        now = time.monotonic()
        taken: list[Any] = []
        with self._cond:
            kept: list[tuple[float, int, Any]] = []
            for entry in sorted(self._heap):
                due, _, item = entry
                size = wanted(item) if due <= now and budget > 0 else None
                if size is not None and size <= budget:
                    taken.append(item)
                    budget -= size
                else:
                    kept.append(entry)
            if taken:
                self._heap = kept  # a sorted list is a heap
        return taken


class Concurrency:
    """How many SES calls may be in flight: Little's law, within a bound.

    Destinations in flight = rate x latency.  At full calls (50 destinations) the
    account's rate needs ``rate * latency / 50`` calls in flight; the target adds
    half again and one call of slack (a call is rarely full, latency varies), and
    stays within ``bound``.  The latency is measured (moving average of the
    calls).  No rate limit known: the bound.  Threads hold a slot from
    :meth:`enter` to :meth:`leave`; a target that shrinks takes effect as calls end.
    """

    SLACK = 1.5
    FIRST_GUESS = 0.1  # seconds per call until one was measured

    def __init__(self, bound: int, bucket: TokenBucket, per_call: int) -> None:
        self.bound = bound
        self.bucket = bucket  # its rate, an operator's set_rate included
        self.per_call = per_call
        self.latency = self.FIRST_GUESS
        self._active = 0
        self._closed = False
        self._cond = threading.Condition()

    def target(self) -> int:
        rate = self.bucket.rate
        if rate is None:
            return self.bound
        needed = rate * self.latency / self.per_call
        return max(1, min(self.bound, math.ceil(needed * self.SLACK) + 1))

    def observe(self, seconds: float) -> None:
        """One call took ``seconds``: fold it into the moving average."""
        with self._cond:
            self.latency += 0.2 * (seconds - self.latency)
            self._cond.notify_all()  # a longer latency may allow more calls

    def enter(self) -> bool:
        """Wait for a slot; False once closed."""
        with self._cond:
            while not self._closed and self._active >= self.target():
                self._cond.wait()
            if self._closed:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify()

    def rate_changed(self) -> None:
        """The bucket's rate changed: waiters look at the new target."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
