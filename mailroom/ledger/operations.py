"""The delivery ledger: every operation the workers run against it.

The statements themselves, with the reasons for their shape, are in
:mod:`mailroom.ledger.sql`; this module runs them and holds the policy, and
:mod:`mailroom.ledger.connection` the checks and settings of a connection.

One ``deliveries`` row per (queue, token) moves through these states::

    queued --claim--> claimed --sent----> sent
       ^  \\                  --failed--> failed
       |   \\--claim--> skipped  (no longer eligible: never sent)
       +---- retry / lease expiry / release

or ``queued -> emitted`` in compatibility mode (stdout), where the caller
commits the claim only after the batch line is flushed.

Tables (migration 1).  ``deliveries`` is the record.  ``delivery_queue`` has
one row per delivery still open: queued, or claimed (the row is then its
lease); it is all a claim reads.  That split is what makes claims cheap:
taking a row off the queue is a DELETE, which touches no index, and the
ledger row's change is a HOT update, since ``deliveries`` has no index on
anything a claim or an outcome changes.  The token trigger queues new rows;
this module moves them.  ``deliveries`` stays the truth: a claim only sends a
row whose delivery is still 'queued', and drops queue rows that no longer
match (someone changed the delivery by hand, or its token was deleted).

Locking order: a writer locks a delivery's queue row before the delivery.
Claims and lease expiry skip locked queue rows, outcome writers wait for them
in token order, so no two writers wait for each other in opposite orders.

Claim hint.  A deleted queue row leaves its index entry until VACUUM, so a
claim reading the queue from its start steps over every row claimed since
(about 1 ms per 300,000).  So during a drain, a claim that filled its limit
leaves a hint, a session setting that its own transaction sets (a rollback
undoes it): where it stopped, and the xmax and in-progress xids of its
snapshot.  The next claim on that connection reads the queue from there, plus
the rows queued behind that point by transactions the hinted claim could not
see, found by their ``queued_by`` xid: new recovery tokens, ids committed out
of order, re-queued rows.  What neither finds (a retry that came due, rows
held by a claimer that then rolled back) is still queued: a claim that comes
back short also reads everything before the hint, and a hint is only followed
for ``_HINT_TTL_S`` after the full scan that started it.

jobs.last_seq rises with every claim.  A claim that filled its limit does not
wait for the jobs row while another claimer holds it (claims never wait for
each other during a drain): it owes the raise to its session's next claim.  A
short claim, the end of a drain, waits; so the mark is exact whenever a drain
ends, and may trail by a few batches while collectors share a backlog.

The claim is PREPAREd once per connection and EXECUTEd; ``claim(begin=True)``
sends BEGIN in the same simple query, so a claim costs one round trip.

Every function takes a psycopg 3 (sync) connection owned by the caller and
leaves transaction control to it, except
:func:`~mailroom.ledger.connection.configure_session` and
``claim(begin=True)``.  Times are taken with ``statement_timestamp()`` rather
than ``now()`` so a caller that keeps a transaction open does not work with a
stale clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Sequence
from typing import Any, NamedTuple

import psycopg

from mailroom.ledger import sql as ledger_sql
from mailroom.ledger.connection import count, execute_prepared
from mailroom.vocabulary import Action, DeliveryStatus, Outcome, OutcomeKind, Row

__all__ = [
    "STATUSES", "Claim", "Outcome", "Row", "claim", "mark_emitted", "next_due_in", "queue_stats",
    "record_claims", "record_outcomes", "release", "renew", "requeue_expired", "status",
]

#: Every ``delivery_status``, in lifecycle order.
STATUSES = tuple(status.value for status in DeliveryStatus)

#: The outcome kinds :func:`record_outcomes` takes (``skipped`` is the claim's own).
_RECORDED_KINDS = frozenset({OutcomeKind.SENT, OutcomeKind.EMITTED, OutcomeKind.FAILED,
                             OutcomeKind.RETRY, OutcomeKind.HELD})

#: How long a chain of hinted claims may go on before a claim reads the queue
#: from its start again (seconds): the longest a row the hint cannot see waits
#: during a drain.
_HINT_TTL_S = 1.0

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


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


#: From this limit on, claims read key ranges when their rows are dense.
_RANGES_FROM = 64


def claim(conn: psycopg.Connection[Any], queue: str, limit: int, *, lease_ms: int,
          final_status: str = "claimed", begin: bool = False,
          actions: Collection[int] | None = None) -> Claim:
    """Take up to ``limit`` due rows of ``queue`` off the queue, in one statement.

    Password recovery first, then token order; rows locked by another claimer
    are skipped, not waited for.  Rows no longer eligible become ``skipped``,
    the others ``final_status`` (``claimed``, or ``emitted`` in compatibility
    mode, where the caller commits only once the line is flushed) with
    ``attempts + 1``; ``jobs.last_seq`` rises to the highest token picked.
    ``lease_ms`` is the lease the rows are held under; :func:`requeue_expired`
    enforces it.  Use a connection set up by
    :func:`~mailroom.ledger.connection.configure_session`.

    ``begin=True`` opens a transaction in the same round trip as the claim;
    the caller then commits or rolls back.

    ``actions`` (None: all) claims only rows of those actions: an action whose
    template is held stays queued (design notes, section 12).  No action at
    all claims nothing.
    """
    if final_status not in ("claimed", "emitted"):
        raise ValueError(f"final_status must be 'claimed' or 'emitted', not {final_status!r}")
    if limit < 1 or lease_ms < 1:
        raise ValueError("limit and lease_ms must be >= 1")
    priorities = _priorities(actions)
    if priorities == ():
        return Claim([], 0, 0, None)
    sql = ledger_sql.claim_sql(queue, limit, final_status, _HINT_TTL_S, _RANGES_FROM, priorities)
    head, *rows = execute_prepared(conn, sql, begin)
    if not head[0]:
        return Claim([], 0, 0, None)
    claimed_at = _EPOCH + dt.timedelta(microseconds=head[5])
    return Claim(rows, head[0], head[0] - len(rows), claimed_at)


def _priorities(actions: Collection[int] | None) -> tuple[int, ...] | None:
    """The ledger priorities of ``actions``, sorted; None when that is every action."""
    if actions is None:
        return None
    found = tuple(sorted({Action(a).priority for a in actions}))
    return None if len(found) == len(Action) else found


def requeue_expired(conn: psycopg.Connection[Any], queue: str, lease_ms: int,
                    max_attempts: int) -> int:
    """Put ``claimed`` rows whose lease expired back in the queue.

    A row already claimed ``max_attempts`` times goes to ``failed`` instead,
    so a batch that kills its worker every time cannot loop forever.  Rows
    locked by someone else (an outcome being recorded right now) are left
    alone rather than waited for, which also rules out deadlocking with such a
    writer.  Returns how many rows changed.
    """
    return count(conn, ledger_sql.REQUEUE_EXPIRED,
                  {"queue": queue, "lease_ms": lease_ms, "max": max_attempts})


def renew(conn: psycopg.Connection[Any], queue: str,
          claims: Iterable[tuple[Sequence[int], dt.datetime | None]]) -> int:
    """Extend the lease of every row of ``claims`` still claimed by that claim.

    ``claims`` pairs each in-flight batch's token ids with its
    ``Claim.claimed_at``.  One statement for all of them, however many batches:
    the lease (``delivery_queue.claimed_at``) restarts now, the claim's identity
    (``deliveries.claimed_at``) stays, so outcomes still match; see
    :data:`mailroom.ledger.sql.RENEW`.  Returns how many leases were renewed.
    """
    tokens: list[int] = []
    stamps: list[dt.datetime] = []
    for token_ids, claimed_at in claims:
        if claimed_at is None:
            continue
        tokens.extend(token_ids)
        stamps.extend([claimed_at] * len(token_ids))
    if not tokens:
        return 0
    return count(conn, ledger_sql.RENEW, {"queue": queue, "tokens": tokens, "claimed_at": stamps})


def record_outcomes(conn: psycopg.Connection[Any], queue: str,
                    outcomes: Iterable[tuple[int, Outcome]], *,
                    claimed_at: dt.datetime | None = None,
                    max_attempts: int | None = None, backoff_ms: int = 30_000) -> int:
    """Write what SES said about claimed rows, in one statement for the batch.

    ``outcomes`` pairs each token id with its :class:`Outcome`: ``sent`` stores
    the MessageId, ``emitted`` (debug mode) marks it printed, ``failed`` stores
    the error, ``retry`` queues the row again ``retry_after`` seconds from now
    (``failed`` instead once it has been claimed ``max_attempts`` times); a
    retry without ``retry_after`` waits ``backoff_ms`` doubling with the row's
    ledger attempts, capped at 120 times ``backoff_ms``.  Pass the batch's
    ``Claim.claimed_at`` so that failures and retries only change that claim
    (see the comment on ``ledger_sql.RECORD`` for what a stale outcome may change).
    Returns how many rows changed; stale or duplicate outcomes change nothing.
    """
    return record_claims(conn, queue, [(outcomes, claimed_at)], max_attempts=max_attempts,
                         backoff_ms=backoff_ms)


def record_claims(conn: psycopg.Connection[Any], queue: str,
                  claims: Iterable[tuple[Iterable[tuple[int, Outcome]], dt.datetime | None]], *,
                  max_attempts: int | None = None, backoff_ms: int = 30_000,
                  latencies: list[tuple[Action, float]] | None = None) -> int:
    """:func:`record_outcomes` for several claims at once: ``claims`` pairs each
    claim's outcomes with its ``Claim.claimed_at``.  ``latencies``, when given,
    gets ``(action, seconds from the delivery's creation)`` of each row recorded
    ``sent`` (``mailroom_delivery_latency_seconds``, fed by the supervisor).

    Written as if each claim's outcomes were recorded in turn, in the order
    given, but in as few statements as that allows (one, unless a token comes
    twice): a statement's cost is mostly its own, not its rows', so a collector
    catching up on outcomes writes them together.  Returns how many rows changed.
    """
    params = _RecordParams(latencies)
    changed = 0
    for outcomes, claimed_at in claims:
        for token, outcome in outcomes:
            if outcome.kind not in _RECORDED_KINDS:
                raise ValueError(f"unknown outcome kind {outcome.kind!r}")
            if token in params.seen:
                # UPDATE ... FROM applies one of two rows joining the same delivery,
                # not both in turn: a token's second outcome (a re-claim of the
                # same row) goes in the next statement, after the first.
                changed += params.run(conn, queue, max_attempts, backoff_ms)
            params.add(token, outcome, claimed_at)
    return changed + params.run(conn, queue, max_attempts, backoff_ms)


#: Outcome statements of this many rows or more get a plan of their own.
_PLANNED_FROM = 32


class _RecordParams:
    """The arrays of one ``ledger_sql.RECORD`` statement, filled row by row."""

    def __init__(self, latencies: list[tuple[Action, float]] | None = None) -> None:
        self.latencies = latencies
        self.clear()

    def clear(self) -> None:
        self.seen: set[int] = set()
        self.tokens: list[int] = []
        self.kinds: list[str] = []
        self.message_ids: list[str | None] = []
        self.errors: list[str | None] = []
        self.retry_after: list[float | None] = []
        self.claimed_at: list[dt.datetime | None] = []

    def add(self, token: int, outcome: Outcome, claimed_at: dt.datetime | None) -> None:
        self.seen.add(token)
        self.tokens.append(token)
        self.kinds.append(str(outcome.kind))  # the plain value, whatever psycopg does with enums
        self.message_ids.append(outcome.message_id)
        self.errors.append(outcome.error)
        self.retry_after.append(outcome.retry_after)
        self.claimed_at.append(claimed_at)

    def run(self, conn: psycopg.Connection[Any], queue: str, max_attempts: int | None,
            backoff_ms: int) -> int:
        """Execute the statement for the rows added so far (if any) and start over."""
        if not self.tokens:
            return 0
        row = conn.execute(ledger_sql.RECORD, dict(
            queue=queue, tokens=self.tokens, kinds=self.kinds, message_ids=self.message_ids,
            errors=self.errors, retry_after=self.retry_after, claimed_at=self.claimed_at,
            backoff_ms=backoff_ms, max=max_attempts if max_attempts is not None else 2**31 - 1),
            # From _PLANNED_FROM rows on, planned each time, never cached: a
            # generic plan cannot see the arrays' length, guesses 10 outcomes and
            # one delivery, and joins them by a nested loop that compares every
            # outcome with every row (30 ms instead of 5 for 200 rows); the plan
            # made for the actual arrays hashes them.  Below, making that plan
            # costs more than the loop (1.7 ms instead of 1.25 for one row).
            prepare=None if len(self.tokens) < _PLANNED_FROM else False).fetchone()
        self.clear()
        if row is None:
            return 0
        changed, priorities, seconds = row
        if self.latencies is not None:
            # Priority 0 is password recovery, 1 activation (the deliveries table).
            self.latencies.extend((Action.RECOVERY if priority == 0 else Action.ACTIVATION, float(s))
                                  for priority, s in zip(priorities, seconds, strict=True))
        return int(changed)


def release(conn: psycopg.Connection[Any], queue: str, token_ids: Sequence[int], *,
            claimed_at: dt.datetime | None = None) -> int:
    """Return claimed rows never handed to SES (clean shutdown) to the queue,
    giving the claim's attempt back since nothing was tried; how many changed."""
    return _move_claimed(conn, ledger_sql.RELEASE, queue, token_ids, claimed_at)


def mark_emitted(conn: psycopg.Connection[Any], queue: str, token_ids: Sequence[int], *,
                 claimed_at: dt.datetime | None = None) -> int:
    """Mark claimed rows ``emitted``: their batch line was flushed to stdout."""
    return _move_claimed(conn, ledger_sql.MARK_EMITTED, queue, token_ids, claimed_at)


def _move_claimed(conn: psycopg.Connection[Any], sql: str, queue: str, token_ids: Sequence[int],
                  claimed_at: dt.datetime | None) -> int:
    """Change rows of one claim that are still ``claimed`` (``sql``: a
    :func:`~mailroom.ledger.sql.move_claimed_sql` statement); how many changed."""
    if not token_ids:
        return 0
    return count(conn, sql, {"queue": queue, "tokens": list(token_ids), "claimed_at": claimed_at})


def next_due_in(conn: psycopg.Connection[Any], queue: str, lease_ms: int,
                actions: Collection[int] | None = None) -> float | None:
    """Seconds until something of ``queue`` needs the collector, ``None`` if nothing will.

    0 when a queued row is due now; else the earlier of the next retry's
    ``next_attempt_at`` and the oldest claim's lease expiry.  The "due now"
    probe stops at the first due row of the queued index and the lease side is
    one probe of the claimed index; only when nothing is due does it read the
    queued rows, which are then just those waiting for a retry.  ``actions``
    as for :func:`claim`: rows of other actions (held) are not due.
    """
    priorities = _priorities(actions)
    # Rows of a held action wait without a time: they must not make the queue look due.
    sql = ledger_sql.NEXT_DUE_IN if priorities is None else ledger_sql.NEXT_DUE_IN_ACTIONS
    row = conn.execute(sql, {"queue": queue, "lease_ms": lease_ms,
                             "priorities": list(priorities or ())}).fetchone()
    return None if row is None or row[0] is None else max(0.0, row[0])


#: ``queue_stats`` counts queued rows up to this many (a cheap bound, not a census).
QUEUE_DEPTH_CAP = 100_000


def queue_stats(conn: psycopg.Connection[Any], queue: str) -> dict[str, Any]:
    """``{"queue_depth", "oldest_queued_s"}``: cheap enough for a heartbeat.

    The depth counts queued rows up to :data:`QUEUE_DEPTH_CAP`, through the queued
    index.  The oldest queued row is the lowest token of either priority (ids only
    grow), found by two index probes; its age is that of its delivery.
    """
    row = conn.execute(ledger_sql.QUEUE_STATS, {"queue": queue, "cap": QUEUE_DEPTH_CAP}).fetchone()
    depth, age = (row if row is not None else (0, None))
    return {"queue_depth": int(depth or 0), "oldest_queued_s": None if age is None else max(0.0, float(age))}


def status(conn: psycopg.Connection[Any], queue: str) -> dict[str, Any]:
    """Counts of ``queue``'s rows per status (all six keys, zeros included),
    plus ``oldest_queued_s`` (age of the oldest queued row, ``None`` if none)
    and ``last_seq`` (``jobs.last_seq``).

    One pass over the whole ledger: meant for a dashboard, not a hot loop.
    """
    result: dict[str, Any] = dict.fromkeys(STATUSES, 0)
    result["oldest_queued_s"] = None
    for name, rows, age in conn.execute(ledger_sql.STATUS_COUNTS, {"queue": queue}):
        result[name] = int(rows)
        if name == "queued":
            result["oldest_queued_s"] = max(0.0, age)
    row = conn.execute(ledger_sql.LAST_SEQ, {"queue": queue}).fetchone()
    result["last_seq"] = None if row is None else row[0]
    return result
