"""The collector's side of the supervisor's pipe: :class:`PipeSink`.

In a supervised run the collector worker hands each claimed batch to the
supervisor instead of stdout, and writes back to the ledger the outcomes the
supervisor returns.  Everything here runs in the collector worker after the fork;
the supervisor's own process never imports it (it holds psycopg).  It speaks the
messages of :mod:`mailroom.supervisor.messages`, the one module of the supervisor
a role may import.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

import psycopg

from mailroom import ledger
from mailroom._process import one_line, rss_bytes
from mailroom.collector.refused import Refusals, refused
from mailroom.config import Settings
from mailroom.ledger import fleet
from mailroom.supervisor import messages as msg
from mailroom.vocabulary import Action, DeliveryStatus

log = logging.getLogger("mailroom.collector")

#: Seconds between two reads of the queue's depth for the heartbeat.
STATS_EVERY = 1.0
#: Seconds between two refreshes of this consumer's row in the fleet table.
FLEET_EVERY = 5.0

#: Outcomes written in one statement at most: enough to gather what arrives
#: while a claim runs, few enough that one statement stays short.
RECORD_ROWS = 1000

#: Batches claimed ahead with ``MAILROOM_MAX_IN_FLIGHT=auto``: at most this many,
#: and this many until the sender said what it needs.
AUTO_MAX_IN_FLIGHT = 256


class PipeSink:
    """The collector's :class:`~mailroom.collector.BatchSink` in supervised mode.

    Batches go to the supervisor as soon as their claim is committed (status
    ``claimed``); outcomes come back on the same pipe and are written to the ledger,
    those that arrived together in one statement, confirmed to the supervisor once
    committed (:class:`~mailroom.supervisor.messages.Recorded`).
    The number of batches without outcomes is bounded by ``max_in_flight``: what
    the sender asks for (:class:`~mailroom.supervisor.messages.Window`), within
    ``MAILROOM_MAX_IN_FLIGHT`` (auto: :data:`AUTO_MAX_IN_FLIGHT`).

    A batch in flight keeps its lease: every third of ``MAILROOM_CLAIM_TIMEOUT``
    one statement renews the leases of all of them (:func:`ledger.renew`), so a
    slow, rate-limited or paused sender never lets a live batch expire and go
    out twice.  Only a dead supervisor (nobody left to renew) lets leases expire.
    """

    final_status = DeliveryStatus.CLAIMED

    def __init__(self, pipe: Connection, settings: Settings) -> None:
        self.pipe = pipe
        self.queue = settings.queue_name
        self.max_attempts = settings.send_max_attempts
        self.bound = settings.max_in_flight or AUTO_MAX_IN_FLIGHT
        self.max_in_flight = min(self.bound, msg.FIRST_WINDOW)
        #: batch id -> (token ids, claimed_at): what a lease renewal needs.
        self.in_flight: dict[str, tuple[list[int], Any]] = {}
        self.renew_every = settings.claim_timeout / 3000
        self.renewed_at = time.monotonic()
        self.retry_backoff_ms = settings.send_retry_backoff
        self.pending: collections.deque[msg.RecordOutcomes | msg.Release] = collections.deque()
        self.draining = False
        self.stopping = False
        self.claiming = True  # False while an operator pauses claims
        #: Actions the sender holds (their template does not render): not claimed.
        self.held_actions: frozenset[int] = frozenset()
        self.released = False  # an action was released: look for due rows at once
        self.counter = 0
        self.last_beat = 0.0
        self.stats = msg.CollectorStats()
        self.stats_at = -STATS_EVERY
        self.rows = 0
        self.consumer_id: int | None = None
        self.fleet_at = -FLEET_EVERY
        self.fleet_refusals = Refusals(log, "the fleet heartbeat", "this consumer may show as stale")

    def ready(self) -> bool:
        return (self.claiming and not self.draining and not self.stopping
                and len(self.in_flight) < self.max_in_flight)

    def actions(self) -> frozenset[int] | None:
        if not self.held_actions:
            return None
        return frozenset(int(a) for a in Action) - self.held_actions

    def idle(self) -> bool:
        """No batch of ours (adopted ones included) waits for its outcomes."""
        return not self.in_flight and self.ready()

    def deliver(self, claim: ledger.Claim, line: bytes) -> None:
        self.counter += 1
        batch_id = f"{os.getpid()}-{self.counter}"
        token_ids = [row[5] for row in claim.rows]
        recovery = sum(1 for row in claim.rows if row[0] == 2)
        try:
            self.pipe.send(msg.Claimed(batch_id, line, token_ids, len(token_ids) - recovery,
                                       recovery, claim.claimed_at))
        except OSError:
            # The supervisor is gone; the collector releases the rows and stops.
            self.stopping = True
            raise
        self.in_flight[batch_id] = (token_ids, claim.claimed_at)
        self.rows += len(token_ids)

    def fileno(self) -> int | None:
        return self.pipe.fileno()

    def receive(self) -> None:
        """Read whatever the supervisor sent, without touching the database."""
        try:
            while self.pipe.poll():
                message = self.pipe.recv()
                if isinstance(message, msg.Drain):
                    self.draining = True
                elif isinstance(message, msg.Stop):
                    self.stopping = True
                elif isinstance(message, msg.Window):
                    self.max_in_flight = max(1, min(self.bound, message.batches))
                elif isinstance(message, msg.Adopt):
                    for batch_id in message.batch_ids:
                        self.in_flight[batch_id] = message.claims.get(batch_id, ([], None))
                    # The former collector may have stopped renewing long ago
                    # (killed by the watchdog): renew at the next chance.
                    self.renewed_at = float("-inf")
                elif isinstance(message, msg.SetClaiming):
                    self.claiming = message.enabled
                    self._post(msg.ClaimingSet(message.seq))
                elif isinstance(message, msg.HoldActions):
                    held = frozenset(message.actions)
                    if self.held_actions - held:
                        self.released = True
                    if held != self.held_actions:
                        log.info("claiming %s", "every action" if not held else "all but "
                                    + ", ".join(Action(a).db_name for a in sorted(held)) + " (template held)")
                    self.held_actions = held
                elif isinstance(message, (msg.RecordOutcomes, msg.Release)):
                    self.pending.append(message)
                else:
                    log.warning("unexpected message %s from the supervisor", type(message).__name__)
        except (EOFError, OSError):
            log.error("supervisor is gone; stopping")
            self.stopping = True
            self.pending.clear()

    def service(self, conn: psycopg.Connection[Any]) -> int:
        """Apply received outcomes and releases to the ledger (kept until applied),
        confirm them to the supervisor, renew the leases in flight when due, and
        refresh the queue numbers the heartbeat carries (at most once a second)."""
        now = time.monotonic()
        if now - self.stats_at >= STATS_EVERY:
            self.stats_at = now
            self.stats = msg.CollectorStats(**ledger.queue_stats(conn, self.queue), rss=rss_bytes())
        if now - self.fleet_at >= FLEET_EVERY and now >= self.fleet_refusals.not_before:
            self.fleet_at = now
            # The fleet table is for people looking: a refusal there (a read-only
            # database) is logged once and retried, it never stops the collector.
            try:
                self.refresh_fleet(conn)
                self.fleet_refusals.succeeded()
            except psycopg.Error as exc:
                if not refused(exc, conn):
                    raise
                self.fleet_refusals.failed(exc)
        applied = 0
        while self.pending:
            head = self.pending[0]
            latencies: list[tuple[Action, float]] = []
            # Autocommit: each statement is committed when it returns, and
            # confirmed at once (a later one may fail and be tried again).
            if isinstance(head, msg.Release):
                ledger.release(conn, self.queue, head.token_ids, claimed_at=head.claimed_at)
                done: list[msg.RecordOutcomes | msg.Release] = [head]
            else:
                # The outcomes that arrived together, in one statement: its cost
                # is mostly its own, not its rows' (see ledger.record_claims).
                batches = self._outcomes_ahead()
                ledger.record_claims(conn, self.queue, [(m.outcomes, m.claimed_at) for m in batches],
                                     max_attempts=self.max_attempts, backoff_ms=self.retry_backoff_ms,
                                     latencies=latencies)
                done = list(batches)
            for message in done:
                self.pending.popleft()
                self.in_flight.pop(message.batch_id, None)
            applied += len(done)
            self._post(msg.Recorded([message.batch_id for message in done], latencies))
        self.renew(conn)
        if self.released:
            # Counted as applied: the loop then asks what is due, and the rows
            # of the released action are (they waited without a time).
            self.released = False
            applied += 1
        return applied

    def _outcomes_ahead(self) -> list[msg.RecordOutcomes]:
        """The outcome messages at the head of :attr:`pending`, up to
        :data:`RECORD_ROWS` rows (at least one message)."""
        found: list[msg.RecordOutcomes] = []
        rows = 0
        for message in self.pending:
            if not isinstance(message, msg.RecordOutcomes) or (found and rows + len(message.outcomes) > RECORD_ROWS):
                break
            found.append(message)
            rows += len(message.outcomes)
        return found

    def refresh_fleet(self, conn: psycopg.Connection[Any]) -> None:
        """Keep this supervisor's row in the fleet table (one per supervisor: the pid
        is the supervisor's, so a restarted collector takes the same row over)."""
        if self.consumer_id is None or not fleet.heartbeat(conn, self.consumer_id, self.counter, self.rows):
            self.consumer_id = fleet.register(conn, self.queue, socket.gethostname(), os.getppid())
            fleet.heartbeat(conn, self.consumer_id, self.counter, self.rows)

    def leave_fleet(self, database_url: str) -> None:
        """At a clean exit: remove this consumer's row (its connection is closed by now)."""
        if self.consumer_id is None:
            return
        try:
            with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
                fleet.unregister(conn, self.consumer_id)
        except psycopg.Error as exc:  # shown stale after a while instead
            log.warning("could not remove this consumer from the fleet table: %s", one_line(exc))

    def renew(self, conn: psycopg.Connection[Any], force: bool = False) -> int:
        """Renew the leases of the batches in flight if a third of the lease has
        passed since the last renewal: one statement, however many batches."""
        now = time.monotonic()
        if not force and now - self.renewed_at < self.renew_every:
            return 0
        self.renewed_at = now
        if not self.in_flight:
            return 0
        renewed = ledger.renew(conn, self.queue, self.in_flight.values())
        log.debug("renewed the leases of %d rows in %d batches", renewed, len(self.in_flight))
        return renewed

    def _post(self, message: object) -> None:
        try:
            self.pipe.send(message)
        except OSError:
            self.stopping = True

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_beat >= msg.HEARTBEAT_INTERVAL:
            self.last_beat = now
            self._post(msg.Heartbeat(self.stats))
