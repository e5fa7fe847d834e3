"""The sender's units of work and its timing policy.

:class:`Batch` is one submitted batch (its future and the outcome of each row so
far); :class:`Call` is the destinations of one batch that go out in one
``SendBulkTemplatedEmail`` call; :class:`SendPolicy` holds the timing knobs, with
:data:`WORKER_POLICY` the supervisor's sender's.  Kept apart from the engine
that moves them, :mod:`mailroom.sender.engine`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import Any

from mailroom.vocabulary import Outcome

__all__ = ["AUTO_CONCURRENCY", "WORKER_POLICY", "Batch", "Call", "SendPolicy"]


#: Upper bound of SES calls in flight with ``MAILROOM_SES_CONCURRENCY=auto``.
AUTO_CONCURRENCY = 16


@dataclasses.dataclass(frozen=True)
class SendPolicy:
    """Timing knobs of the sender; the defaults are for production, tests shrink them."""

    #: First retry delay in seconds; doubles per attempt (equal jitter), up to the cap.
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    #: First probe delay when the account is paused; doubles per failed probe.
    pause_base: float = 10.0
    pause_cap: float = 600.0
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    #: Open circuit (see :mod:`mailroom.sender.health`): first probe delay, cap.
    circuit_base: float = 5.0
    circuit_cap: float = 300.0
    #: Whole calls failed in a row that open the circuit; None: never open it.
    circuit_after: int | None = None
    #: Attempts of a call in this process before its retryable destinations go
    #: back to the ledger as "retry" without a delay of their own (the ledger
    #: then waits by its own attempt count); None: retry here up to
    #: ``send_max_attempts`` and fail (stdin mode: there is no ledger).
    in_process_attempts: int | None = None
    #: Paused account (or open circuit): keep the destinations and send them once a
    #: probe gets through, or hand them back at once as "retry".  The worker holds
    #: (the collector renews the leases of what is in flight, and a hand-back would
    #: cost an attempt at every claim); stdin mode holds (nobody else would send them).
    hold_when_paused: bool = False
    #: Fill each call with queued calls of other batches (worker mode); stdin mode
    #: keeps one call per action per line, as the original did.
    fill_calls: bool = False
    #: Render both templates at start and hold an action whose template does not
    #: render or does not exist (:mod:`mailroom.sender.template_hold`): its rows
    #: are handed back as "held", never sent or failed (worker mode: the ledger
    #: keeps them queued).  Stdin mode has nowhere to keep them and fails them.
    hold_templates: bool = False


#: The sender worker's policy: short retries here, then the ledger's backoff;
#: a circuit after 5 whole calls failed in a row; paused or open, calls are held;
#: an action whose template does not render is held.
WORKER_POLICY = SendPolicy(in_process_attempts=3, circuit_after=5, hold_when_paused=True, fill_calls=True,
                           hold_templates=True)


class Batch:
    """One submitted batch: its future and the outcome of each row so far."""

    __slots__ = ("future", "outcomes", "pending", "lock", "done")

    def __init__(self, size: int) -> None:
        self.future: concurrent.futures.Future[list[Outcome]] = concurrent.futures.Future()
        self.outcomes: list[Outcome | None] = [None] * size
        self.pending = size
        self.lock = threading.Lock()
        self.done = False


class Call:
    """Destinations of one batch that go out in one SendBulkTemplatedEmail call."""

    __slots__ = ("batch", "action", "indices", "destinations", "attempts")

    def __init__(
        self,
        batch: Batch,
        action: int,
        indices: list[int],
        destinations: list[dict[str, Any]],
        attempts: int = 0,
    ) -> None:
        self.batch = batch
        self.action = action
        self.indices = indices
        self.destinations = destinations
        self.attempts = attempts  # attempts made so far

    def subset(self, positions: list[int]) -> Call:
        """The same call for some of its destinations, one attempt later."""
        return Call(
            self.batch,
            self.action,
            [self.indices[p] for p in positions],
            [self.destinations[p] for p in positions],
            self.attempts + 1,
        )
