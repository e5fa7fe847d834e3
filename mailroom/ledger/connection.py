"""A ledger connection: the checks and settings it needs, and how statements run on it.

:func:`check_schema` and :func:`check_queue` refuse a database this code cannot
work with (a :class:`SchemaError`: no retry fixes it), :func:`configure_session`
sets the collector's connection up once.  :func:`execute_prepared` and
:func:`count` are how :mod:`~mailroom.ledger.operations` runs the statements of
:mod:`~mailroom.ledger.sql`.  Every function takes a psycopg 3 (sync) connection
owned by the caller.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import psycopg
from psycopg import pq

from mailroom.ledger import sql as ledger_sql

__all__ = ["REQUIRED_VERSION", "SchemaError", "check_queue", "check_schema", "configure_session",
           "count", "execute_prepared", "mark_pooled"]

#: The schema version (``schema_migrations``) this package's SQL needs.
REQUIRED_VERSION = 3  # 3: delivery events and suppressions (DESIGN.md 11)


class SchemaError(Exception):
    """The database schema is missing, too old or dirty for this mailroom."""


def check_schema(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`SchemaError` unless the database is migrated for this code:
    ``schema_migrations`` at :data:`REQUIRED_VERSION` or later, clean, and the
    ledger's tables."""
    found = conn.execute(ledger_sql.SCHEMA_TABLES).fetchone()
    assert found is not None
    row = None
    if found[0]:
        row = conn.execute(ledger_sql.SCHEMA_VERSION).fetchone()
    if row is None or row[0] < 0:
        raise SchemaError("the database has no mailroom schema: run `mailroom migrate up`")
    version, dirty = row
    if dirty:
        raise SchemaError(
            f"the database schema is dirty at version {version} (a migration failed): see "
            "`mailroom migrate status`, fix it with `mailroom migrate force V`, then migrate up"
        )
    if version < REQUIRED_VERSION or not found[1]:
        raise SchemaError(
            f"the database schema is at version {version}, this mailroom needs "
            f"{REQUIRED_VERSION}: run `mailroom migrate up`"
        )


def check_queue(conn: psycopg.Connection[Any], queue: str) -> None:
    """Raise :class:`SchemaError` unless ``queue`` is a ``jobs.job_type`` with its row."""
    row = conn.execute(ledger_sql.CHECK_QUEUE, {"queue": queue}).fetchone()
    if not row or not row[0]:
        raise SchemaError(f"MAILROOM_QUEUE_NAME: queue {queue!r} is not in jobs"
                          " (add it to the job_type type and the jobs table, or fix the name)")


def configure_session(conn: psycopg.Connection[Any]) -> None:
    """Per-connection settings for the collector's connection; call once after connecting.

    * ``synchronous_commit = off``: a commit returns before its WAL is flushed,
      so a PostgreSQL crash (not a mailroom crash) can forget the last few
      hundred ms of ledger updates.  Every such loss leaves a row *less*
      advanced than what happened (queued instead of claimed, claimed instead
      of sent), which ends in a resend, never in a lost email; the database
      stays consistent.  The application's own token inserts are not affected.
    * ``enable_seqscan = off``, ``enable_bitmapscan = off``: statements here
      are cached as generic plans, made once; one made while the queue was
      small could otherwise read and sort the whole backlog at every claim
      once a burst arrives.  Every statement here is built for index scans.
    * ``jit = off``: compiling these short statements costs more than running them.

    A SET is undone if its transaction rolls back: on a connection that is not
    in autocommit mode and was idle, the transaction is committed here.
    """
    idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
    for setting in ledger_sql.SESSION_SETTINGS:
        conn.execute(setting)
    if not conn.autocommit and idle:
        conn.commit()


# Statements PREPAREd on each connection.  A server-side prepared statement
# (rather than psycopg's) can be EXECUTEd in one simple query with BEGIN.
_prepared: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


#: Connections through a transaction pooler (see :func:`mark_pooled`).
_pooled: weakref.WeakSet[Any] = weakref.WeakSet()


def mark_pooled(conn: psycopg.Connection[Any]) -> None:
    """Treat ``conn`` as going through a transaction pooler (PgBouncer).

    Each of its transactions may run on another server connection: a statement
    PREPAREd by one is unknown to the next (or already known: PREPARE fails),
    so neither our PREPARE nor psycopg's automatic preparing is used on it.
    """
    conn.prepare_threshold = None
    _pooled.add(conn)


def execute_prepared(conn: psycopg.Connection[Any], sql: str, begin: bool,
                     retry: bool = True) -> list[Any]:
    """Run ``sql`` as a server-side prepared statement (PREPAREd once per
    connection), after BEGIN in the same round trip if ``begin``; its rows.
    On a pooled connection (:func:`mark_pooled`) ``sql`` itself runs."""
    if conn in _pooled:
        cur = conn.execute(("BEGIN; " if begin else "") + sql, prepare=False)
        if begin:
            cur.nextset()
        return cur.fetchall()
    name = "mailroom_" + hashlib.sha1(sql.encode()).hexdigest()[:20]
    known = _prepared.setdefault(conn, set())
    if name not in known:
        conn.execute(f"PREPARE {name} AS {sql}", prepare=False)
        known.add(name)
    try:
        cur = conn.execute(("BEGIN; " if begin else "") + f"EXECUTE {name}", prepare=False)
    except psycopg.errors.InvalidSqlStatementName:
        # Deallocated behind our back (DISCARD ALL): prepare it again, unless
        # the failure broke a transaction that is not ours to roll back.
        known.clear()
        if begin:
            conn.rollback()
        if not retry or conn.info.transaction_status != pq.TransactionStatus.IDLE:
            raise
        return execute_prepared(conn, sql, begin, retry=False)
    if begin:
        cur.nextset()
    return cur.fetchall()


def count(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any],
          prepare: bool | None = None) -> int:
    """Run a statement that answers one count (rows changed); that count."""
    row = conn.execute(sql, params, prepare=prepare).fetchone()
    return int(row[0]) if row else 0
