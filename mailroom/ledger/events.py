"""Delivery events and suppression in the ledger (DESIGN.md 11).

The events worker (:mod:`mailroom.events`) parses what SES published and hands
it here: :func:`record_events` writes a batch in one statement, so the worker
deletes its SQS messages only once that commit is done.  Matching, precedence,
idempotence and suppression are all in that statement
(:data:`mailroom.ledger.sql.RECORD_EVENTS` says why each part is shaped so);
this module prepares its arrays and reads its counts.

The suppression list itself (``mailroom suppression list|add|remove|check``)
is :mod:`mailroom.ledger.suppressions`; what a claim does with it is in the
claim (:func:`mailroom.ledger.claim`).

Like the rest of :mod:`mailroom.ledger`, each function takes a psycopg
connection owned by the caller and leaves transaction control to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg

from mailroom.addresses import normalise, normalise_unicode
from mailroom.ledger import sql as ledger_sql
from mailroom.vocabulary import SUPPRESSING, DeliveryEvent

__all__ = ["HEALTH_WINDOW_S", "RAW_CAP", "REMATCH_WITHIN_S", "Health", "Recorded", "feedback_counts", "health",
           "latest_bad", "record_events", "rematch_events"]

#: The raw JSON kept with an event is cut at this many characters: enough for
#: SES's bounce or complaint record, not a copy of a large message's headers.
RAW_CAP = 4096
#: Unmatched events are matched again for this long after they were recorded
#: (an event that overtook the outcome writing its MessageId).
REMATCH_WITHIN_S = 900
#: Bounce and complaint rates are over this window of sends, as SES reviews them.
HEALTH_WINDOW_S = 86_400


class Recorded(NamedTuple):
    """What :func:`record_events` changed: the *new* events by feedback type
    (redeliveries are not counted), how many of them matched no delivery, how
    many addresses were newly suppressed, how many deliveries changed feedback."""

    by_type: dict[str, int]
    unmatched: int
    suppressed: int
    feedback_changed: int

    @property
    def new(self) -> int:
        return sum(self.by_type.values())


def record_events(conn: psycopg.Connection[Any], events: Sequence[DeliveryEvent]) -> Recorded:
    """Record ``events`` in one statement (the caller commits, then deletes the
    messages they came from).  Recording an event again changes nothing."""
    if not events:
        return Recorded({}, 0, 0, 0)
    suppress = [e.type in SUPPRESSING for e in events]
    # The recipient with its domain in Unicode: the account may hold jane@bücher.de where
    # SES reports jane@xn--bcher-kva.de (see _MATCH); the suppression list keeps it too.
    unicode = [normalise_unicode(e.recipient) for e in events]
    params = {
        "message_ids": [e.message_id for e in events],
        "recipients": [e.recipient for e in events],
        "types": [str(e.type) for e in events],
        "subtypes": [e.subtype for e in events],
        "event_at": [e.event_at for e in events],
        "diagnostics": [e.diagnostic for e in events],
        "raws": [None if e.raw is None else e.raw[:RAW_CAP] for e in events],
        "addresses": [normalise(e.recipient) if s else None for e, s in zip(events, suppress, strict=True)],
        "unicode": [u if s else None for u, s in zip(unicode, suppress, strict=True)],
        "recipients_unicode": unicode,
    }
    row = conn.execute(ledger_sql.RECORD_EVENTS, params).fetchone()
    assert row is not None
    by_type, unmatched, suppressed, changed = row
    return Recorded({str(k): int(v) for k, v in (by_type or {}).items()}, int(unmatched), int(suppressed),
                    int(changed))


def rematch_events(conn: psycopg.Connection[Any], within_s: float = REMATCH_WITHIN_S) -> int:
    """Match events recorded without a delivery in the last ``within_s`` seconds
    whose delivery has its MessageId by now; how many matched."""
    row = conn.execute(ledger_sql.REMATCH_EVENTS, {"within_s": within_s}).fetchone()
    return int(row[0]) if row else 0


class Health(NamedTuple):
    """Deliverability over the last :data:`HEALTH_WINDOW_S`: deliveries sent,
    those that bounced for good and those that complained (by events in the
    window), the id of the newest bounce or complaint event (0: none), and how
    many addresses the suppression list holds."""

    sent: int
    bounced: int
    complained: int
    last_bad_event: int
    suppressions: int = 0

    @property
    def bounce_rate(self) -> float | None:
        return self.bounced / self.sent if self.sent else None

    @property
    def complaint_rate(self) -> float | None:
        return self.complained / self.sent if self.sent else None


def health(conn: psycopg.Connection[Any], queue: str, window_s: float = HEALTH_WINDOW_S) -> Health:
    """The queue's :class:`Health` over the last ``window_s`` seconds, in one query."""
    row = conn.execute(ledger_sql.HEALTH, {"queue": queue, "window_s": window_s}).fetchone()
    assert row is not None
    return Health(*(int(v) for v in row))


def feedback_counts(conn: psycopg.Connection[Any], queue: str, window_s: float = HEALTH_WINDOW_S) -> dict[str, int]:
    """New events of the last ``window_s`` seconds by type (the monitor's screen 6)."""
    rows = conn.execute(
        """SELECT type::text, count(*) FROM delivery_events
            WHERE event_at >= statement_timestamp() - make_interval(secs => %(window_s)s)
              AND job_type = %(queue)s GROUP BY type""", {"queue": queue, "window_s": window_s})
    return {str(kind): int(n) for kind, n in rows}


def latest_bad(conn: psycopg.Connection[Any], queue: str, limit: int = 50) -> list[dict[str, Any]]:
    """The latest bounces (permanent or not) and complaints of the queue, newest first:
    recipient, type, subtype, event time, diagnostic."""
    rows = conn.execute(
        """SELECT recipient, type::text, subtype, event_at, diagnostic FROM delivery_events
            WHERE job_type = %(queue)s AND type IN ('bounced', 'soft_bounced', 'complained')
              AND event_at >= statement_timestamp() - interval '7 days'
            ORDER BY event_at DESC LIMIT %(limit)s""", {"queue": queue, "limit": limit})
    return [dict(zip(("recipient", "type", "subtype", "event_at", "diagnostic"), r, strict=True)) for r in rows]
