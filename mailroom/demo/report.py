"""What the demo shows without the monitor: ledger counts once a second, a summary at the end.

Counts cover the tokens created since the demo started (a kept database, ``--data``, holds
earlier runs too), read from the ledger (``deliveries``, migration 1).  Latency is from the
token's creation (``deliveries.created_at``, set by the insert trigger in the same transaction)
to the ledger's ``sent_at`` (recorded once SES accepted the email).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from mailroom.config import Settings

__all__ = ["Counts", "Summary", "counts", "first_token_id", "summary"]

# The demo runs the supervisor with the default queue.
_QUEUE = Settings.queue_name

_COUNTS = """
SELECT count(*),
       count(*) FILTER (WHERE d.status = 'sent'),
       count(*) FILTER (WHERE d.status = 'failed'),
       count(*) FILTER (WHERE d.status = 'skipped'),
       count(*) FILTER (WHERE d.status IN ('queued', 'claimed')),
       count(*) FILTER (WHERE d.feedback = 'delivered'),
       count(*) FILTER (WHERE d.feedback = 'bounced'),
       count(*) FILTER (WHERE d.feedback = 'complained'),
       count(*) FILTER (WHERE d.status = 'skipped' AND d.last_error LIKE 'suppressed:%%'),
       (SELECT count(*) FROM suppressions),
       -- Sent to an address claimed after it was suppressed: the loop says this stays 0.
       -- "After" is after the suppression committed: a claim that began while the
       -- events statement was still running could not see it (READ COMMITTED), and
       -- created_at is that statement's start.  The embedded server tracks commit
       -- times; a kept data directory from before it did falls back to created_at.
       (SELECT count(*) FROM deliveries AS s_d
          JOIN tokens AS s_t ON s_t.id = s_d.token
          JOIN accounts AS s_a ON s_a.id = s_t.account
          JOIN suppressions AS s ON s.address = s_a.email
         WHERE s_d.job_type = %(queue)s AND s_d.token > %(after)s AND s_d.status = 'sent'
           AND s_d.claimed_at > COALESCE(
                   CASE WHEN current_setting('track_commit_timestamp') = 'on'
                        THEN pg_xact_commit_timestamp(s.xmin) END,
                   s.created_at))
  FROM tokens AS t
  LEFT JOIN deliveries AS d ON d.token = t.id AND d.job_type = %(queue)s
 WHERE t.id > %(after)s
"""

_LATENCY = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)),
       extract(epoch FROM min(sent_at))
  FROM deliveries
 WHERE job_type = %(queue)s AND token > %(after)s AND status = 'sent'
"""


@dataclass(frozen=True)
class Counts:
    """Ledger counts of the tokens created during this run."""

    created: int
    sent: int
    failed: int
    skipped: int
    queued: int  # queued or claimed: not settled yet
    # What SES said became of them (its events, through SNS and SQS, DESIGN.md 11).
    delivered: int = 0
    bounced: int = 0
    complained: int = 0
    skipped_suppressed: int = 0   # claimed while the address was suppressed: never sent
    suppressed: int = 0           # addresses on the suppression list
    sent_after_suppression: int = 0

    def line(self) -> str:
        """The one-line status of the headless demo."""
        return (f"created {self.created:6d}  sent {self.sent:6d}  failed {self.failed:4d}  "
                f"skipped {self.skipped:4d}  queued {self.queued:4d}  delivered {self.delivered:6d}  "
                f"bounced {self.bounced:4d}  complained {self.complained:3d}  suppressed {self.suppressed:4d}")


@dataclass(frozen=True)
class Summary:
    """The end-of-run numbers."""

    counts: Counts
    p50_ms: float | None
    p99_ms: float | None
    first_sent_epoch: float | None  # wall-clock time of the first email SES accepted


def _row(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any] | None = None) -> tuple[Any, ...]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None  # aggregates without GROUP BY always give one row
    return tuple(row)


def first_token_id(conn: psycopg.Connection[Any]) -> int:
    """The highest token id now: the run counts tokens above it."""
    return int(_row(conn, "SELECT coalesce(max(id), 0) FROM tokens")[0])


def counts(conn: psycopg.Connection[Any], after: int) -> Counts:
    """Counts of the tokens with an id above ``after``."""
    return Counts(*(int(n) for n in _row(conn, _COUNTS, {"queue": _QUEUE, "after": after})))


def summary(conn: psycopg.Connection[Any], after: int) -> Summary:
    """Counts plus delivery latency percentiles of the tokens with an id above ``after``."""
    p50, p99, first = _row(conn, _LATENCY, {"queue": _QUEUE, "after": after})
    return Summary(
        counts(conn, after),
        None if p50 is None else float(p50) * 1000,
        None if p99 is None else float(p99) * 1000,
        None if first is None else float(first),
    )
