"""Ledger commands for operators: look an address up, count, group failures, retry, skip.

They go straight to the database (no supervisor needed), for ``mailroom
deliveries|retry|skip`` and the monitor's ledger screens. Like the rest of
:mod:`mailroom.ledger`, each takes a psycopg connection owned by the caller and
leaves transaction control to it.

Cost on a ledger of millions of rows. ``deliveries`` has no index on anything a
claim or an outcome changes (that keeps those updates HOT: see the migration), so
"every failed row" or "every row of status X" is not an index lookup, and no
index is added for it here. Instead:

- by address: ``accounts.email`` (unique) -> ``tokens.account`` -> the
  ``deliveries`` key: a few index probes, one per spelling of the address as
  typed (:func:`accounts_of`), a bounded scan of ``accounts`` only when none is stored;
- open rows (queued, claimed) are read from ``delivery_queue``, which only holds
  open work;
- finished rows are read over a bounded window of the key: the latest
  :data:`WINDOW_TOKENS` deliveries, or, with ``since``, from the first token
  created at that time on (found by a binary search on the key: token ids grow
  with time), under a :data:`STATEMENT_TIMEOUT_MS` statement timeout. A scan of
  the whole ledger happens only for ``retry``/``unskip`` without any filter,
  which an operator asks for explicitly (``--all`` on the command line).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from mailroom.addresses import spellings
from mailroom.vocabulary import ACTION_NAMES, DELIVERY_STATUSES

__all__ = ["SKIPPED_BY_OPERATOR", "WINDOW_TOKENS", "accounts_of", "attempts", "counts", "deliveries", "failure_groups",
           "feedback", "retry", "skip", "token_by_secret", "unskip"]

#: How many of the latest deliveries the windowed reads (counts of finished rows,
#: failure groups) cover when no ``since`` is given.
WINDOW_TOKENS = 100_000
#: Bound on each windowed read (ms): a dashboard query must never hog the ledger.
STATEMENT_TIMEOUT_MS = 5_000
#: Token ids grow with time, but a long transaction may commit an older
#: ``created_at`` after a newer id: search this much earlier, then filter exactly.
_SINCE_SLACK = dt.timedelta(minutes=10)
#: The last error of a row :func:`skip` skipped: what :func:`unskip` looks for (the
#: collector's own skips carry their reason: token expired, account missing, ...).
SKIPPED_BY_OPERATOR = "skipped by an operator"
_ACTION = "CASE d.priority WHEN 0 THEN 'password_recovery' ELSE 'activation' END"
_ADDRESS = r"""regexp_replace(d.last_error, '[^\s<>(),;:"'']+@[^\s<>(),;:"'']+', '<address>', 'g')"""


def deliveries(conn: psycopg.Connection[Any], queue: str, email: str, limit: int = 100) -> list[dict[str, Any]]:
    """Every delivery of ``email`` on ``queue``, newest first; ``email`` as a person
    typed it (:func:`mailroom.addresses.spellings`).  Each carries its ``feedback``
    (what SES last said that counts most, DESIGN.md 11) and its ``events``: type,
    subtype, event time and diagnostic of each SES event, oldest first."""
    # dict_row: the selected names are the keys of each delivery and event.
    found = conn.cursor(row_factory=dict_row).execute(
        f"""SELECT d.token, {_ACTION} AS action, d.status::text AS status, d.attempts, d.created_at,
                   d.claimed_at, d.next_attempt_at, d.sent_at, d.message_id, d.last_error,
                   d.feedback::text AS feedback
              FROM tokens AS t
              JOIN deliveries AS d ON d.token = t.id AND d.job_type = %(queue)s
             WHERE t.account = ANY (%(accounts)s::bigint[])
             ORDER BY d.created_at DESC, d.token DESC
             LIMIT %(limit)s""",
        {"queue": queue, "accounts": accounts_of(conn, email), "limit": limit}).fetchall()
    by_token: dict[int, list[dict[str, Any]]] = {}
    for d in found:
        d["events"] = by_token.setdefault(d["token"], [])
    if by_token:  # what SES said of each, oldest first (delivery_events_delivery_idx)
        for event in conn.cursor(row_factory=dict_row).execute(
                """SELECT token, type::text AS type, subtype, event_at, diagnostic FROM delivery_events
                    WHERE token = ANY (%(tokens)s::bigint[]) AND job_type = %(queue)s
                    ORDER BY event_at, id""",
                {"tokens": list(by_token), "queue": queue}):
            by_token[event.pop("token")].append(event)
    return found


def feedback(conn: psycopg.Connection[Any], queue: str, tokens: Sequence[int],
             message_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
    """What SES said of a batch's rows (the monitor's batch detail): ``token``,
    ``message_id``, ``recipient``, ``feedback`` and the ``subtype`` / ``diagnostic``
    of the event that set it.  By ``tokens`` (the key) and, for rows the caller knows
    only by MessageId, from ``delivery_events`` by ``message_ids`` (deliveries have no
    index on message_id, see ledger/sql.py).  At most 1000 of each."""
    found = conn.cursor(row_factory=dict_row).execute(
        """SELECT d.token, d.message_id, NULL::text AS recipient, d.feedback::text AS feedback,
                  e.subtype, e.diagnostic
             FROM deliveries AS d
             LEFT JOIN LATERAL (
                 SELECT subtype, diagnostic FROM delivery_events
                  WHERE token = d.token AND job_type = d.job_type AND type = d.feedback
                  ORDER BY event_at DESC, id DESC LIMIT 1) AS e ON true
            WHERE d.job_type = %(queue)s AND d.token = ANY (%(tokens)s::bigint[])""",
        {"queue": queue, "tokens": list(tokens)[:1000]}).fetchall()
    if message_ids:  # the highest event of each (MessageId, recipient), as deliveries.feedback rises
        found += conn.cursor(row_factory=dict_row).execute(
            """SELECT DISTINCT ON (message_id, recipient) token, message_id, recipient,
                      type::text AS feedback, subtype, diagnostic
                 FROM delivery_events WHERE message_id = ANY (%(ids)s::text[])
                ORDER BY message_id, recipient, type DESC, event_at DESC""",
            {"ids": list(message_ids)[:1000]}).fetchall()
    return found


def accounts_of(conn: psycopg.Connection[Any], email: str) -> list[int]:
    """The accounts whose address is ``email`` as a person typed it.

    First the spellings of :func:`mailroom.addresses.spellings`, one probe each of the
    unique index. Only when none is stored, a case-insensitive comparison of every
    account (the address stored with capitals in its domain, or a local part in
    other capitals), under :data:`STATEMENT_TIMEOUT_MS`: a scan of ``accounts``, paid
    only by a lookup that would otherwise find nothing.
    """
    tried = spellings(email)
    found = [int(r[0]) for r in conn.execute("SELECT id FROM accounts WHERE email = ANY (%s::text[])", (tried,))]
    if found:
        return found
    saved = conn.execute("SELECT current_setting('statement_timeout')").fetchone()
    _timeout(conn)
    found = [int(r[0]) for r in conn.execute("SELECT id FROM accounts WHERE lower(email) = ANY (%s::text[])",
                                             ([t.lower() for t in tried],))]
    if saved is not None:  # the caller's own statements (a retry, a skip) keep the caller's
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (saved[0],))
    return found


def token_by_secret(conn: psycopg.Connection[Any], secret: bytes) -> dict[str, Any] | None:
    """The token row whose secret is ``secret`` (unique, indexed) with its account, and
    the database's clock (``now``, epoch seconds, as ``expires_at``); None if none.
    For ``mailroom tokens verify``: the caller shows it without the secret."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT t.id, t.action::text AS action, t.code, t.account, a.email,"
            " a.status::text AS account_status, t.expires_at, t.consumed_at, t.created_at,"
            " EXTRACT(EPOCH FROM now())::bigint AS now"
            " FROM tokens t JOIN accounts a ON a.id = t.account WHERE t.secret = %s", [secret]).fetchone()


def attempts(conn: psycopg.Connection[Any], queue: str, tokens: Sequence[int]) -> dict[int, int]:
    """Attempts so far of each of ``tokens`` on ``queue`` (a batch's rows: at most a
    few hundred, read by primary key)."""
    rows = conn.execute("SELECT token, attempts FROM deliveries WHERE job_type = %s AND token = ANY(%s)",
                        (queue, list(tokens)[:1000])).fetchall()
    return {int(token): int(n) for token, n in rows}


def _timeout(conn: psycopg.Connection[Any]) -> None:
    # set_config(..., is_local) lasts until the end of the caller's transaction
    # (or of this statement in autocommit): never longer than this read.
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(STATEMENT_TIMEOUT_MS),))


def token_floor(conn: psycopg.Connection[Any], queue: str, since: dt.datetime) -> int | None:
    """The first token of ``queue`` created at ``since`` or later (within
    :data:`_SINCE_SLACK`), by a binary search on the key: about 20 index probes for
    a million rows. ``None`` when nothing is that recent."""
    probe = sql.SQL("SELECT token, created_at FROM deliveries WHERE job_type = %s AND token >= %s"
                    " ORDER BY token LIMIT 1")
    edges = conn.execute("SELECT min(token), max(token) FROM deliveries WHERE job_type = %s",
                         (queue,)).fetchone()
    if edges is None or edges[0] is None:
        return None
    low, high = int(edges[0]), int(edges[1])
    target = since - _SINCE_SLACK
    last = conn.execute(probe, (queue, high)).fetchone()
    if last is None or last[1] < target:
        return None
    while low < high:  # invariant: the answer is in [low, high]
        middle = (low + high) // 2
        row = conn.execute(probe, (queue, middle)).fetchone()
        assert row is not None  # high exists, so something is >= middle
        if row[1] < target:
            low = int(row[0]) + 1
        else:
            high = middle if int(row[0]) > middle else int(row[0])
    return low


def _window(conn: psycopg.Connection[Any], queue: str, since: dt.datetime | None) -> int | None:
    if since is not None:
        return token_floor(conn, queue, since)
    row = conn.execute("SELECT max(token) FROM deliveries WHERE job_type = %s", (queue,)).fetchone()
    return None if row is None or row[0] is None else max(0, int(row[0]) - WINDOW_TOKENS + 1)


def counts(conn: psycopg.Connection[Any], queue: str, *, lease_ms: int = 300_000,
           since: dt.datetime | None = None) -> dict[str, Any]:
    """``{"by_status_action": {status: {action: n}}, "oldest_queued_s", "expired_leases",
    "window_from_token"}``.

    ``queued`` and ``claimed`` count every open row (from ``delivery_queue``); the
    finished statuses count the deliveries from ``window_from_token`` on (the latest
    :data:`WINDOW_TOKENS`, or those since ``since``). ``expired_leases``: claims older
    than ``lease_ms`` not yet taken back.
    """
    by: dict[str, dict[str, int]] = {s: dict.fromkeys(ACTION_NAMES, 0) for s in DELIVERY_STATUSES}
    for status, action, n in conn.execute(
            f"""SELECT CASE WHEN q.claimed_at IS NULL THEN 'queued' ELSE 'claimed' END,
                       {_ACTION.replace('d.', 'q.')}, count(*)
                  FROM delivery_queue AS q WHERE q.job_type = %s GROUP BY 1, 2""", (queue,)):
        by[status][action] = int(n)
    floor = _window(conn, queue, since)
    if floor is not None:
        _timeout(conn)
        for status, action, n in conn.execute(
                f"""SELECT d.status::text, {_ACTION}, count(*) FROM deliveries AS d
                     WHERE d.job_type = %s AND d.token >= %s
                       AND d.status NOT IN ('queued', 'claimed')
                     GROUP BY 1, 2""", (queue, floor)):
            by[status][action] = int(n)
    row = conn.execute(
        """SELECT EXTRACT(EPOCH FROM statement_timestamp() - min(d.created_at))::float8,
                  (SELECT count(*) FROM delivery_queue AS q
                    WHERE q.job_type = %(queue)s AND q.claimed_at IS NOT NULL
                      AND q.claimed_at < statement_timestamp() - %(lease)s * interval '1 ms')
             FROM deliveries AS d
            WHERE d.job_type = %(queue)s AND d.token IN (
                  -- the oldest queued row of each priority: two index probes
                  SELECT (SELECT q.token FROM delivery_queue AS q
                           WHERE q.job_type = %(queue)s AND q.claimed_at IS NULL AND q.priority = p
                           ORDER BY q.token LIMIT 1)
                    FROM (VALUES (0::smallint), (1::smallint)) AS v (p))""",
        {"queue": queue, "lease": lease_ms}).fetchone()
    assert row is not None
    oldest = None if row[0] is None else max(0.0, float(row[0]))
    return {"by_status_action": by, "oldest_queued_s": oldest, "expired_leases": int(row[1]),
            "window_from_token": floor}


def failure_groups(conn: psycopg.Connection[Any], queue: str, limit: int = 50, *,
                   since: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Failed rows of the window (see :func:`counts`) grouped by error, most frequent first:
    ``error, count, first_seen, last_seen, sample`` (an address). Addresses inside an
    error text are replaced by ``<address>`` so one cause is one group."""
    floor = _window(conn, queue, since)
    if floor is None:
        return []
    _timeout(conn)
    rows = conn.execute(
        f"""WITH groups AS (
                SELECT {_ADDRESS} AS error, count(*) AS n, min(d.created_at) AS first_seen,
                       max(COALESCE(d.claimed_at, d.created_at)) AS last_seen, max(d.token) AS sample
                  FROM deliveries AS d
                 WHERE d.job_type = %(queue)s AND d.token >= %(floor)s AND d.status = 'failed'
                   AND (%(since)s::timestamptz IS NULL OR d.created_at >= %(since)s)
                 GROUP BY 1 ORDER BY n DESC, 1 LIMIT %(limit)s)
            SELECT g.error, g.n, g.first_seen, g.last_seen, a.email
              FROM groups AS g
              JOIN tokens AS t ON t.id = g.sample
              LEFT JOIN accounts AS a ON a.id = t.account
             ORDER BY g.n DESC, g.error""",
        {"queue": queue, "floor": floor, "since": since, "limit": limit}).fetchall()
    return [{"error": e, "count": int(n), "first_seen": f, "last_seen": la, "sample": s}
            for e, n, f, la, s in rows]


def _filters(conn: psycopg.Connection[Any], queue: str, since: dt.datetime | None, error: str | None,
             email: str | None, tokens: Sequence[int] | None) -> tuple[sql.Composable, dict[str, Any]] | None:
    """The WHERE conditions on ``d`` for the given filters, only those given (so each
    stays an index condition); ``None`` when ``since`` rules out every row."""
    parts: list[sql.Composable] = [sql.SQL("d.job_type = %(queue)s")]
    params: dict[str, Any] = {"queue": queue}
    if tokens is not None:
        parts.append(sql.SQL("d.token = ANY (%(tokens)s::bigint[])"))
        params["tokens"] = list(tokens)
    if email is not None:
        parts.append(sql.SQL("d.token IN (SELECT t.id FROM tokens AS t"
                             " WHERE t.account = ANY (%(accounts)s::bigint[]))"))
        params["accounts"] = accounts_of(conn, email)
    if since is not None:
        floor = token_floor(conn, queue, since)
        if floor is None:
            return None
        parts.append(sql.SQL("d.token >= %(floor)s AND d.created_at >= %(since)s"))
        params.update(floor=floor, since=since)
    if error is not None:
        parts.append(sql.SQL("strpos(d.last_error, %(error)s) > 0"))
        params["error"] = error
    return sql.SQL(" AND ").join(parts), params


def retry(conn: psycopg.Connection[Any], queue: str, *, since: dt.datetime | None = None,
          error: str | None = None, email: str | None = None, tokens: Sequence[int] | None = None,
          dry_run: bool = False, channel: str | None = None) -> int:
    """Put ``failed`` rows matching every filter given back in the queue; how many.

    ``error`` matches as a substring of the last error, ``since`` on the creation
    time. Only ``failed`` rows change: never a sent, emitted or skipped one. Each
    gets ``attempts = 0`` (a full new budget: the old one ran out, which is why it
    failed), is due now and gets its queue row back; the last error stays as the
    record of what happened. ``channel`` (the collectors' LISTEN channel) is
    notified so a waiting collector claims them at once. ``dry_run`` only counts.
    """
    return _requeue(conn, queue, _filters(conn, queue, since, error, email, tokens),
                    sql.SQL("d.status = 'failed'"), sql.SQL("attempts = 0"), dry_run, channel)


def unskip(conn: psycopg.Connection[Any], queue: str, *, since: dt.datetime | None = None,
           email: str | None = None, tokens: Sequence[int] | None = None,
           dry_run: bool = False, channel: str | None = None) -> int:
    """Put rows :func:`skip` took off the queue back in it (filters as for :func:`retry`);
    how many. Only operator skips: a row the collector skipped (token expired, account
    missing) would only be skipped again. Attempts stay as they were; the row is due
    now and its last error (the skip's mark) is cleared."""
    return _requeue(conn, queue, _filters(conn, queue, since, None, email, tokens),
                    sql.SQL("d.status = 'skipped' AND d.last_error = {}").format(sql.Literal(SKIPPED_BY_OPERATOR)),
                    sql.SQL("last_error = NULL"), dry_run, channel)


def _requeue(conn: psycopg.Connection[Any], queue: str, found: tuple[sql.Composable, dict[str, Any]] | None,
             which: sql.Composable, change: sql.Composable, dry_run: bool, channel: str | None) -> int:
    """Rows matching ``found`` (from :func:`_filters`) and ``which`` (on ``d``) back to
    ``queued``, due now, with ``change`` (more SET assignments) and a queue row; how many."""
    if found is None:
        return 0
    where, params = found
    if dry_run:
        query = sql.SQL("SELECT count(*) FROM deliveries AS d WHERE {} AND {}").format(where, which)
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
    # Lock order as everywhere in the ledger: queue rows (a finished row rarely has
    # one left) before deliveries. The UPDATE rechecks the status under its row lock.
    query = sql.SQL("""
        WITH candidates AS MATERIALIZED (
            SELECT d.token FROM deliveries AS d WHERE {where} AND {which}),
        held AS MATERIALIZED (
            SELECT q.token FROM delivery_queue AS q
             WHERE q.job_type = %(queue)s AND q.token = ANY (ARRAY(SELECT token FROM candidates))
             ORDER BY q.token FOR UPDATE),
        changed AS (
            UPDATE deliveries AS d
               SET status = 'queued', {change}, next_attempt_at = statement_timestamp()
             WHERE (SELECT count(*) FROM held) >= 0
               AND d.job_type = %(queue)s
               AND d.token = ANY (ARRAY(SELECT token FROM candidates))
               AND {which}
            RETURNING d.token, d.priority, d.next_attempt_at),
        requeued AS (
            INSERT INTO delivery_queue (job_type, token, priority, next_attempt_at)
            SELECT %(queue)s, token, priority, next_attempt_at FROM changed
            ON CONFLICT (job_type, token) DO UPDATE
               SET priority = EXCLUDED.priority, next_attempt_at = EXCLUDED.next_attempt_at,
                   claimed_at = NULL, queued_by = EXCLUDED.queued_by)
        SELECT count(*) FROM changed""").format(where=where, which=which, change=change)
    row = conn.execute(query, params).fetchone()
    changed = int(row[0]) if row else 0
    if changed and channel:
        conn.execute("SELECT pg_notify(%s, '')", (channel,))
    return changed


def skip(conn: psycopg.Connection[Any], queue: str, *, since: dt.datetime | None = None,
         error: str | None = None, email: str | None = None, tokens: Sequence[int] | None = None,
         dry_run: bool = False) -> int:
    """Mark ``queued`` rows (not claimed) matching every filter given ``skipped`` and take
    them off the queue; how many. Candidates come from ``delivery_queue`` (open work
    only); rows a claimer holds right now are left to it. ``dry_run`` only counts."""
    found = _filters(conn, queue, since, error, email, tokens)
    if found is None:
        return 0
    where, params = found
    open_rows = sql.SQL("""
        SELECT q.ctid AS id, q.token FROM delivery_queue AS q
          JOIN deliveries AS d ON d.token = q.token AND d.job_type = q.job_type
         WHERE q.job_type = %(queue)s AND q.claimed_at IS NULL AND d.status = 'queued' AND {where}
    """).format(where=where)
    if dry_run:
        row = conn.execute(sql.SQL("SELECT count(*) FROM ({}) AS o").format(open_rows), params).fetchone()
        return int(row[0]) if row else 0
    query = sql.SQL("""
        WITH held AS MATERIALIZED ({open_rows} ORDER BY q.token FOR UPDATE OF q SKIP LOCKED),
        changed AS (
            UPDATE deliveries AS d SET status = 'skipped', last_error = %(mark)s
             WHERE d.job_type = %(queue)s AND d.token = ANY (ARRAY(SELECT token FROM held))
               AND d.status = 'queued'
            RETURNING d.token),
        dropped AS (
            DELETE FROM delivery_queue AS q
             WHERE q.ctid = ANY (ARRAY(SELECT id FROM held))
               AND q.token = ANY (ARRAY(SELECT token FROM changed)))
        SELECT count(*) FROM changed""").format(open_rows=open_rows)
    row = conn.execute(query, dict(params, mark=SKIPPED_BY_OPERATOR)).fetchone()
    return int(row[0]) if row else 0
