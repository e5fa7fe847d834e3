"""The collector's connections, and whether LISTEN works on them.

Behind a transaction pooler (PgBouncer's ``pool_mode = transaction``) each
transaction may run on another server connection: a LISTEN is left on a server
connection the client no longer holds, so notifications never arrive, and
session settings or prepared statements leak to, or go missing from, whoever
gets that server connection next.  Nothing says so: the statements all succeed.

So it is asked, not assumed: :func:`delivers_notifications` LISTENs on a
channel of its own, NOTIFYs it from a second connection and waits a moment.
A connection that does not deliver is treated as pooled (no session settings, no
prepared statements) and the collector polls; ``MAILROOM_LISTEN_URL``, a direct
connection to the server, gives it back its wake-ups while claims go through
the pool.
"""

from __future__ import annotations

import logging
import os
import secrets

import psycopg
from psycopg import sql

from mailroom.config import Settings

log = logging.getLogger("mailroom.collector")

#: How long the probe's notification may take.  On a direct connection it takes
#: about a millisecond; the bound is paid only at connect time, and only by a
#: connection that does not deliver.
PROBE_TIMEOUT = 2.0
#: Polling interval bounds (seconds) when no connection delivers notifications:
#: ``MAILROOM_BATCH_TIMEOUT`` within them.
POLL_MIN = 0.05
POLL_MAX = 1.0


def open_connection(url: str, application_name: str) -> psycopg.Connection:
    """An autocommit connection with keepalives (a dead peer is noticed in ~1 min)."""
    return psycopg.connect(
        url, autocommit=True,
        keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
        connect_timeout=10, application_name=application_name,
    )


def delivers_notifications(conn: psycopg.Connection, url: str) -> bool:
    """Does a NOTIFY from another connection reach a LISTEN on ``conn``?

    The other connection is a new one to ``url``: through a pooler it may run
    on the very server connection ``conn``'s LISTEN was left on, and then the
    notification goes to that other client, not to ``conn``, which is the point.
    A server that refuses the NOTIFY (read-only) cannot tell: assumed direct.
    """
    channel = sql.Identifier(f"mailroom_probe_{os.getpid()}_{secrets.token_hex(4)}")
    conn.execute(sql.SQL("LISTEN {}").format(channel))
    try:
        with open_connection(url, "mailroom-probe") as other:
            other.execute(sql.SQL("NOTIFY {}").format(channel))
    except psycopg.Error as exc:
        if exc.sqlstate is None:
            raise
        log.debug("notification probe refused (%s): assuming a direct connection", exc.sqlstate)
        got = True
    else:
        got = any(True for _ in conn.notifies(timeout=PROBE_TIMEOUT, stop_after=1))
    conn.execute(sql.SQL("UNLISTEN {}").format(channel))
    return got


def poll_interval(batch_timeout_ms: int) -> float:
    """Seconds between two claims when nothing wakes the collector up."""
    return min(POLL_MAX, max(POLL_MIN, batch_timeout_ms / 1000))


def say_how(settings: Settings, said: set[str], pooled: bool, listening: bool, *, quiet: bool) -> None:
    """Log how the collector got connected; what is news only once per process
    (``said`` remembers), the plain "listening" line at debug when ``quiet``."""
    if pooled and "pooled" not in said:
        said.add("pooled")
        log.info("MAILROOM_DATABASE_URL does not deliver notifications (a transaction pooler?):"
                 " no session settings or prepared statements on it")
    if not listening:
        if "polling" not in said:
            said.add("polling")
            where = "MAILROOM_LISTEN_URL" if settings.listen_url else "MAILROOM_DATABASE_URL"
            log.warning("%s does not deliver notifications: polling the queue every %g s (set"
                        " MAILROOM_LISTEN_URL to a direct connection to the server to be woken at once)",
                        where, poll_interval(settings.batch_timeout))
        return
    log.log(logging.DEBUG if quiet else logging.INFO, "connected, listening on %s%s",
            settings.channel_name, " (MAILROOM_LISTEN_URL)" if settings.listen_url else "")


def set_timeouts(conn: psycopg.Connection, worker_timeout_ms: int) -> None:
    """Bound every statement below the supervisor's watchdog (not on a pooled
    connection: the settings would stay on a server connection others get).

    The collector is one thread: while a statement waits (an operator's
    transaction holding queue rows, a lock behind a long migration) it sends
    no heartbeat, and the watchdog would kill it, outcomes and all.  A lock
    wait gives up at a third of ``MAILROOM_WORKER_TIMEOUT`` and any statement
    at half of it; the collector logs that and tries again, heartbeating meanwhile.
    """
    # One round trip: connecting is the window a terminated backend hits.
    conn.execute(f"SET lock_timeout = {max(1, worker_timeout_ms // 3)};"
                 f" SET statement_timeout = {max(1, worker_timeout_ms // 2)}")
