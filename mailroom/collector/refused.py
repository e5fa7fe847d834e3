"""Statements the database refuses: one log line per kind, a retry with backoff.

A server that answers but refuses a statement (``default_transaction_read_only``
during a maintenance window, a failover that left us on a replica, a revoked
privilege) is not a crash: a worker that died on it would be restarted by the
supervisor, die again on the same statement, and fill the log with tracebacks
every few seconds while doing nothing better than waiting.  The collector waits
instead: claims stop, what it holds (outcomes, leases) is kept, and each kind of
refusal is logged once until the statement goes through again.
"""

from __future__ import annotations

import logging
import time

import psycopg

from mailroom._process import backoff, one_line

#: Retry delays after a refusal: first, cap (seconds).  The cap bounds how long
#: the queue waits after writes come back.
FIRST = 0.5
CAP = 10.0


def refused(exc: psycopg.Error, conn: psycopg.Connection | None) -> bool:
    """Did the server refuse a statement on a connection still usable?

    Errors without an SQLSTATE (a lost connection) or on a broken connection
    are connection problems, handled by reconnecting, not here.
    """
    return exc.sqlstate is not None and conn is not None and not conn.broken


def read_only(exc: psycopg.Error) -> bool:
    """A refusal that only a new connection can end: the session's default
    (``ALTER DATABASE ... SET default_transaction_read_only``) or a standby is
    fixed at connection time, so the retry must reconnect to see writes return."""
    return isinstance(exc, psycopg.errors.ReadOnlySqlTransaction) or exc.sqlstate == "25006"


class Refusals:
    """The refusals seen since the last success, for one kind of work (``what``)."""

    def __init__(self, log: logging.Logger, what: str, consequence: str) -> None:
        self.log = log
        self.what = what
        self.consequence = consequence
        self.kinds: set[str] = set()
        self.attempt = 0
        #: Monotonic time before which the work should not be tried again.
        self.not_before = 0.0

    @property
    def active(self) -> bool:
        return self.attempt > 0

    def failed(self, exc: psycopg.Error) -> float:
        """Log ``exc`` if its kind is new in this episode; return the delay to wait."""
        kind = exc.sqlstate or type(exc).__name__
        delay = backoff(self.attempt, FIRST, CAP)
        self.attempt += 1
        if kind not in self.kinds:
            self.kinds.add(kind)
            self.log.warning("%s refused by the database (%s: %s); %s, retrying with backoff up to %g s",
                             self.what, kind, one_line(exc), self.consequence, CAP)
        else:
            self.log.debug("%s refused again (%s); retrying in %.1f s", self.what, kind, delay)
        self.not_before = time.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        """The work went through: say so once, and start the next episode afresh."""
        if self.attempt:
            self.log.info("%s accepted by the database again", self.what)
        self.kinds.clear()
        self.attempt = 0
        self.not_before = 0.0
