"""The delivery ledger: every SQL statement the collector runs against it.

One ``deliveries`` row per (queue, token) moves through these states::

    queued --claim--> claimed --sent----> sent
       ^  \\                  --failed--> failed
       |   \\--claim--> skipped  (no longer eligible: never sent)
       +---- retry / lease expiry / release

or ``queued -> emitted`` in compatibility mode (stdout), where the caller
commits the claim only after the batch line is flushed.

Every function takes a psycopg 3 (sync) connection owned by the caller and
leaves transaction control to it, except :func:`configure_session`.  Times are
taken with ``statement_timestamp()`` rather than ``now()`` so a caller that keeps
a transaction open does not work with a stale clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import pq

__all__ = [
    "REQUIRED_VERSION", "STATUSES", "Claim", "Outcome", "Row", "SchemaError",
    "check_schema", "claim", "configure_session", "mark_emitted", "next_due_in",
    "record_outcomes", "release", "requeue_expired", "status",
]

#: The schema version (``schema_migrations``) this module's SQL needs.
REQUIRED_VERSION = 1

#: Every ``delivery_status``, in lifecycle order.
STATUSES = ("queued", "claimed", "sent", "emitted", "failed", "skipped")

#: A claimed row: ``(action 1|2, email, login, secret, code, token_id)``.
Row = tuple[int, str, str, bytes, str, int]

#: ``(token_id, kind, message_id, error, retry_after_s)``, kind in sent/failed/retry.
Outcome = tuple[int, str, str | None, str | None, float | None]

_OUTCOME_KINDS = frozenset({"sent", "failed", "retry"})


class SchemaError(Exception):
    """The database schema is missing, too old or dirty for this mailroom."""


class Claim(NamedTuple):
    """The result of :func:`claim`.

    ``rows`` are the eligible deliveries in (priority, token) order.  ``picked``
    counts every row taken off the queue (claimed + skipped): keep claiming
    while ``picked == limit``, since skipped rows say nothing about what is
    left.  ``claimed_at`` identifies this claim; give it back to
    :func:`record_outcomes` so a late outcome cannot touch a later claim.
    """

    rows: list[Row]
    picked: int
    skipped: int
    claimed_at: dt.datetime | None = None


# One statement, so a claim is atomic and costs one round trip.  Every step is
# an index probe per picked row, whatever the statistics say (they lag behind
# bursts): the lookups are LATERAL ... OFFSET 0 so the planner cannot turn them
# into merge joins that walk tokens from id 1, and the UPDATE finds its rows by
# `token = ANY(array)` rather than by a join it could plan as a scan.
# Eligibility is the original collector's rule (SCHEMA.md, last section); the
# reason a row is not sent ends up in its last_error.  A row whose token or
# account is gone is skipped too, rather than picked again forever.
_CLAIM = """
WITH picked AS MATERIALIZED (
    SELECT d.token, d.priority
      FROM deliveries AS d
     WHERE d.job_type = %(queue)s
       AND d.status = 'queued'
       AND d.next_attempt_at <= statement_timestamp()
     ORDER BY d.priority, d.token
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
),
checked AS MATERIALIZED (
    SELECT p.token, p.priority, x.action, x.secret, x.code, x.email, x.login,
           CASE
               WHEN x.action IS NULL THEN 'token deleted'
               WHEN x.account_status IS NULL THEN 'account missing'
               WHEN x.consumed_at IS NOT NULL THEN 'token consumed'
               WHEN x.expires_at <= EXTRACT(EPOCH FROM statement_timestamp())
                   THEN 'token expired'
               WHEN x.action = 'activation' AND x.account_status <> 'provisioned'
                   THEN format('account is %%s, activation needs provisioned', x.account_status)
               WHEN x.action = 'password_recovery' AND x.account_status <> 'active'
                   THEN format('account is %%s, password recovery needs active',
                               x.account_status)
           END AS reason
      FROM picked AS p
      LEFT JOIN LATERAL (
           SELECT t.action, t.secret, t.code, t.consumed_at, t.expires_at,
                  a.email, a.login, a.status AS account_status
             FROM tokens AS t
             LEFT JOIN accounts AS a ON a.id = t.account
            WHERE t.id = p.token
           OFFSET 0) AS x ON true
),
verdict AS MATERIALIZED (
    SELECT array_agg(token) AS tokens,
           jsonb_object_agg(token, reason) FILTER (WHERE reason IS NOT NULL) AS reasons
      FROM checked
),
marked AS (
    UPDATE deliveries AS d
       SET status = CASE WHEN v.reasons ? d.token::text
                         THEN 'skipped'::delivery_status
                         ELSE %(final)s::delivery_status END,
           attempts = d.attempts + CASE WHEN v.reasons ? d.token::text THEN 0 ELSE 1 END,
           claimed_at = CASE WHEN v.reasons ? d.token::text
                             THEN d.claimed_at ELSE statement_timestamp() END,
           last_error = COALESCE(v.reasons ->> d.token::text, d.last_error)
      FROM verdict AS v
     WHERE d.job_type = %(queue)s
       AND d.token = ANY(v.tokens)
    RETURNING d.token
),
high_water AS (
    -- The WHERE keeps claimers from queueing on the jobs row lock when
    -- another one already raised last_seq past them.
    UPDATE jobs
       SET last_seq = GREATEST(jobs.last_seq, top.token)
      FROM (SELECT max(token) AS token FROM picked) AS top
     WHERE jobs.job_type = %(queue)s
       AND (jobs.last_seq IS NULL OR jobs.last_seq < top.token)
)
SELECT c.reason IS NULL,
       CASE c.action WHEN 'activation' THEN 1 ELSE 2 END,
       c.email, c.login, c.secret,
       COALESCE(c.code, ''),  -- the original printed a NULL code as ''
       c.token,
       statement_timestamp(),
       (SELECT count(*) FROM marked)
  FROM checked AS c
 ORDER BY c.priority, c.token
"""


def claim(conn: psycopg.Connection[Any], queue: str, limit: int, *, lease_ms: int,
          final_status: str = "claimed") -> Claim:
    """Take up to ``limit`` due rows of ``queue`` off the queue, in one statement.

    Password recovery first, then token order; rows locked by another claimer
    are skipped, not waited for.  Rows no longer eligible become ``skipped``,
    the others ``final_status`` (``claimed``, or ``emitted`` in compatibility
    mode, where the caller commits only once the line is flushed) with
    ``attempts + 1``; ``jobs.last_seq`` rises to the highest token picked.
    ``lease_ms`` is the lease the rows are held under; :func:`requeue_expired`
    enforces it.  Use a connection set up by :func:`configure_session`.
    """
    if final_status not in ("claimed", "emitted"):
        raise ValueError(f"final_status must be 'claimed' or 'emitted', not {final_status!r}")
    if limit < 1 or lease_ms < 1:
        raise ValueError("limit and lease_ms must be >= 1")
    params = {"queue": queue, "limit": limit, "final": final_status}
    result = conn.execute(_CLAIM, params).fetchall()
    if result and result[0][8] != len(result):
        # Cannot happen while rows stay locked from pick to update; if it did,
        # sending could duplicate: refuse (claimed rows return after the lease).
        raise RuntimeError(f"claim updated {result[0][8]} of {len(result)} picked rows")
    rows: list[Row] = [tuple(r[1:7]) for r in result if r[0]]  # type: ignore[misc]
    claimed_at = result[0][7] if result else None
    return Claim(rows, len(result), len(result) - len(rows), claimed_at)


def requeue_expired(conn: psycopg.Connection[Any], queue: str, lease_ms: int,
                    max_attempts: int) -> int:
    """Put ``claimed`` rows whose lease expired back in the queue.

    A row already claimed ``max_attempts`` times goes to ``failed`` instead,
    so a batch that kills its worker every time cannot loop forever.  Rows
    locked by someone else (an outcome being recorded right now) are left
    alone rather than waited for, which also rules out deadlocking with such a
    writer.  Returns how many rows changed.
    """
    cur = conn.execute(
        """
        UPDATE deliveries AS d
           SET status = CASE WHEN d.attempts >= %(max)s
                             THEN 'failed'::delivery_status
                             ELSE 'queued'::delivery_status END,
               next_attempt_at = statement_timestamp(),
               last_error = CASE WHEN d.attempts >= %(max)s
                                 THEN format('lease expired, giving up after %%s attempts',
                                             d.attempts)
                                 ELSE format('lease expired (attempt %%s)', d.attempts) END
          FROM (SELECT token FROM deliveries
                 WHERE job_type = %(queue)s
                   AND status = 'claimed'
                   AND claimed_at < statement_timestamp() - %(lease_ms)s * interval '1 ms'
                   FOR UPDATE SKIP LOCKED) AS expired
         WHERE d.job_type = %(queue)s
           AND d.token = expired.token
           AND d.status = 'claimed'
        """,
        {"queue": queue, "lease_ms": lease_ms, "max": max_attempts},
    )
    return cur.rowcount


# Which rows an outcome may change.
#  * failed / retry: only the claim the outcome belongs to (status 'claimed'
#    and, when the caller passes it, the same claimed_at).  After a lease
#    expiry the row may have been re-queued and claimed by another worker; a
#    stale failure written over that claim would turn the other worker's
#    success into a loss (its 'sent' would then find the row not claimed).
#  * sent: SES accepted the email, which is a fact whatever happened since, so
#    it also lands on a row that was re-queued, re-claimed or failed by lease
#    expiry meanwhile: recording it prevents (or at least ends) a duplicate
#    send.  Only rows already final (sent, emitted, skipped) are left alone.
_RECORD = """
UPDATE deliveries AS d
   SET status = CASE WHEN o.kind = 'sent' THEN 'sent'
                     WHEN o.kind = 'retry' AND d.attempts < %(max)s THEN 'queued'
                     ELSE 'failed' END::delivery_status,
       sent_at = CASE WHEN o.kind = 'sent' THEN statement_timestamp() ELSE d.sent_at END,
       message_id = CASE WHEN o.kind = 'sent' THEN o.message_id ELSE d.message_id END,
       last_error = CASE WHEN o.kind = 'sent' THEN d.last_error
                         WHEN o.kind = 'retry' AND d.attempts >= %(max)s
                         THEN format('giving up after %%s attempts: %%s', d.attempts, o.error)
                         ELSE o.error END,
       next_attempt_at = CASE WHEN o.kind <> 'retry' THEN d.next_attempt_at
                              ELSE statement_timestamp()
                                   + COALESCE(o.retry_after, 0) * interval '1 second' END
  FROM unnest(%(tokens)s::bigint[], %(kinds)s::text[], %(message_ids)s::text[],
              %(errors)s::text[], %(retry_after)s::float8[])
       AS o (token, kind, message_id, error, retry_after)
 WHERE d.job_type = %(queue)s
   -- Redundant with the join, on purpose: as an index condition it fetches just
   -- these rows whatever the statistics say.  With stale statistics (a burst of
   -- tokens since the last ANALYZE) the planner otherwise walks every row of
   -- the queue and joins it against the array: ~300 ms at 20k rows, growing.
   -- ARRAY(SELECT ...) hides the array's length from the planner, which then
   -- keeps it as an index condition instead of a filter over the whole queue.
   AND d.token = ANY(ARRAY(SELECT unnest(%(tokens)s::bigint[])))
   AND d.token = o.token
   AND (    (d.status = 'claimed'
             AND (%(claimed_at)s::timestamptz IS NULL OR d.claimed_at = %(claimed_at)s))
         OR (o.kind = 'sent' AND d.status IN ('claimed', 'queued', 'failed')))
"""


def record_outcomes(conn: psycopg.Connection[Any], queue: str, outcomes: Iterable[Outcome], *,
                    claimed_at: dt.datetime | None = None,
                    max_attempts: int | None = None) -> int:
    """Write what SES said about claimed rows, in one statement for the batch.

    Each outcome is ``(token_id, kind, message_id, error, retry_after_s)``:
    ``sent`` stores the MessageId, ``failed`` the error, ``retry`` queues the
    row again ``retry_after_s`` seconds from now (``failed`` instead once it
    has been claimed ``max_attempts`` times).  Pass the batch's
    ``Claim.claimed_at`` so that failures and retries only change that claim
    (see the comment on ``_RECORD`` for what a stale outcome may change).
    Returns how many rows changed; stale or duplicate outcomes change nothing.
    """
    batch = [tuple(o) for o in outcomes]
    for outcome in batch:
        if outcome[1] not in _OUTCOME_KINDS:
            raise ValueError(f"unknown outcome kind {outcome[1]!r}")
    if not batch:
        return 0
    tokens, kinds, message_ids, errors, retry_after = (list(col) for col in zip(*batch))
    params = dict(queue=queue, tokens=tokens, kinds=kinds, message_ids=message_ids,
                  errors=errors, retry_after=retry_after, claimed_at=claimed_at,
                  max=max_attempts if max_attempts is not None else 2**31 - 1)
    return conn.execute(_RECORD, params).rowcount


def _move_claimed(conn: psycopg.Connection[Any], queue: str, token_ids: Sequence[int],
                  claimed_at: dt.datetime | None, assignments: str) -> int:
    """Change rows of one claim that are still ``claimed``; how many changed."""
    if not token_ids:
        return 0
    sql = f"""
        UPDATE deliveries SET {assignments}
         WHERE job_type = %(queue)s
           -- Hidden from the planner as in _RECORD, so it stays an index condition.
           AND token = ANY(ARRAY(SELECT unnest(%(tokens)s::bigint[])))
           AND status = 'claimed'
           AND (%(claimed_at)s::timestamptz IS NULL OR claimed_at = %(claimed_at)s)
        """
    params = {"queue": queue, "tokens": list(token_ids), "claimed_at": claimed_at}
    return conn.execute(sql, params).rowcount


def release(conn: psycopg.Connection[Any], queue: str, token_ids: Sequence[int], *,
            claimed_at: dt.datetime | None = None) -> int:
    """Return claimed rows never handed to SES (clean shutdown) to the queue,
    giving the claim's attempt back since nothing was tried; how many changed."""
    assignments = "status = 'queued', attempts = GREATEST(attempts - 1, 0)"
    return _move_claimed(conn, queue, token_ids, claimed_at, assignments)


def mark_emitted(conn: psycopg.Connection[Any], queue: str, token_ids: Sequence[int], *,
                 claimed_at: dt.datetime | None = None) -> int:
    """Mark claimed rows ``emitted``: their batch line was flushed to stdout."""
    return _move_claimed(conn, queue, token_ids, claimed_at, "status = 'emitted'")


def next_due_in(conn: psycopg.Connection[Any], queue: str, lease_ms: int) -> float | None:
    """Seconds until something of ``queue`` needs the collector, ``None`` if nothing will.

    0 when a queued row is due now; else the earlier of the next retry's
    ``next_attempt_at`` and the oldest claim's lease expiry.  The "due now"
    probe stops at the first due row of the queued index and the lease side is
    one probe of the claimed index; only when nothing is due does it read the
    queued rows, which are then just those waiting for a retry.
    """
    row = conn.execute(
        """
        SELECT CASE
                   -- Not EXISTS: its planner may seq-scan for a "common" row;
                   -- ORDER BY + LIMIT walks the queued index from its start.
                   WHEN (SELECT true FROM deliveries
                          WHERE job_type = %(queue)s AND status = 'queued'
                            AND next_attempt_at <= statement_timestamp()
                          ORDER BY priority, token LIMIT 1)
                   THEN 0
                   ELSE EXTRACT(EPOCH FROM LEAST(
                            (SELECT min(next_attempt_at) FROM deliveries
                              WHERE job_type = %(queue)s AND status = 'queued'),
                            (SELECT min(claimed_at) FROM deliveries
                              WHERE job_type = %(queue)s AND status = 'claimed')
                            + %(lease_ms)s * interval '1 millisecond'
                        ) - statement_timestamp())
               END::float8
        """,
        {"queue": queue, "lease_ms": lease_ms},
    ).fetchone()
    return None if row is None or row[0] is None else max(0.0, row[0])


def status(conn: psycopg.Connection[Any], queue: str) -> dict[str, Any]:
    """Counts of ``queue``'s rows per status (all six keys, zeros included),
    plus ``oldest_queued_s`` (age of the oldest queued row, ``None`` if none)
    and ``last_seq`` (``jobs.last_seq``).

    Counting reads the whole queue: meant for a dashboard, not a hot loop.
    """
    result: dict[str, Any] = dict.fromkeys(STATUSES, 0)
    counts = conn.execute(
        "SELECT status::text, count(*) FROM deliveries WHERE job_type = %s GROUP BY status",
        (queue,),
    )
    result.update({name: int(count) for name, count in counts})
    row = conn.execute(
        """
        SELECT (SELECT EXTRACT(EPOCH FROM statement_timestamp() - min(created_at))::float8
                  FROM deliveries WHERE job_type = %(queue)s AND status = 'queued'),
               (SELECT last_seq FROM jobs WHERE job_type = %(queue)s)
        """,
        {"queue": queue},
    ).fetchone()
    assert row is not None
    result["oldest_queued_s"] = None if row[0] is None else max(0.0, row[0])
    result["last_seq"] = row[1]
    return result


def check_schema(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`SchemaError` unless the database is migrated for this code:
    ``schema_migrations`` at :data:`REQUIRED_VERSION` or later, clean, and a
    ``deliveries`` table."""
    found = conn.execute(
        "SELECT to_regclass('schema_migrations') IS NOT NULL, to_regclass('deliveries') IS NOT NULL"
    ).fetchone()
    assert found is not None
    row = None
    if found[0]:
        row = conn.execute("SELECT version, dirty FROM schema_migrations LIMIT 1").fetchone()
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


def configure_session(conn: psycopg.Connection[Any]) -> None:
    """Per-connection settings for the collector's connection; call once after connecting.

    * ``synchronous_commit = off``: a commit returns before its WAL is flushed,
      so a PostgreSQL crash (not a mailroom crash) can forget the last few
      hundred ms of ledger updates.  Every such loss leaves a row *less*
      advanced than what happened (queued instead of claimed, claimed instead
      of sent), which ends in a resend, never in a lost email; the database
      stays consistent.  The application's own token inserts are not affected.
    * ``enable_bitmapscan = off``: when the statistics predate a burst of
      tokens, the planner may think the queue is tiny and read the whole
      backlog through a bitmap scan to sort it, per claim.  The ordered scan of
      the partial index costs ``limit`` rows whatever the statistics say, and
      every ledger statement here is built for plain index scans.
    * ``jit = off``: compiling these short statements costs more than running them.

    A SET is undone if its transaction rolls back: on a connection that is not
    in autocommit mode and was idle, the transaction is committed here.
    """
    idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
    conn.execute("SET synchronous_commit = off")
    conn.execute("SET enable_bitmapscan = off")
    conn.execute("SET jit = off")
    if not conn.autocommit and idle:
        conn.commit()
