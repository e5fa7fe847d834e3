"""The router: the supervisor's table of batches in flight, and where each message goes.

Batches go collector -> router -> sender; outcomes go sender -> router ->
collector, which records them.  The router keeps every batch from its claim to
its outcomes, so a batch whose sender died is handed to the restarted sender at
once (no wait for the database lease), and keeps its outcomes until the
collector says they are recorded (:class:`~messages.Recorded`): outcomes that
found no collector, or reached one that died before committing them (killed by
the watchdog while a lock held it), go to the next collector.  Recording twice
is harmless: an outcome only changes its own claim, once.  It knows batches, not processes: the arbiter
tells it when a worker started or died, and gives it a ``send`` function.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from mailroom.supervisor import messages as msg
from mailroom.vocabulary import Outcome, OutcomeKind, Role, TokenOutcomes, batch_state

log = logging.getLogger("mailroom.supervisor")

#: A batch in flight at this many sender deaths is suspected of killing the sender:
#: it goes back to the ledger as a delayed retry (whose attempts are bounded)
#: instead of being handed to every restarted sender forever.
POISON_DEATHS = 3
POISON_RETRY_AFTER = 60.0

#: ``send(role, message) -> bool``: False when the worker is not there to take it.
Send = Callable[[Role, Any], bool]
#: ``event(event)``: what the router saw, for whoever watches (control socket).
EventHook = Callable[[msg.BatchEvent], None]


@dataclasses.dataclass
class Batch:
    """A batch between its claim and its outcomes: what a restarted sender needs."""

    batch_id: str
    line: bytes
    token_ids: list[int]
    activation: int
    recovery: int
    claimed_at: Any  # opaque here: echoed back to the collector
    received_at: float
    dispatched: bool = False
    deaths: int = 0  # sender deaths while this batch was in flight


#: ``finished(batch, outcomes, seconds)``: a batch got its outcomes (metrics, detail).
FinishedHook = Callable[["Batch", TokenOutcomes, float], None]


#: ``released(batch)``: a batch went back to the queue unsent (metrics).
ReleasedHook = Callable[["Batch"], None]


def _no_release(batch: Batch) -> None:
    return None


def _no_event(event: msg.BatchEvent) -> None:
    return None


def _no_finish(batch: Batch, outcomes: TokenOutcomes, seconds: float) -> None:
    return None


class Router:
    """Routes batches and outcomes between the workers; see the module docstring."""

    def __init__(self, send: Send, on_event: EventHook = _no_event,
                 on_finished: FinishedHook = _no_finish, on_released: ReleasedHook = _no_release) -> None:
        self.send = send
        self.on_event = on_event
        self.on_finished = on_finished
        self.on_released = on_released
        self.batches: dict[str, Batch] = {}
        #: Outcomes and releases not yet confirmed recorded, in the order made.
        self.unconfirmed: dict[str, msg.RecordOutcomes | msg.Release] = {}
        #: False once the collector is being stopped: a late claim is released.
        self.accepting = True
        #: False once the sender is being stopped: nothing new goes to it.
        self.dispatching = True
        #: True while an operator holds sending (batches stay claimed, none dispatched).
        self.holding = False

    def __len__(self) -> int:
        return len(self.batches)

    def owes_collector(self) -> int:
        """Batches in flight plus outcome or release messages not yet confirmed recorded:
        what only a collector can settle (0: a stop may go on without one)."""
        return len(self.batches) + len(self.unconfirmed)

    # -- from the collector ------------------------------------------------------
    def on_claimed(self, claimed: msg.Claimed) -> None:
        """A committed claim: track it and hand it to the sender."""
        if not self.accepting:
            # Claimed just before the collector saw the drain request: too late to send.
            self.to_collector(msg.Release(claimed.batch_id, claimed.token_ids, claimed.claimed_at))
            return
        batch = Batch(claimed.batch_id, claimed.line, claimed.token_ids, claimed.activation,
                      claimed.recovery, claimed.claimed_at, time.monotonic())
        self.batches[batch.batch_id] = batch
        self.on_event(msg.BatchClaimed(batch.batch_id, len(batch.token_ids), batch.activation, batch.recovery))
        self.dispatch(batch)

    # -- from the sender -----------------------------------------------------------
    def on_outcomes(self, done: msg.BatchOutcomes) -> None:
        """A batch's outcomes: forget the batch, have the collector record them."""
        batch = self.batches.pop(done.batch_id, None)
        self.log_batch(done.batch_id, batch, done.outcomes)
        claimed_at = batch.claimed_at if batch else None
        self.to_collector(msg.RecordOutcomes(done.batch_id, done.outcomes, claimed_at))

    def on_recorded(self, recorded: msg.Recorded) -> None:
        """The collector committed these batches' outcomes: forget them."""
        for batch_id in recorded.batch_ids:
            self.unconfirmed.pop(batch_id, None)

    # -- worker lifecycle, told by the arbiter ---------------------------------------
    def collector_started(self, draining: bool) -> None:
        """A new collector: it adopts the batches in flight and records every
        outcome no collector confirmed yet."""
        claims = {b.batch_id: (b.token_ids, b.claimed_at) for b in self.batches.values()}
        self.send(Role.COLLECTOR, msg.Adopt(list(self.batches), claims))
        if self.unconfirmed:
            log.info("handing %d unconfirmed outcome messages to the new collector",
                        len(self.unconfirmed))
        for message in list(self.unconfirmed.values()):
            if not self.send(Role.COLLECTOR, message):
                break
        if draining:
            self.send(Role.COLLECTOR, msg.Drain())

    def sender_started(self) -> None:
        """A new sender: hand it every batch in flight."""
        for batch in self.batches.values():
            self.dispatch(batch)

    def sender_died(self, *, asked: bool = False) -> None:
        """Nothing dispatched reached an end; a batch at too many deaths is given up.

        ``asked``: the sender was restarted on purpose (an operator, SIGHUP), which
        says nothing against the batches it had.
        """
        for batch in list(self.batches.values()):
            batch.deaths += batch.dispatched and not asked
            batch.dispatched = False
            if batch.deaths >= POISON_DEATHS:
                self.give_up(batch)

    # -- routing ---------------------------------------------------------------------
    def dispatch(self, batch: Batch) -> None:
        """Send ``batch`` to the sender unless it already has it (or sending is held)."""
        if batch.dispatched or self.holding or not self.dispatching:
            return
        batch.dispatched = self.send(Role.SENDER, msg.SendBatch(batch.batch_id, batch.line, batch.token_ids))
        if batch.dispatched:
            self.on_event(msg.BatchDispatched(batch.batch_id))

    def dispatch_all(self) -> None:
        """Dispatch whatever is not with the sender (after sending was held)."""
        for batch in self.batches.values():
            self.dispatch(batch)

    def to_collector(self, message: msg.RecordOutcomes | msg.Release) -> None:
        """Send to the collector; kept until it confirms, for the next one otherwise."""
        self.unconfirmed[message.batch_id] = message
        self.send(Role.COLLECTOR, message)

    def give_up(self, batch: Batch) -> None:
        """Hand a batch that keeps killing the sender back to the ledger, delayed."""
        log.error("batch %s was in flight at %d sender deaths; handing it back to the"
                     " queue for a later attempt", batch.batch_id, batch.deaths)
        error = f"sender worker died {batch.deaths} times with this batch in flight"
        outcome = Outcome(OutcomeKind.RETRY, error=error, retry_after=POISON_RETRY_AFTER)
        self.on_outcomes(msg.BatchOutcomes(batch.batch_id, [(tid, outcome) for tid in batch.token_ids]))

    def release(self, batch_id: str) -> None:
        """Give one undispatched batch back to the ledger (its rows are queued again)."""
        batch = self.batches.pop(batch_id, None)
        if batch is not None:
            self.to_collector(msg.Release(batch.batch_id, batch.token_ids, batch.claimed_at))
            self.on_released(batch)
            counts = collections.Counter({OutcomeKind.RETRY: len(batch.token_ids)})
            self.on_event(self._done(batch, counts, 0.0, "released: sending paused", released=True))

    def release_all(self) -> int:
        """Shutdown: every batch still in flight goes back to the queue; how many."""
        count = len(self.batches)
        for batch in self.batches.values():
            self.to_collector(msg.Release(batch.batch_id, batch.token_ids, batch.claimed_at))
            self.on_released(batch)
        self.batches.clear()
        return count

    def log_batch(self, batch_id: str, batch: Batch | None, outcomes: TokenOutcomes) -> None:
        """One summary line per batch (and its event)."""
        counts = collections.Counter(outcome.kind for _, outcome in outcomes)
        first_error = next((o.error for _, o in outcomes if o.kind != OutcomeKind.SENT and o.error), None)
        if batch is None:
            log.info("batch %s: %d outcomes for a batch no longer tracked", batch_id, len(outcomes))
            return
        ms = (time.monotonic() - batch.received_at) * 1000
        self.on_finished(batch, outcomes, ms / 1000)
        done = self._done(batch, counts, round(ms, 1), first_error)
        log.info("batch %s: %d rows (%d activation, %d recovery): %d sent, %d failed, %d retry%s, %d ms",
                    batch_id, done.rows, done.activation, done.recovery, done.sent, done.failed, done.retry,
                    f", {done.held} held (template)" if done.held else "", ms)
        self.on_event(done)

    @staticmethod
    def _done(batch: Batch, counts: collections.Counter[OutcomeKind], ms: float, error: str | None, *,
              released: bool = False) -> msg.BatchDone:
        """The ``batch.done`` of a batch whose rows ended as ``counts`` say."""
        return msg.BatchDone(
            batch=batch.batch_id, rows=counts.total(), activation=batch.activation, recovery=batch.recovery,
            sent=counts[OutcomeKind.SENT] + counts[OutcomeKind.EMITTED], failed=counts[OutcomeKind.FAILED],
            retry=counts[OutcomeKind.RETRY], skipped=counts[OutcomeKind.SKIPPED], held=counts[OutcomeKind.HELD],
            ms=ms, error=error, state=batch_state(counts, released=released))
