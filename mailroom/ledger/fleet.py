"""The fleet: every consumer of a queue, on every host (table ``consumers``, migration 2).

A collector calls :func:`register` when it starts, :func:`heartbeat` every few
seconds with its running totals, and :func:`unregister` at a clean exit.  A
consumer that dies leaves its row behind; :func:`consumers` flags a row
``stale`` once it has not been refreshed for ``stale_after_s``, and the next
process registering with the same host and pid replaces it.

Like :mod:`mailroom.ledger.operations`, every function takes a psycopg 3 (sync)
connection owned by the caller and leaves transaction control to it.  Times
come from ``statement_timestamp()``: the database's clock, the same for every
host, so staleness does not depend on clocks agreeing across VMs.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

__all__ = ["consumers", "heartbeat", "register", "unregister"]


def register(conn: psycopg.Connection, queue: str, host: str, pid: int) -> int:
    """Record a consumer of ``queue`` running as ``pid`` on ``host``; returns its id.

    A row left by an earlier process with the same host and pid (it died, the
    pid was reused) is replaced rather than shown twice.
    """
    conn.execute(
        "DELETE FROM consumers WHERE job_type = %s AND host = %s AND pid = %s",
        (queue, host, pid),
    )
    row = conn.execute(
        "INSERT INTO consumers (job_type, host, pid) VALUES (%s, %s, %s) RETURNING id",
        (queue, host, pid),
    ).fetchone()
    assert row is not None
    return int(row[0])


def heartbeat(conn: psycopg.Connection, consumer_id: int, batches: int, rows: int) -> bool:
    """Refresh a consumer's row with its totals since it started.

    Returns False when the row is gone (removed by hand or by a namesake's
    :func:`register`): the caller should :func:`register` again.
    """
    cur = conn.execute(
        "UPDATE consumers SET last_seen_at = statement_timestamp(), batches = %s, rows = %s"
        " WHERE id = %s",
        (batches, rows, consumer_id),
    )
    return cur.rowcount == 1


def unregister(conn: psycopg.Connection, consumer_id: int) -> None:
    """Remove a consumer's row (at a clean exit)."""
    conn.execute("DELETE FROM consumers WHERE id = %s", (consumer_id,))


def consumers(conn: psycopg.Connection, queue: str, stale_after_s: float = 30) -> list[dict[str, Any]]:
    """Every consumer of ``queue``: id, host, pid, started_at, last_seen_at,
    seen_s_ago, batches, rows and ``stale`` (not refreshed for ``stale_after_s``).

    Live ones first, then by host and pid.  At most 1000 rows.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT id, host, pid, started_at, last_seen_at,
                   EXTRACT(EPOCH FROM statement_timestamp() - last_seen_at)::float8 AS seen_s_ago,
                   batches, rows,
                   last_seen_at < statement_timestamp() - make_interval(secs => %s) AS stale
              FROM consumers
             WHERE job_type = %s
             ORDER BY stale, host, pid
             LIMIT 1000
            """,
            (stale_after_s, queue),
        )
        return cur.fetchall()
