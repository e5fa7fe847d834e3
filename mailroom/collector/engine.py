"""The collector: LISTEN for new tokens, claim them from the ledger in batches, encode.

The loop is independent of where batches go: a :class:`BatchSink`
receives each encoded line. :func:`run_stdout` plugs in stdout (compatibility
mode, ``mailroom-collector | mailroom-sender``); the supervisor's collector worker
plugs in its pipe and records the sender's outcomes through the same ledger module.

Notifications are only a hint that work exists: PostgreSQL folds identical
NOTIFYs of one transaction into one, so after any wake-up the collector keeps
claiming until a claim comes back short.
"""

# A little over the house's ~400 lines: connecting, claiming and the wait loop share
# one connection's state and one error policy (reconnect, wait out, retry); split,
# each part would need the others' fields.  Connection set-up is in listen.py.

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from typing import Protocol

import psycopg
from psycopg import sql

from mailroom import config, ledger, wire
from mailroom._process import backoff_delays, drain_fd, one_line
from mailroom.collector import listen
from mailroom.collector.refused import Refusals, read_only, refused
from mailroom.collector.trigger import BatchTrigger
from mailroom.config import Settings
from mailroom.vocabulary import BatchMode, DeliveryStatus

log = logging.getLogger("mailroom.collector")

#: Reconnect backoff: first delay, cap (seconds). Jitter spreads collectors apart
#: so a restarted server is not hit by all of them in the same instant.
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 10.0
#: Longest single wait, so a stop request or a due retry is noticed promptly even
#: if a wake-up is lost.
MAX_WAIT = 1.0
MIN_RETRY_WAIT = 0.02
#: Expired leases are looked for at most this often (seconds), and whenever
#: one is due (``next_due_in`` reports lease expiries too).
REQUEUE_EVERY = 1.0
#: Wait after a statement gave up on a lock (our lock_timeout), before retrying.
LOCK_RETRY_WAIT = 1.0


class BatchSink(Protocol):
    """Where claimed batches go. Implemented by stdout and by the supervisor pipe."""

    #: Ledger status the claim sets: ``emitted`` (committed only after
    #: :meth:`deliver` returns, stdout) or ``claimed`` (committed before, pipe).
    final_status: DeliveryStatus

    def ready(self) -> bool:
        """May another batch be claimed now? (backpressure)"""

    def idle(self) -> bool:
        """Is the pipeline empty: ready, and no batch handed on still without its
        outcome?  Adaptive batching claims at once while this holds."""

    def deliver(self, claim: ledger.Claim, line: bytes) -> None:
        """Hand one encoded batch on; raise to have it released back to the queue."""

    def fileno(self) -> int | None:
        """A descriptor to wake up on besides the database, or None."""

    def receive(self) -> None:
        """Read what arrived on :meth:`fileno`, without using the database."""

    def service(self, conn: psycopg.Connection) -> int:
        """Apply what :meth:`receive` got (e.g. record outcomes); return how many."""

    def tick(self) -> None:
        """Called at least every :data:`MAX_WAIT` seconds (heartbeats)."""

    def actions(self) -> frozenset[int] | None:
        """The actions to claim (None: all); the sender holds an action whose
        template does not render, and its rows stay queued."""


class Collector:
    """One LISTEN connection, one queue; call :meth:`run` until ``should_stop()``."""

    def __init__(self, settings: Settings, sink: BatchSink, should_stop: Callable[[], bool],
                 wakeup_fd: int | None = None, on_ready: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_ready = on_ready
        self.sink = sink
        self.should_stop = should_stop
        self.wakeup_fd = wakeup_fd
        self.signer = wire.Signer(settings.secret_key)
        self.conn: psycopg.Connection | None = None
        #: Where notifications arrive: ``conn``, a MAILROOM_LISTEN_URL connection,
        #: or None when none delivers them (the loop polls).
        self.listener: psycopg.Connection | None = None
        self._said: set[str] = set()
        self.batches = 0
        self.rows = 0
        self.backlog = False
        self._requeued_at = -REQUEUE_EVERY
        self.refusals = Refusals(log, "claims", "claims wait, what is held is kept")

    # -- connection -------------------------------------------------------------
    def connect(self) -> psycopg.Connection:
        """Connect (retrying forever with backoff), check the schema, LISTEN: on
        ``MAILROOM_LISTEN_URL`` if set, else on the claims' connection, unless it
        does not deliver notifications (a transaction pooler, see
        :mod:`~mailroom.collector.listen`: then the loop polls).

        A missing or outdated schema raises :class:`ledger.SchemaError`: retrying
        cannot fix it, the operator must run ``mailroom migrate up``.
        """
        delays = backoff_delays(BACKOFF_FIRST, BACKOFF_CAP)
        attempt = 0
        s = self.settings
        while True:
            attempt += 1
            url, variable = s.database_url, "MAILROOM_DATABASE_URL"
            try:
                conn = listen.open_connection(url, "mailroom-collector")
                listener: psycopg.Connection | None = None
                try:
                    ledger.check_schema(conn)
                    ledger.check_queue(conn, s.queue_name)
                    pooled = not listen.delivers_notifications(conn, url)
                    if pooled:
                        ledger.mark_pooled(conn)
                    else:
                        ledger.configure_session(conn)
                        listen.set_timeouts(conn, s.worker_timeout)
                    if s.listen_url:
                        url, variable = s.listen_url, "MAILROOM_LISTEN_URL"
                        listener = listen.open_connection(url, "mailroom-listener")
                        if not listen.delivers_notifications(listener, url):
                            listener.close()
                            listener = None
                    elif not pooled:
                        listener = conn
                    if listener is not None:
                        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(s.channel_name)))
                except BaseException:
                    conn.close()
                    if listener is not None:
                        listener.close()
                    raise
                # Reconnecting is how a read-only refusal is retried: not news each time.
                listen.say_how(s, self._said, pooled, listener is not None, quiet=self.refusals.active)
                self.conn, self.listener = conn, listener
                return conn
            except psycopg.ProgrammingError as exc:
                # A malformed connection string: no retry can fix it.
                raise config.ConfigError(variable, config.redact(one_line(exc), url)) from None
            except psycopg.OperationalError as exc:
                delay = next(delays)
                log.warning("connection failed (attempt %d): %s; retrying in %.1fs",
                            attempt, config.redact(one_line(exc), url), delay)
                if self._sleep(delay):
                    raise _Stopped() from None

    def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early on the wake-up fd; return True if asked to stop."""
        deadline = time.monotonic() + seconds
        while not self.should_stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._select([], min(remaining, MAX_WAIT))
        return True

    def _select(self, fds: list[int], timeout: float) -> list[int]:
        """Wait for the given descriptors, the wake-up pipe and the sink's."""
        sink_fd = self.sink.fileno()
        watch = [fd for fd in (*fds, self.wakeup_fd, sink_fd) if fd is not None]
        ready, _, _ = select.select(watch, [], [], max(0.0, timeout))
        if self.wakeup_fd is not None and self.wakeup_fd in ready:
            drain_fd(self.wakeup_fd)
        if sink_fd is not None and sink_fd in ready:
            self.sink.receive()
        self.sink.tick()
        return ready

    # -- claiming ---------------------------------------------------------------
    def claim_once(self) -> ledger.Claim:
        """Claim one batch and hand it to the sink; return the claim."""
        conn = self.conn
        assert conn is not None
        limit = self.settings.batch_limit
        if self.sink.final_status is DeliveryStatus.EMITTED:
            return self._claim_emitted(conn, limit)
        # Claimed mode: the claim is one statement, committed on its own in
        # autocommit (one round trip); the batch is handed on once it is
        # committed, and rows that could not be handed on are released.
        claim = ledger.claim(conn, self.settings.queue_name, limit,
                             lease_ms=self.settings.claim_timeout, final_status=self.sink.final_status,
                             actions=self.sink.actions())
        if claim.rows:
            try:
                self.sink.deliver(claim, self.signer.encode_batch(claim.rows))
            except Exception:
                ledger.release(conn, self.settings.queue_name, [r[5] for r in claim.rows],
                               claimed_at=claim.claimed_at)
                raise
        self._tally(claim)
        return claim

    def _claim_emitted(self, conn: psycopg.Connection, limit: int) -> ledger.Claim:
        """Compatibility mode's claim: the rows become 'emitted' only if the
        commit follows a flushed line."""
        # begin=True: BEGIN travels with the claim (one round trip, not two);
        # the COMMIT is the second, after the line is flushed.  Same
        # transaction as `with conn.transaction()`, spelled out.
        try:
            claim = ledger.claim(conn, self.settings.queue_name, limit,
                                 lease_ms=self.settings.claim_timeout,
                                 final_status=self.sink.final_status, begin=True)
            if claim.rows:
                self.sink.deliver(claim, self.signer.encode_batch(claim.rows))
            conn.commit()
        except BaseException:
            _rollback(conn)
            raise
        self._tally(claim)
        return claim

    def _tally(self, claim: ledger.Claim) -> None:
        if claim.rows:
            self.batches += 1
            self.rows += len(claim.rows)
            log.debug("batch of %d rows (%d skipped)", len(claim.rows), claim.skipped)

    def drain(self) -> int:
        """Claim until a claim comes back short (or the sink is full); return rows sent.

        Sets :attr:`backlog` when it stopped with work possibly left (sink full,
        stop requested), so the loop resumes as soon as the sink has room.
        Expired leases are looked for after the claims, not before: the batch
        that woke us should not wait for that query (the rows it re-queues are
        due at once, so the loop's next turn claims them).
        """
        assert self.conn is not None
        total = 0
        self.backlog = True
        while not self.should_stop() and self.sink.ready():
            self.sink.tick()
            claim = self.claim_once()
            total += len(claim.rows)
            self.refusals.succeeded()
            if claim.picked < self.settings.batch_limit:
                self.backlog = False
                break
        now = time.monotonic()
        if now - self._requeued_at >= REQUEUE_EVERY:
            self._requeued_at = now
            ledger.requeue_expired(self.conn, self.settings.queue_name,
                                   self.settings.claim_timeout, self.settings.send_max_attempts)
        return total

    # -- main loop --------------------------------------------------------------
    def run(self) -> None:
        """Collect until asked to stop; survive any number of lost connections."""
        try:
            while not self.should_stop():
                try:
                    if self.conn is None:
                        conn = self.connect()
                        if self.on_ready is not None:
                            self.on_ready()
                        self.sink.service(conn)
                        self.drain()
                    self._listen_loop()
                except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as exc:
                    if self.conn is None or self.conn.broken:
                        log.warning("database connection lost: %s", one_line(exc))
                        self._close()
                        continue
                    # Our own lock_timeout / statement_timeout: the connection is
                    # fine, the rows were held; what was not applied is kept.
                    log.warning("a statement gave up waiting (%s); trying again in %.1f s",
                                one_line(exc), LOCK_RETRY_WAIT)
                    if self._sleep(LOCK_RETRY_WAIT):
                        break
                except psycopg.OperationalError as exc:
                    log.warning("database connection lost: %s", one_line(exc))
                    self._close()
                except psycopg.Error as exc:
                    # conn is None when connect() itself failed after connecting
                    # (LISTEN refused on a standby): a refusal too, not a lost connection.
                    if self.conn is not None and not refused(exc, self.conn):
                        log.warning("database connection lost: %s", one_line(exc))
                        self._close()
                        continue
                    delay = self.refusals.failed(exc)
                    if read_only(exc):
                        self._close()
                    if self._sleep(delay):
                        break
        except _Stopped:
            pass
        finally:
            self._close()

    def run_or_exit_code(self) -> int | None:
        """:meth:`run`, with the errors that retrying cannot fix turned into an
        exit code (logged on one line); None when it ran until asked to stop."""
        try:
            self.run()
        except ledger.SchemaError as exc:
            log.error("%s", exc)
            return config.EXIT_SCHEMA
        except config.ConfigError as exc:
            log.error("%s", exc)
            return config.EXIT_CONFIG
        return None

    def _listen_loop(self) -> None:
        """Wait for notifications and claim when a batch is due (:class:`BatchTrigger`),
        when rows re-queued for a later attempt come due, or while a backlog is left;
        run a health check on a connection quiet for ``healthcheck_interval``."""
        conn = self.conn
        assert conn is not None
        listener = self.listener
        s = self.settings
        # No connection delivers notifications: a claim every poll interval
        # stands in for them (the claim is the check; an empty one is cheap).
        poll_every = listen.poll_interval(s.batch_timeout) if listener is None else None
        next_poll = time.monotonic() + (poll_every or 0.0)
        trigger = BatchTrigger(s.batch_limit, s.batch_timeout / 1000, adaptive=s.batch_mode == BatchMode.ADAPTIVE)
        health_every = s.healthcheck_interval / 1000
        last_activity = time.monotonic()
        # Rows left queued because the sink was full count as due: they are
        # claimed as soon as the sink has room again.
        due_at = self._due_at()
        while not self.should_stop():
            wake_at = due_at if poll_every is None else min(next_poll, due_at or next_poll)
            self._select([listener.fileno()] if listener is not None else [],
                         self._wait(trigger, wake_at, last_activity + health_every))
            if self.sink.service(conn) and not self.backlog:
                # Outcomes may have re-queued rows for a later attempt.  Not
                # while a backlog is being claimed: the claims take what is due,
                # and the drain that ends the backlog looks again.
                due_at = self._due_at()
            # Also collects notifications that arrived while a query was running.
            got = sum(1 for _ in listener.notifies(timeout=0)) if listener is not None else 0
            now = time.monotonic()
            poll_due = poll_every is not None and now >= next_poll
            if poll_due:
                next_poll = now + (poll_every or 0.0)
            if got:
                trigger.notified(got, now)
                last_activity = now
            if self.should_stop():
                return
            retry_due = due_at is not None and now >= due_at
            if retry_due:
                self._requeued_at = -REQUEUE_EVERY
            if (trigger.due(now, self.sink.idle()) or retry_due or poll_due or self.backlog) and self.sink.ready():
                self.drain()
                trigger.claimed()
                last_activity = time.monotonic()
                # With work left (the sink filled up first) the next drain comes
                # as soon as the sink has room: no query for what is due until then.
                due_at = None if self.backlog else self._due_at()
            elif now >= last_activity + health_every:
                conn.execute("SELECT 1")
                if listener is not None and listener is not conn:
                    listener.execute("SELECT 1")
                log.debug("health check ok")
                last_activity = now
                due_at = self._due_at()

    def _wait(self, trigger: BatchTrigger, due_at: float | None, health_at: float) -> float:
        """Seconds the loop may wait for the database or the sink before it has work."""
        now = time.monotonic()
        deadlines = [health_at]
        # With the sink full there is no point in waking for claims: the sink's
        # descriptor wakes us when room frees up (no busy loop on a due batch).
        if self.sink.ready():
            if self.backlog:
                deadlines.append(now)
            batch_at = trigger.deadline(now, self.sink.idle())
            if batch_at is not None:
                deadlines.append(batch_at)
            if due_at is not None:
                deadlines.append(due_at)
        return min(MAX_WAIT, min(deadlines) - now)

    def _due_at(self) -> float | None:
        assert self.conn is not None
        due_in = ledger.next_due_in(self.conn, self.settings.queue_name, self.settings.claim_timeout,
                                    actions=self.sink.actions())
        # A row that is due but locked by another collector's open claim would make
        # us spin; a short floor keeps that to a few cheap queries.
        return None if due_in is None else time.monotonic() + max(MIN_RETRY_WAIT, due_in)

    def _close(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None and listener is not self.conn:
            listener.close()
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


class _Stopped(Exception):
    """Raised inside the loop when a stop was requested during a wait."""


def _rollback(conn: psycopg.Connection) -> None:
    """End a failed claim's transaction; a broken connection is left to the caller."""
    try:
        conn.rollback()
    except psycopg.Error:
        pass
