"""The two worker processes of ``mailroom-supervisor``, run after the fork.

Everything that holds a database connection, a thread or an SES client is
created here, inside the child, never in the supervisor before the fork.  This
module imports the collector engine (and the sender's, lazily), so the
supervisor's own process never imports it: the arbiter does, in the child.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import psycopg

from mailroom import config, ledger
from mailroom._process import SignalFlag, die_with_parent, one_line, rss_bytes, setup_logging
from mailroom.collector import Collector
from mailroom.config import Settings
from mailroom.ledger import fleet
from mailroom.supervisor import messages as msg
from mailroom.vocabulary import DeliveryStatus, Outcome, OutcomeKind

logger = logging.getLogger("mailroom.workers")

#: Seconds between two reads of the queue's depth for the heartbeat.
STATS_EVERY = 1.0
#: Seconds between two refreshes of this consumer's row in the fleet table.
FLEET_EVERY = 5.0


def _boot(tag: str, settings: Settings) -> SignalFlag:
    setup_logging(tag, settings.log_level)
    die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group: only the supervisor
    # decides how to stop, it tells the workers through their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = SignalFlag()
    stop.install((signal.SIGTERM,))
    return stop


#: Outcomes written in one statement at most: enough to gather what arrives
#: while a claim runs, few enough that one statement stays short.
RECORD_ROWS = 1000

#: Batches claimed ahead with ``MAILROOM_MAX_IN_FLIGHT=auto``: at most this many,
#: and this many until the sender said what it needs.
AUTO_MAX_IN_FLIGHT = 256
FIRST_WINDOW = 4


# -- collector worker ------------------------------------------------------------

class PipeSink:
    """The collector's :class:`~mailroom.collector.BatchSink` in supervised mode.

    Batches go to the supervisor as soon as their claim is committed (status
    ``claimed``); outcomes come back on the same pipe and are written to the ledger,
    those that arrived together in one statement, confirmed to the supervisor once
    committed (:class:`~messages.Recorded`).
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
        self.max_in_flight = min(self.bound, FIRST_WINDOW)
        #: batch id -> (token ids, claimed_at): what a lease renewal needs.
        self.in_flight: dict[str, tuple[list[int], Any]] = {}
        self.renew_every = settings.claim_timeout / 3000
        self.renewed_at = time.monotonic()
        self.retry_backoff_ms = settings.send_retry_backoff
        self.pending: collections.deque[msg.RecordOutcomes | msg.Release] = collections.deque()
        self.draining = False
        self.stopping = False
        self.claiming = True  # False while an operator pauses claims
        self.counter = 0
        self.last_beat = 0.0
        self.stats: dict[str, Any] = {}
        self.stats_at = -STATS_EVERY
        self.rows = 0
        self.consumer_id: int | None = None
        self.fleet_at = -FLEET_EVERY

    def ready(self) -> bool:
        return (self.claiming and not self.draining and not self.stopping
                and len(self.in_flight) < self.max_in_flight)

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
                elif isinstance(message, (msg.RecordOutcomes, msg.Release)):
                    self.pending.append(message)
                else:
                    logger.warning("unexpected message %s from the supervisor", type(message).__name__)
        except (EOFError, OSError):
            logger.error("supervisor is gone; stopping")
            self.stopping = True
            self.pending.clear()

    def service(self, conn: psycopg.Connection[Any]) -> int:
        """Apply received outcomes and releases to the ledger (kept until applied),
        confirm them to the supervisor, renew the leases in flight when due, and
        refresh the queue numbers the heartbeat carries (at most once a second)."""
        now = time.monotonic()
        if now - self.stats_at >= STATS_EVERY:
            self.stats_at = now
            self.stats = ledger.queue_stats(conn, self.queue)
            self.stats["rss"] = rss_bytes()
        if now - self.fleet_at >= FLEET_EVERY:
            self.fleet_at = now
            self.refresh_fleet(conn)
        applied = 0
        while self.pending:
            head = self.pending[0]
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
                                     max_attempts=self.max_attempts, backoff_ms=self.retry_backoff_ms)
                done = list(batches)
            for message in done:
                self.pending.popleft()
                self.in_flight.pop(message.batch_id, None)
            applied += len(done)
            self._post(msg.Recorded([message.batch_id for message in done]))
        self.renew(conn)
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
            logger.warning("could not remove this consumer from the fleet table: %s", one_line(exc))

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
        logger.debug("renewed the leases of %d rows in %d batches", renewed, len(self.in_flight))
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
            self._post(msg.Heartbeat(dict(self.stats)))


def collector_worker(pipe: Connection, settings: Settings) -> int:
    """Entry point of the collector worker; returns its exit code."""
    stop = _boot("PG", settings)
    sink = PipeSink(pipe, settings)
    def on_ready() -> None:
        pipe.send(msg.Ready())
        # What the supervisor said while we were connecting (a pause of claims)
        # must count for the drain that follows the connection. Only here: read
        # elsewhere, the pipe would not wake the loop's select for what it holds.
        sink.receive()

    collector = Collector(settings, sink, lambda: stop() or sink.stopping,
                          wakeup_fd=stop.read_fd, on_ready=on_ready)
    try:
        code = collector.run_or_exit_code()
    except OSError:
        if not sink.stopping:
            raise
        logger.error("supervisor is gone; stopping (the last batch went back to the queue)")
        code = None
    if code is not None:
        return code
    if sink.stopping:  # told to stop by the supervisor: a clean exit
        sink.leave_fleet(settings.database_url)
    if sink.pending and not stop():
        logger.warning("%d outcome messages not recorded (database unavailable at stop);"
                       " their rows are queued again when the claim lease expires", len(sink.pending))
    return config.EXIT_OK


# -- sender worker ---------------------------------------------------------------

def sender_worker(pipe: Connection, settings: Settings) -> int:
    """Entry point of the sender worker; returns its exit code."""
    stop = _boot("SES", settings)
    from mailroom.sender import Sender
    from mailroom.sender.calls import WORKER_POLICY
    from mailroom.sender.driver import Driver, Job, StopRequest
    from mailroom.sender.quota import QuotaWatch
    from mailroom.sender.ses import MAX_DESTINATIONS

    sender = Sender(settings, policy=WORKER_POLICY)
    try:
        sender.start()
    except Exception as exc:  # noqa: BLE001 - boto3 refusing its settings, e.g. a bad endpoint URL
        # Creating the client does not talk to SES: what fails here is configuration.
        logger.error("cannot start the sender: %s", one_line(exc))
        return config.EXIT_CONFIG
    quota = QuotaWatch(sender)
    quota.start()

    def window() -> int:
        # Twice what the calls in flight hold when full: while they are on the
        # wire, the next ones fill up from the batches waiting behind them.
        wanted = 2 * sender.concurrency * MAX_DESTINATIONS
        return max(FIRST_WINDOW, math.ceil(wanted / settings.batch_limit))

    sink = _PipeOutcomes(pipe, lambda: {**quota.stats(), "ses_paused": sender.health.paused_reason}, window)
    # SIGTERM without a word from the supervisor: a person, or the supervisor's
    # death (PR_SET_PDEATHSIG); what waits for a retry goes back to the ledger.
    on_signal = StopRequest(settings.shutdown_timeout / 1000, defer_retries=True)
    # With the supervisor gone nobody can record outcomes: finishing the calls in
    # flight would only add duplicates once the lease expires.
    orphaned = StopRequest(0.0, abandon=True)
    parent = os.getppid()

    def poll_stop() -> StopRequest | None:
        if os.getppid() != parent:
            logger.error("supervisor is gone; stopping")
            return orphaned
        return on_signal if stop() else None

    driver = Driver(sender, sink, window=1, poll_stop=poll_stop)

    def read_pipe() -> None:
        # A reader thread keeps the supervisor's sends from ever blocking on us
        # while the driver's thread is busy writing outcomes.
        try:
            while True:
                message = pipe.recv()
                if isinstance(message, msg.SendBatch):
                    driver.put(Job(message.batch_id, message.line, message.token_ids))
                elif isinstance(message, msg.Stop):
                    driver.put(StopRequest(message.timeout, defer_retries=True))
                elif isinstance(message, msg.SetRate):
                    quota.set_rate(message.per_second)  # thread-safe: the bucket locks
                else:
                    logger.warning("unexpected message %s from the supervisor", type(message).__name__)
        except (EOFError, OSError):
            logger.error("supervisor is gone; stopping")
            driver.put(StopRequest(0.0, abandon=True))

    threading.Thread(target=read_pipe, name="pipe-reader", daemon=True).start()
    sink.post(msg.Ready())
    driver.run()
    return config.EXIT_OK


class _PipeOutcomes:
    """The sender worker's outcome sink: outcomes and heartbeats to the supervisor."""

    def __init__(self, pipe: Connection, stats: Callable[[], dict[str, Any]],
                 window: Callable[[], int]) -> None:
        self.pipe = pipe
        self.stats = stats
        self.window = window
        self.last_beat = 0.0
        self.last_window = 0

    def post(self, message: object) -> bool:
        try:
            self.pipe.send(message)
            return True
        except OSError:  # EPIPE/ECONNRESET: the supervisor is gone
            return False

    def done(self, job: Any, rows: list[Any], outcomes: list[Outcome]) -> None:
        self.post(msg.BatchOutcomes(str(job.key), list(zip(job.token_ids or [], outcomes))))

    def malformed(self, job: Any, error: Exception) -> None:
        outcome = Outcome(OutcomeKind.FAILED, error=f"malformed batch: {error}")
        self.post(msg.BatchOutcomes(str(job.key), [(tid, outcome) for tid in job.token_ids or []]))

    def tick(self) -> None:
        now = time.monotonic()
        window = self.window()
        beat = now - self.last_beat >= msg.HEARTBEAT_INTERVAL
        if beat:
            self.last_beat = now
            self.post(msg.Heartbeat({**self.stats(), "rss": rss_bytes()}))
        # At once when it changes, and with every heartbeat for a collector that
        # started since (the supervisor forwards it, it does not keep it).
        if beat or window != self.last_window:
            self.last_window = window
            self.post(msg.Window(window))

    def stopping(self, stop: Any) -> None:
        logger.info("stopping: finishing the batches in flight (at most %g s)", stop.timeout)
