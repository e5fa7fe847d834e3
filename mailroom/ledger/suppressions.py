"""The suppression list (DESIGN.md 11): addresses mailroom never sends to again.

Permanent bounces and complaints add themselves (:func:`mailroom.ledger.events.record_events`);
operators list, add, remove and check addresses here (``mailroom suppression``), and each
add or remove writes a ``suppression_audit`` row saying who did it.  A claim skips a
suppressed address (``last_error`` ``suppressed: ...``, see the claim).

Addresses are stored as :func:`mailroom.addresses.normalise` makes them (domain
lower-cased, ASCII IDNA form, local part as is) plus their Unicode-domain form; lookups
normalise what the operator typed the same way.  Each function takes a psycopg
connection owned by the caller and leaves transaction control to it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailroom.addresses import normalise, normalise_unicode

__all__ = ["OPERATOR", "add", "check", "count", "entries", "remove"]

#: The reason of an address an operator added.
OPERATOR = "operator"
# An entry is its row as a dict (dict_row): these columns are its keys.
_SELECT = "SELECT address, reason, detail, created_at, created_by, event_id FROM suppressions"


def entries(conn: psycopg.Connection[Any], *, search: str | None = None, reason: str | None = None,
            since: dt.datetime | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Suppressed addresses, newest first: those containing ``search`` (case-insensitive),
    of ``reason``, added at or after ``since``; at most ``limit``."""
    return conn.cursor(row_factory=dict_row).execute(
        f"""{_SELECT}
             WHERE (%(search)s::text IS NULL OR address ILIKE '%%' || %(search)s || '%%'
                    OR address_unicode ILIKE '%%' || %(search)s || '%%')
               AND (%(reason)s::text IS NULL OR reason = %(reason)s)
               AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
             ORDER BY created_at DESC, address LIMIT %(limit)s""",
        {"search": search, "reason": reason, "since": since, "limit": limit}).fetchall()


def check(conn: psycopg.Connection[Any], address: str) -> dict[str, Any] | None:
    """The suppression of ``address`` as typed, or ``None`` when it is not suppressed."""
    return conn.cursor(row_factory=dict_row).execute(
        f"{_SELECT} WHERE address = %s", (normalise(address),)).fetchone()


def count(conn: psycopg.Connection[Any]) -> int:
    """How many addresses are suppressed."""
    row = conn.execute("SELECT count(*) FROM suppressions").fetchone()
    return int(row[0]) if row else 0


def add(conn: psycopg.Connection[Any], address: str, *, actor: str, note: str | None = None) -> bool:
    """Suppress ``address`` by hand (reason ``operator``), audited under ``actor``;
    ``False`` (and no audit row) when it was suppressed already."""
    row = conn.execute(
        """WITH added AS (
               INSERT INTO suppressions (address, address_unicode, reason, detail, created_by)
               VALUES (%(address)s, %(unicode)s, %(reason)s, %(note)s, %(actor)s)
               ON CONFLICT (address) DO NOTHING RETURNING address
           ),
           audited AS (
               INSERT INTO suppression_audit (action, address, reason, actor)
               SELECT 'add', address, %(note)s, %(actor)s FROM added
           )
           SELECT count(*) FROM added""",
        {"address": normalise(address), "unicode": normalise_unicode(address), "reason": OPERATOR,
         "note": note, "actor": actor}).fetchone()
    return bool(row and row[0])


def remove(conn: psycopg.Connection[Any], address: str, *, actor: str, note: str | None = None) -> bool:
    """Take ``address`` off the list, audited under ``actor``; ``False`` (and no audit
    row) when it was not on it.  Its next email is sent again."""
    row = conn.execute(
        """WITH removed AS (
               DELETE FROM suppressions WHERE address = %(address)s RETURNING address, reason
           ),
           audited AS (
               INSERT INTO suppression_audit (action, address, reason, actor)
               SELECT 'remove', address, COALESCE(%(note)s, 'was ' || reason), %(actor)s FROM removed
           )
           SELECT count(*) FROM removed""",
        {"address": normalise(address), "note": note, "actor": actor}).fetchone()
    return bool(row and row[0])
