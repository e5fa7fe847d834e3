"""The two worker processes of ``mailroom-supervisor``, run after the fork.

Everything that holds a database connection, a thread or an SES client is
created here, inside the child, never in the supervisor before the fork.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection

import psycopg

from mailroom import config, ledger
from mailroom._process import SignalFlag, die_with_parent, one_line, setup_logging
from mailroom.collector import Collector
from mailroom.config import Settings
from mailroom.supervisor import messages as protocol

logger = logging.getLogger("mailroom.workers")

def _boot(tag: str, settings: Settings) -> SignalFlag:
    setup_logging(tag, settings.log_level)
    die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group: only the supervisor
    # decides how to stop, it tells the workers through their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = SignalFlag()
    stop.install((signal.SIGTERM,))
    return stop


# -- collector worker ------------------------------------------------------------

class PipeSink:
    """The collector's :class:`~mailroom.collector.BatchSink` in supervised mode.

    Batches go to the supervisor as soon as their claim is committed (status
    ``claimed``); outcomes come back on the same pipe and are written to the ledger.
    The number of batches without outcomes is bounded by ``max_in_flight``.
    """

    final_status = "claimed"

    def __init__(self, pipe: Connection, settings: Settings) -> None:
        self.pipe = pipe
        self.queue = settings.queue_name
        self.max_attempts = settings.send_max_attempts
        self.max_in_flight = settings.max_in_flight
        self.in_flight: set = set()
        self.pending: collections.deque = collections.deque()  # messages not yet applied
        self.draining = False
        self.stopping = False
        self.counter = 0
        self.last_beat = 0.0

    def ready(self) -> bool:
        return not self.draining and not self.stopping and len(self.in_flight) < self.max_in_flight

    def deliver(self, claim: ledger.Claim, line: bytes) -> None:
        self.counter += 1
        batch_id = f"{os.getpid()}-{self.counter}"
        token_ids = [row[5] for row in claim.rows]
        recovery = sum(1 for row in claim.rows if row[0] == 2)
        try:
            self.pipe.send((protocol.BATCH, batch_id, line, token_ids, len(token_ids) - recovery,
                            recovery, claim.claimed_at))
        except OSError:
            # The supervisor is gone; the collector releases the rows and stops.
            self.stopping = True
            raise
        self.in_flight.add(batch_id)

    def fileno(self) -> int | None:
        return self.pipe.fileno()

    def receive(self) -> None:
        """Read whatever the supervisor sent, without touching the database."""
        try:
            while self.pipe.poll():
                message = self.pipe.recv()
                kind = message[0]
                if kind == protocol.DRAIN:
                    self.draining = True
                elif kind == protocol.STOP:
                    self.stopping = True
                elif kind == protocol.ADOPT:
                    self.in_flight.update(message[1])
                else:
                    self.pending.append(message)
        except (EOFError, OSError):
            logger.error("supervisor is gone; stopping")
            self.stopping = True
            self.pending.clear()

    def service(self, conn: psycopg.Connection) -> int:
        """Apply received outcomes and releases to the ledger (kept until applied)."""
        applied = 0
        while self.pending:
            kind, batch_id, payload, claimed_at = self.pending[0]
            if kind == protocol.OUTCOMES:
                ledger.record_outcomes(conn, self.queue, payload, claimed_at=claimed_at,
                                       max_attempts=self.max_attempts)
            elif kind == protocol.RELEASE:
                ledger.release(conn, self.queue, payload, claimed_at=claimed_at)
            self.pending.popleft()
            self.in_flight.discard(batch_id)
            applied += 1
        return applied

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_beat >= protocol.HEARTBEAT_INTERVAL:
            self.last_beat = now
            try:
                self.pipe.send((protocol.HEARTBEAT,))
            except (BrokenPipeError, OSError):
                self.stopping = True


def collector_worker(pipe: Connection, settings: Settings) -> int:
    """Entry point of the collector worker; returns its exit code."""
    stop = _boot("PG", settings)
    sink = PipeSink(pipe, settings)
    collector = Collector(settings, sink, lambda: stop() or sink.stopping,
                          wakeup_fd=stop.read_fd, on_ready=lambda: pipe.send((protocol.READY,)))
    try:
        code = collector.run_or_exit_code()
    except OSError:
        if not sink.stopping:
            raise
        logger.error("supervisor is gone; stopping (the last batch went back to the queue)")
        code = None
    if code is not None:
        return code
    if sink.pending and not stop():
        logger.warning("%d outcome messages not recorded (database unavailable at stop);"
                       " their rows are queued again when the claim lease expires", len(sink.pending))
    return config.EXIT_OK


# -- sender worker ---------------------------------------------------------------

def sender_worker(pipe: Connection, settings: Settings) -> int:
    """Entry point of the sender worker; returns its exit code."""
    stop = _boot("SES", settings)
    from mailroom.sender import Sender
    from mailroom.wire import WireError, decode_line

    sender = Sender(settings)
    try:
        sender.start()
    except Exception as exc:  # noqa: BLE001 - boto3 refusing its settings, e.g. a bad endpoint URL
        # Creating the client does not talk to SES: what fails here is configuration.
        logger.error("cannot start the sender: %s", one_line(exc))
        return config.EXIT_CONFIG
    events: queue.SimpleQueue = queue.SimpleQueue()

    def read_pipe() -> None:
        # A reader thread keeps the supervisor's sends from ever blocking on us
        # while the main thread is busy writing outcomes.
        try:
            while True:
                events.put(pipe.recv())
        except (EOFError, OSError):
            events.put(None)

    threading.Thread(target=read_pipe, name="pipe-reader", daemon=True).start()
    pipe.send((protocol.READY,))
    parent = os.getppid()
    in_flight = 0
    stop_timeout: float | None = None
    last_beat = 0.0

    def finished(batch_id, token_ids, future) -> None:
        try:
            results = future.result()
            outcomes = [(tid, o.kind, o.message_id, o.error, o.retry_after)
                        for tid, o in zip(token_ids, results)]
        except Exception as exc:  # a bug, not an SES answer: let the ledger retry later
            logger.exception("batch %s failed inside the sender", batch_id)
            outcomes = [(tid, "retry", None, f"sender error: {exc}", 60.0) for tid in token_ids]
        events.put((protocol.OUTCOMES, batch_id, outcomes))

    def post(message: tuple) -> bool:
        try:
            pipe.send(message)
            return True
        except OSError:     # EPIPE/ECONNRESET: the supervisor is gone
            return False

    while True:
        now = time.monotonic()
        if now - last_beat >= protocol.HEARTBEAT_INTERVAL:
            last_beat = now
            post((protocol.HEARTBEAT,))
        if os.getppid() != parent:
            # The supervisor died: nobody can record outcomes, so finishing the
            # calls in flight would only add duplicates after the lease expires.
            logger.error("supervisor is gone; stopping")
            sender.close(0)
            return config.EXIT_OK
        if stop() and stop_timeout is None:
            stop_timeout = settings.shutdown_timeout / 1000
        if stop_timeout is not None:
            break
        try:
            message = events.get(timeout=protocol.HEARTBEAT_INTERVAL)
        except queue.Empty:
            continue
        if message is None:
            logger.error("supervisor is gone; stopping")
            sender.close(0)
            return config.EXIT_OK
        kind = message[0]
        if kind == protocol.BATCH:
            _, batch_id, line, token_ids = message
            try:
                rows = decode_line(line)
            except WireError as exc:
                events.put((protocol.OUTCOMES, batch_id,
                            [(tid, "failed", None, f"malformed batch: {exc}", None) for tid in token_ids]))
                continue
            in_flight += 1
            future = sender.submit(rows)
            future.add_done_callback(lambda f, b=batch_id, t=token_ids: finished(b, t, f))
        elif kind == protocol.OUTCOMES:
            in_flight -= 1
            post(message)
        elif kind == protocol.STOP:
            stop_timeout = message[1]

    # Stopping: unfinished calls resolve to "retry" inside close(); report all.
    # Retries still waiting for their backoff go back to the ledger now rather
    # than holding up the stop; the ledger queues them with their retry time.
    # With the supervisor gone (its death is what sent SIGTERM) nobody would
    # record the outcomes: stop at once.
    if os.getppid() != parent:
        logger.error("supervisor is gone; stopping")
        stop_timeout = 0
    sender.close(stop_timeout, defer_retries=True)
    deadline = time.monotonic() + 5
    while in_flight:
        try:
            message = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if message is None:
            break
        if message[0] == protocol.OUTCOMES:
            in_flight -= 1
            post(message)
    return config.EXIT_OK
