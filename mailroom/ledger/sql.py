"""The delivery ledger's SQL text; :mod:`mailroom.ledger.operations` runs it.

Kept apart from the code that runs it because the statements are long and
every clause is there for a reason that a comment beside it gives: the claim
(one statement, with its variants for small and large limits and for
compatibility mode) and the statements that record what became of claimed
rows.  Read the docstring of :mod:`mailroom.ledger.operations` first: it explains
the two tables, the locking order and the claim hint these statements implement.
"""

# Longer than the house's ~400 lines on purpose: it is SQL text, each clause with
# the reason it is there; splitting the statements would separate them from the
# shared fragments they are built of.

from __future__ import annotations

import functools
import hashlib

__all__ = [
    "CHECK_QUEUE", "HEALTH", "LAST_SEQ", "MARK_EMITTED", "NEXT_DUE_IN", "NEXT_DUE_IN_ACTIONS", "QUEUE_STATS", "RECORD",
    "RELEASE", "RENEW", "RECORD_EVENTS", "REMATCH_EVENTS", "REQUEUE_EXPIRED", "SCHEMA_TABLES", "SCHEMA_VERSION",
    "SESSION_SETTINGS", "STATUS_COUNTS",
    "claim_sql", "move_claimed_sql",
]

# The claim, one statement: atomic, one round trip.  Each step is bounded by
# the rows picked whatever the statistics say (they lag behind bursts, and the
# cached plan never sees the hint's values): rows are found by LATERAL probes,
# ctid, `= ANY(array)`, or a key range at most a few times as wide as the rows,
# never by a join the planner could turn into a scan.  Eligibility is the
# original collector's rule (token not expired, not consumed, and its account's
# status fits the action); the reason a row is not sent goes to last_error.
# claim_sql fills in the variants below ({lookups}, {mark}, {dequeue}), then
# {queue}, {limit} and the rest.
_CLAIM = """
WITH hint AS MATERIALIZED (
    SELECT fresh,
           CASE WHEN fresh THEN h[1]::smallint ELSE -1 END AS priority,
           CASE WHEN fresh THEN h[2]::bigint ELSE 0 END AS token,
           CASE WHEN fresh THEN h[3]::xid8 END AS xmax,
           CASE WHEN fresh THEN string_to_array(h[4], ',')::xid8[] END AS xip,
           CASE WHEN fresh THEN h[5]::float8 ELSE EXTRACT(EPOCH FROM statement_timestamp())
           END AS since,
           -- expires_at is whole seconds: against the floor, the same test as
           -- against the exact time, without a numeric per row.
           floor(EXTRACT(EPOCH FROM statement_timestamp()))::bigint AS now_s,
           COALESCE(h[6]::bigint, 0) AS owed  -- see high_water
      FROM (SELECT h, COALESCE(EXTRACT(EPOCH FROM statement_timestamp()) - h[5]::float8
                               BETWEEN 0 AND {ttl}, false) AS fresh
              FROM string_to_array(current_setting('{guc}', true), ' ') AS h) AS s
),
ahead AS MATERIALIZED (
    SELECT q.ctid AS id, q.priority, q.token
      FROM delivery_queue AS q
     WHERE q.job_type = {queue} AND q.claimed_at IS NULL{only}
       AND (q.priority, q.token) > ((SELECT priority FROM hint), (SELECT token FROM hint))
       AND q.next_attempt_at <= statement_timestamp()
     ORDER BY q.priority, q.token LIMIT {limit}
       FOR UPDATE SKIP LOCKED
),
full_ahead AS MATERIALIZED (SELECT count(*) = {limit} AS yes FROM ahead),
-- Rows queued behind the hint since: by transactions that had not started
-- (xid >= xmax) or were running (xid in xip) when the hinted claim ran.  The
-- planner must use the queued_by index here whatever it guesses of the hint
-- (and of an empty table's statistics): queued_by order is what only that
-- index gives, and the job_type and "behind" tests are spelled so no other
-- index can serve them.
arrived AS MATERIALIZED (
    SELECT q.ctid AS id, q.priority, q.token
      FROM delivery_queue AS q
     WHERE (SELECT fresh FROM hint) AND (SELECT yes FROM full_ahead)
       AND (q.job_type = {queue}) IS TRUE AND q.claimed_at IS NULL{only}
       AND q.queued_by >= (SELECT xmax FROM hint)
       AND {behind_hint}
       AND q.next_attempt_at <= statement_timestamp()
     ORDER BY q.queued_by LIMIT {limit}
       FOR UPDATE SKIP LOCKED
),
inflight AS MATERIALIZED (
    SELECT q.ctid AS id, q.priority, q.token
      FROM delivery_queue AS q
     WHERE (SELECT fresh FROM hint) AND (SELECT yes FROM full_ahead)
       AND (q.job_type = {queue}) IS TRUE AND q.claimed_at IS NULL{only}
       -- Without xids there is nothing to read; said apart from the ANY as a
       -- one-time test, because a plan cached while the queue was nearly empty
       -- (and kept until the next ANALYZE) reads the queued index through and
       -- filters the ANY on every row: the whole burst, at every claim of it.
       AND cardinality((SELECT xip FROM hint)) > 0
       AND q.queued_by = ANY ((SELECT xip FROM hint)::xid8[])
       AND {behind_hint}
       AND q.next_attempt_at <= statement_timestamp()
     ORDER BY q.queued_by LIMIT {limit}
       FOR UPDATE SKIP LOCKED
),
-- The range after the hint came back short: everything before it too.
behind AS MATERIALIZED (
    SELECT q.ctid AS id, q.priority, q.token
      FROM delivery_queue AS q
     WHERE NOT (SELECT yes FROM full_ahead)
       AND q.job_type = {queue} AND q.claimed_at IS NULL{only}
       AND (q.priority, q.token) <= ((SELECT priority FROM hint), (SELECT token FROM hint))
       AND q.next_attempt_at <= statement_timestamp()
     ORDER BY q.priority, q.token LIMIT {limit} - (SELECT count(*) FROM ahead)
       FOR UPDATE SKIP LOCKED
),
late AS MATERIALIZED (SELECT (SELECT count(*) FROM arrived) + (SELECT count(*) FROM inflight) AS n),
-- In order: behind's rows (pass 0), then ahead's, merged with the late ones
-- when there are any.  Rows of arrived or inflight past the limit stay queued
-- (locked until the commit).
picked AS MATERIALIZED (
    SELECT id, priority, token, 0 AS pass FROM behind
    UNION ALL
    SELECT id, priority, token, 1 FROM ahead WHERE (SELECT n = 0 FROM late)
    UNION ALL
    SELECT * FROM (SELECT id, priority, token, 1 FROM ahead
                   UNION ALL SELECT id, priority, token, 1 FROM arrived
                   UNION ALL SELECT id, priority, token, 1 FROM inflight
                   ORDER BY 2, 3 LIMIT {limit}) AS merged
     WHERE (SELECT n > 0 FROM late)
),
{lookups},
-- Suppressed addresses among the picked rows (DESIGN.md 11): never handed to
-- SES.  The list keeps each address with its domain in both IDNA forms,
-- lower-cased; the account's email is compared with its domain lower-cased
-- (SQL cannot convert IDNA).  One probe of each index for all the rows
-- (= ANY of an array), none at all while the list is empty, and a join (not
-- a subquery per row: three times the claim's cost with 71 of 500 rows
-- suppressed) to tell each row its reason.
keyed AS MATERIALIZED (SELECT x.*, {email_key} AS email_key FROM looked_up AS x),
barred AS MATERIALIZED (
    SELECT DISTINCT ON (key) key, reason, detail FROM (
        SELECT s.address AS key, s.reason, s.detail FROM suppressions AS s
         WHERE (SELECT EXISTS (SELECT FROM suppressions))
           AND s.address = ANY (ARRAY(SELECT email_key FROM keyed))
        UNION ALL
        SELECT s.address_unicode, s.reason, s.detail FROM suppressions AS s
         WHERE (SELECT EXISTS (SELECT FROM suppressions))
           AND s.address_unicode = ANY (ARRAY(SELECT email_key FROM keyed))
           AND s.address_unicode <> s.address) AS found
     ORDER BY key
),
checked AS MATERIALIZED (
    SELECT x.id, x.token, x.priority, x.pass, x.action, x.secret, x.code, x.email, x.login,
           CASE
               WHEN x.action IS NULL THEN 'token deleted'
               WHEN x.account_status IS NULL THEN 'account missing'
               WHEN x.consumed_at IS NOT NULL THEN 'token consumed'
               WHEN x.expires_at <= (SELECT now_s FROM hint) THEN 'token expired'
               WHEN x.action = 'activation' AND x.account_status <> 'provisioned'
                   THEN format('account is %s, activation needs provisioned', x.account_status)
               WHEN x.action = 'password_recovery' AND x.account_status <> 'active'
                   THEN format('account is %s, password recovery needs active',
                               x.account_status)
               WHEN b.key IS NOT NULL
                   THEN 'suppressed: ' || b.reason || COALESCE(' (' || b.detail || ')', '')
           END AS reason
      FROM keyed AS x LEFT JOIN barred AS b ON b.key = x.email_key
),
verdict AS MATERIALIZED (
    SELECT count(*)::int AS picked, max(token) AS top,
           COALESCE(max(ARRAY[priority, token]) FILTER (WHERE pass = 0),
                    max(ARRAY[priority, token])) AS stop,
           array_agg(token) FILTER (WHERE reason IS NULL) AS send,
           array_agg(token) FILTER (WHERE reason IS NOT NULL) AS skip,
           count(*) FILTER (WHERE reason IS NULL) AS sending,
           min(token) FILTER (WHERE reason IS NULL) AS lo,
           max(token) FILTER (WHERE reason IS NULL) AS hi
      FROM checked
),
{mark},
skipped AS (
    UPDATE deliveries AS d
       SET status = 'skipped', last_error = c.reason
      FROM checked AS c
     WHERE d.token = ANY ((SELECT skip FROM verdict)::bigint[]) AND d.token = c.token
       AND d.job_type = {queue} AND d.status = 'queued'
),
-- Every eligible row, unless some had moved on (the count spares the lookup).
sent AS (
    SELECT c.id, c.priority, c.token, CASE c.action WHEN 'activation' THEN 1 ELSE 2 END AS action,
           c.email, c.login, c.secret,
           COALESCE(c.code, '') AS code  -- the original printed a NULL code as ''
      FROM checked AS c
     WHERE c.reason IS NULL
       AND ((SELECT count(*) FROM marked) = (SELECT sending FROM verdict)
            OR c.token IN (SELECT token FROM marked))
),
{dequeue},
-- jobs.last_seq rises to the highest token picked.  A claim that filled its
-- limit does not wait for the jobs row while another claimer holds it (claims
-- do not wait for each other during a drain): it owes the raise, and its
-- session's next claim pays it.  A short claim, the end of a drain, waits, so
-- the mark is exact whenever a drain ends.
raise_to AS MATERIALIZED (
    SELECT GREATEST(v.top, h.owed) AS top, v.picked = {limit} AS full_claim,
           (SELECT j.last_seq FROM jobs AS j WHERE j.job_type = {queue}) AS seen
      FROM verdict AS v, hint AS h
),
high_water AS (
    UPDATE jobs SET last_seq = GREATEST(jobs.last_seq, r.top)
      FROM raise_to AS r
     WHERE jobs.job_type = {queue} AND (jobs.last_seq IS NULL OR jobs.last_seq < r.top)
       AND (NOT r.full_claim OR jobs.ctid = ANY (ARRAY(
                SELECT j.ctid FROM jobs AS j WHERE j.job_type = {queue}
                   FOR NO KEY UPDATE SKIP LOCKED)))
    RETURNING jobs.job_type
),
owes AS MATERIALIZED (
    SELECT CASE WHEN EXISTS (SELECT FROM high_water) OR r.seen >= r.top THEN 0
                ELSE r.top END AS owed
      FROM raise_to AS r
),
-- The next claim's hint: where the scan that filled the limit stopped, and
-- this snapshot's bounds (the old ones if arrived or inflight had more).
remember AS MATERIALIZED (
    SELECT v.picked,
           set_config('{guc}', CASE
               WHEN v.picked < {limit} THEN ''
               WHEN (SELECT n >= {limit} FROM late)
               THEN concat_ws(' ', v.stop[1], v.stop[2], h.xmax, array_to_string(h.xip, ','),
                              h.since, o.owed)
               ELSE concat_ws(' ', v.stop[1], v.stop[2], pg_snapshot_xmax(pg_current_snapshot()),
                              array_to_string(ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot())),
                                              ','),
                              h.since, o.owed) END, false) AS hint
      FROM hint AS h, verdict AS v, owes AS o
)
-- A head row (rows picked, NULLs, claimed_at in epoch microseconds), then the
-- rows to send, each exactly a Row: no work per row in Python, and the
-- timestamp is sent once instead of once per row.
SELECT r.picked, NULL, NULL, NULL::bytea, NULL,
       (EXTRACT(EPOCH FROM statement_timestamp()) * 1000000)::bigint
  FROM remember AS r
UNION ALL
(SELECT s.action, s.email, s.login, s.secret, s.code, s.token FROM sent AS s
  ORDER BY s.priority, s.token)
"""

# Picked rows with their token and account.  A backlog is claimed in runs of
# consecutive ids whose accounts were made with them: then one key range, read
# once, beats a descent of the index per row.  Small claims (few rows, and a
# plan with fewer nodes to set up) only probe.
_LOOKUPS_PROBE = """
looked_up AS (
    SELECT p.*, t.action, t.secret, t.code, t.consumed_at, t.expires_at,
           a.email, a.login, a.status AS account_status
      FROM picked AS p
      LEFT JOIN LATERAL (SELECT * FROM tokens AS t WHERE t.id = p.token OFFSET 0) AS t ON true
      LEFT JOIN LATERAL (SELECT * FROM accounts AS a WHERE a.id = t.account OFFSET 0)
           AS a ON true
)"""
_LOOKUPS_RANGE = """
span AS MATERIALIZED (
    SELECT min(token) AS lo, max(token) AS hi,
           COALESCE(max(token) - min(token) < 4 * count(*), false) AS dense
      FROM picked
),
tok AS MATERIALIZED (
    SELECT p.*, t.action, t.secret, t.code, t.account, t.consumed_at, t.expires_at
      FROM picked AS p
      LEFT JOIN tokens AS t
             ON t.id = p.token AND t.id BETWEEN (SELECT lo FROM span) AND (SELECT hi FROM span)
     WHERE (SELECT dense FROM span)
    UNION ALL
    SELECT p.*, t.action, t.secret, t.code, t.account, t.consumed_at, t.expires_at
      FROM picked AS p
      LEFT JOIN LATERAL (SELECT * FROM tokens AS t WHERE t.id = p.token OFFSET 0) AS t ON true
     WHERE NOT (SELECT dense FROM span)
),
aspan AS MATERIALIZED (
    SELECT min(account) AS lo, max(account) AS hi,
           COALESCE(max(account) - min(account) < 4 * count(*), false) AS dense
      FROM tok
),
looked_up AS (
    SELECT k.*, a.email, a.login, a.status AS account_status
      FROM tok AS k
      LEFT JOIN accounts AS a ON a.id = k.account
            AND a.id BETWEEN (SELECT lo FROM aspan) AND (SELECT hi FROM aspan)
     WHERE (SELECT dense FROM aspan)
    UNION ALL
    SELECT k.*, a.email, a.login, a.status
      FROM tok AS k
      LEFT JOIN LATERAL (SELECT * FROM accounts AS a WHERE a.id = k.account OFFSET 0)
           AS a ON true
     WHERE NOT (SELECT dense FROM aspan)
)"""

# The deliveries to send become '{final}'.  Only those still 'queued': a queue
# row is a pointer, and its delivery may have moved on (an operator, a late
# 'sent') since.  As for the lookups, a range when the rows are dense.
_MARK_PROBE = """
marked AS (
    UPDATE deliveries AS d
       SET status = '{final}', attempts = d.attempts + 1, claimed_at = statement_timestamp()
     WHERE d.token = ANY ((SELECT send FROM verdict)::bigint[])
       AND d.job_type = {queue} AND d.status = 'queued'
    RETURNING d.token
)"""
_MARK_RANGE = """
marked_sparse AS (
    UPDATE deliveries AS d
       SET status = '{final}', attempts = d.attempts + 1, claimed_at = statement_timestamp()
     WHERE (SELECT hi - lo >= 2 * sending FROM verdict)
       AND d.token = ANY ((SELECT send FROM verdict)::bigint[])
       AND d.job_type = {queue} AND d.status = 'queued'
    RETURNING d.token
),
marked_dense AS (
    UPDATE deliveries AS d
       SET status = '{final}', attempts = d.attempts + 1, claimed_at = statement_timestamp()
     WHERE (SELECT hi - lo < 2 * sending FROM verdict)
       AND d.token BETWEEN (SELECT lo FROM verdict) AND (SELECT hi FROM verdict)
       AND d.job_type = {queue}
       -- One test the planner cannot split: a filter on the range, never a
       -- join (that could probe checked once per row), and hashed since its
       -- row estimate does not hinge on how rare 'queued' was at ANALYZE.
       AND (d.status = 'queued'
            AND d.token IN (SELECT token FROM checked WHERE reason IS NULL)) IS TRUE
    RETURNING d.token
),
marked AS (SELECT token FROM marked_sparse UNION ALL SELECT token FROM marked_dense)"""

# Compatibility mode: everything picked leaves the queue.
_DEQUEUE_ALL = """dequeued AS (
    DELETE FROM delivery_queue AS q WHERE q.ctid = ANY (ARRAY(SELECT id FROM picked))
)"""

# Claimed: the rows sent keep their queue row as their lease; the rest leave.
_DEQUEUE_LEASE = """dequeued AS (
    DELETE FROM delivery_queue AS q
     WHERE q.ctid = ANY (ARRAY(SELECT id FROM picked EXCEPT ALL SELECT id FROM sent))
),
leased AS (
    UPDATE delivery_queue AS q SET claimed_at = statement_timestamp()
     WHERE q.ctid = ANY (ARRAY(SELECT id FROM sent))
)"""


# An account's email with its domain (after the last @) lower-cased: how the
# suppression list is keyed, up to the IDNA form (see barred in the claim).
_EMAIL_KEY = ("(left(x.email, -strpos(reverse(x.email), '@'))"
              " || lower(right(x.email, strpos(reverse(x.email), '@'))))")


def _only(priorities: tuple[int, ...] | None) -> str:
    if priorities is None:
        return ""
    return f" AND q.priority IN ({', '.join(str(int(p)) for p in priorities)})"


@functools.lru_cache(maxsize=16)
def claim_sql(queue: str, limit: int, final_status: str, ttl: float, ranges_from: int,
              priorities: tuple[int, ...] | None = None) -> str:
    """The claim's text for one queue, limit and final status (``claimed`` or
    ``emitted``); a hint is followed for ``ttl`` seconds, and key ranges are
    read from a limit of ``ranges_from`` rows on.  No parameters: the limit is
    in the text so the cached plan knows it, and the statement can be PREPAREd.
    The hint's setting is named after the queue (hex digits only, so a valid
    name).  ``priorities`` (None: all) restricts every scan of the queue to
    those priorities, i.e. actions (an action whose template is held); the
    hint is then one of its own, so a hint left by a claim of other rows never
    hides rows of an action released since behind it."""
    ranges = limit >= ranges_from
    template = (_CLAIM.replace("{lookups}", _LOOKUPS_RANGE if ranges else _LOOKUPS_PROBE)
                .replace("{mark}", _MARK_RANGE if ranges else _MARK_PROBE)
                .replace("{dequeue}", _DEQUEUE_ALL if final_status == "emitted" else _DEQUEUE_LEASE))
    return template.format(
        queue="'" + queue.replace("'", "''") + "'::job_type", limit=int(limit), ttl=float(ttl),
        final=final_status, email_key=_EMAIL_KEY, only=_only(priorities),
        guc="mailroom.claim_hint_" + hashlib.sha1(f"{queue}{priorities or ''}".encode()).hexdigest()[:16],
        behind_hint="(q.priority < (SELECT priority FROM hint) OR (q.priority = (SELECT priority"
                    " FROM hint) AND q.token <= (SELECT token FROM hint)))")


# Deliveries a statement put back to 'queued' (its `changed` CTE returns token,
# status, priority, next_attempt_at) get their queue row back, unclaimed.
_REQUEUE = """
requeued AS (
    INSERT INTO delivery_queue (job_type, token, priority, next_attempt_at)
    SELECT %(queue)s, token, priority, next_attempt_at FROM changed WHERE status = 'queued'
    ON CONFLICT (job_type, token) DO UPDATE
       SET priority = EXCLUDED.priority, next_attempt_at = EXCLUDED.next_attempt_at,
           claimed_at = NULL, queued_by = EXCLUDED.queued_by
)"""

# Outcome writers lock the queue rows of their tokens first, in token order,
# waiting for them; their UPDATE starts with `(SELECT count(*) FROM held) >= 0`,
# a condition without columns, checked once before any row is read, so those
# locks come first.  Changed rows that are not queued again leave the queue.
_HOLD = """
held AS MATERIALIZED (
    SELECT q.token FROM delivery_queue AS q
     WHERE q.job_type = %(queue)s AND q.token = ANY (ARRAY(SELECT unnest(%(tokens)s::bigint[])))
     ORDER BY q.token FOR UPDATE
)"""
_CLOSED = """
closed AS (
    DELETE FROM delivery_queue AS q
     WHERE q.job_type = %(queue)s
       AND q.token = ANY (ARRAY(SELECT token FROM changed WHERE status <> 'queued'))
)"""
_CLOSE = _CLOSED + """
SELECT count(*) FROM changed"""


# Which rows an outcome may change.
#  * failed / retry: only the claim the outcome belongs to (status 'claimed'
#    and, when the caller passes it, the same claimed_at; each row carries its
#    own, so one statement can record the outcomes of several claims).  After a lease
#    expiry the row may have been re-queued and claimed by another worker; a
#    stale failure written over that claim would turn the other worker's
#    success into a loss (its 'sent' would then find the row not claimed).
#  * sent: SES accepted the email, which is a fact whatever happened since, so
#    it also lands on a row that was re-queued, re-claimed or failed by lease
#    expiry meanwhile: recording it prevents (or at least ends) a duplicate
#    send.  Only rows already final (sent, emitted, skipped) are left alone.
RECORD = f"""
WITH {_HOLD},
changed AS (
    UPDATE deliveries AS d
       SET status = CASE WHEN o.kind = 'sent' THEN 'sent'
                         -- debug mode printed the request and sent nothing
                         WHEN o.kind = 'emitted' THEN 'emitted'
                         WHEN o.kind = 'retry' AND d.attempts < %(max)s THEN 'queued'
                         -- held (its action's template is missing): queued again,
                         -- and the claim's attempt given back below
                         WHEN o.kind = 'held' THEN 'queued'
                         ELSE 'failed' END::delivery_status,
           attempts = CASE WHEN o.kind = 'held' THEN GREATEST(d.attempts - 1, 0) ELSE d.attempts END,
           sent_at = CASE WHEN o.kind = 'sent' THEN statement_timestamp() ELSE d.sent_at END,
           message_id = CASE WHEN o.kind = 'sent' THEN o.message_id ELSE d.message_id END,
           last_error = CASE WHEN o.kind IN ('sent', 'emitted') THEN d.last_error
                             WHEN o.kind = 'retry' AND d.attempts >= %(max)s
                             THEN format('giving up after %%s attempts (MAILROOM_SEND_MAX_ATTEMPTS):'
                                         ' %%s', d.attempts, o.error)
                             ELSE o.error END,
           -- A retry without its own delay waits by the ledger's count of
           -- attempts: backoff_ms doubling per attempt, capped at 120 times it,
           -- so retries span an outage of minutes, not the seconds of one process.
           next_attempt_at = CASE WHEN o.kind = 'held'
                                  THEN statement_timestamp() + COALESCE(o.retry_after, 0) * interval '1 s'
                                  WHEN o.kind <> 'retry' THEN d.next_attempt_at
                                  ELSE statement_timestamp()
                                       + COALESCE(o.retry_after * 1000,
                                                  LEAST(120, power(2, LEAST(GREATEST(d.attempts, 1), 31) - 1))
                                                  * %(backoff_ms)s) * interval '1 ms' END
      FROM unnest(%(tokens)s::bigint[], %(kinds)s::text[], %(message_ids)s::text[],
                  %(errors)s::text[], %(retry_after)s::float8[], %(claimed_at)s::timestamptz[])
           AS o (token, kind, message_id, error, retry_after, claimed_at)
     WHERE (SELECT count(*) FROM held) >= 0
       AND d.job_type = %(queue)s
       -- Redundant with the join, on purpose: as an index condition it fetches
       -- just these rows whatever the statistics say.  With stale statistics
       -- (a burst of tokens since the last ANALYZE) the planner otherwise walks
       -- every row of the ledger and joins it against the array.
       -- ARRAY(SELECT ...) hides the array's length from the planner, which
       -- then keeps it as an index condition instead of a filter.
       AND d.token = ANY (ARRAY(SELECT unnest(%(tokens)s::bigint[])))
       AND d.token = o.token
       AND (    (d.status = 'claimed' AND (o.claimed_at IS NULL OR d.claimed_at = o.claimed_at))
             OR (o.kind = 'sent' AND d.status IN ('claimed', 'queued', 'failed')))
    RETURNING d.token, d.status, d.priority, d.next_attempt_at,
              -- Created -> accepted by SES, for mailroom_delivery_latency_seconds.
              CASE WHEN o.kind = 'sent'
                   THEN EXTRACT(EPOCH FROM statement_timestamp() - d.created_at)::float8 END AS latency
),
{_REQUEUE},
{_CLOSED}
SELECT count(*),
       COALESCE(array_agg(priority) FILTER (WHERE latency IS NOT NULL), '{{}}'),
       COALESCE(array_agg(latency) FILTER (WHERE latency IS NOT NULL), '{{}}')
  FROM changed
"""


#: Put ``claimed`` rows whose lease expired back in the queue (``failed`` once
#: claimed ``%(max)s`` times), skipping rows someone else holds.
REQUEUE_EXPIRED = f"""
WITH expired AS MATERIALIZED (
    SELECT q.ctid AS id, q.token FROM delivery_queue AS q
     WHERE q.job_type = %(queue)s AND q.claimed_at IS NOT NULL
       AND q.claimed_at < statement_timestamp() - %(lease_ms)s * interval '1 ms'
       FOR UPDATE SKIP LOCKED
),
held AS MATERIALIZED (
    SELECT d.token, d.status FROM deliveries AS d
     WHERE d.token = ANY (ARRAY(SELECT token FROM expired)) AND d.job_type = %(queue)s
       FOR UPDATE SKIP LOCKED
),
changed AS (
    UPDATE deliveries AS d
       SET status = CASE WHEN d.attempts >= %(max)s THEN 'failed'::delivery_status
                         ELSE 'queued'::delivery_status END,
           next_attempt_at = statement_timestamp(),
           last_error = CASE WHEN d.attempts >= %(max)s
                             THEN format('lease expired, giving up after %%s attempts',
                                         d.attempts)
                             ELSE format('lease expired (attempt %%s)', d.attempts) END
     WHERE d.token = ANY (ARRAY(SELECT token FROM held WHERE status = 'claimed'))
       AND d.job_type = %(queue)s
    RETURNING d.token, d.status, d.priority, d.next_attempt_at
),
{_REQUEUE},
-- Leases of failed rows go, and so do those whose delivery is not
-- claimed (or gone); those whose delivery someone else holds stay.
dropped AS (
    DELETE FROM delivery_queue AS q
     WHERE q.ctid = ANY (ARRAY(
           SELECT e.id FROM expired AS e
            WHERE e.token NOT IN (SELECT token FROM changed WHERE status = 'queued')
              AND (e.token IN (SELECT token FROM held)
                   OR NOT EXISTS (SELECT FROM deliveries AS d
                                   WHERE d.token = e.token AND d.job_type = %(queue)s))))
)
SELECT count(*) FROM changed
"""


def move_claimed_sql(assignments: str) -> str:
    """Change the deliveries of one claim that are still ``claimed`` with
    ``assignments`` (a SET list over ``d``); returns how many changed."""
    return f"""
WITH {_HOLD},
changed AS (
    UPDATE deliveries AS d SET {assignments}
     WHERE (SELECT count(*) FROM held) >= 0
       AND d.job_type = %(queue)s
       -- Hidden from the planner as in RECORD, so it stays an index condition.
       AND d.token = ANY (ARRAY(SELECT unnest(%(tokens)s::bigint[])))
       AND d.status = 'claimed'
       AND (%(claimed_at)s::timestamptz IS NULL OR d.claimed_at = %(claimed_at)s)
    RETURNING d.token, d.status, d.priority, d.next_attempt_at
),
{_REQUEUE},
{_CLOSE}
"""


#: Return claimed rows never handed to SES to the queue, giving the claim's
#: attempt back since nothing was tried (clean shutdown, a failed hand-over).
RELEASE = move_claimed_sql("status = 'queued', attempts = GREATEST(d.attempts - 1, 0)")
#: Compatibility mode: the rows' batch line was flushed to stdout.
MARK_EMITTED = move_claimed_sql("status = 'emitted'")


#: Renew the leases of claims still in flight: one statement for all of them.
#: The lease is ``delivery_queue.claimed_at`` (what requeue_expired and
#: next_due_in read); the claim's identity is ``deliveries.claimed_at`` (what
#: outcomes match), a different column, left alone, so a renewed claim's late
#: outcome still finds its row.  Only queue rows are locked (SKIP LOCKED: an
#: outcome or an expiry holding one is about to close or requeue it), so the
#: locking order, queue row before delivery, holds; a row whose delivery is no
#: longer this claim (expired and claimed again elsewhere) is not renewed.
#: delivery_queue's claimed index makes this a non-HOT update of a small table;
#: ``deliveries`` is only read.
RENEW = """
WITH mine AS MATERIALIZED (
    SELECT o.token, o.claimed_at
      FROM unnest(%(tokens)s::bigint[], %(claimed_at)s::timestamptz[]) AS o (token, claimed_at)
),
held AS MATERIALIZED (
    SELECT q.ctid AS id, q.token FROM delivery_queue AS q
     WHERE q.job_type = %(queue)s AND q.claimed_at IS NOT NULL
       AND q.token = ANY (ARRAY(SELECT token FROM mine))
     ORDER BY q.token
       FOR UPDATE SKIP LOCKED
),
renewed AS (
    UPDATE delivery_queue AS q SET claimed_at = statement_timestamp()
     WHERE q.ctid = ANY (ARRAY(
           SELECT h.id FROM held AS h
             JOIN mine AS m ON m.token = h.token
             JOIN deliveries AS d ON d.token = h.token AND d.job_type = %(queue)s
            WHERE d.status = 'claimed' AND d.claimed_at = m.claimed_at))
    RETURNING q.token
)
SELECT count(*) FROM renewed
"""


#: Heartbeat numbers: queued rows (counted up to %(cap)s) and the age of the
#: oldest, from the first queued token of each priority (two index probes).
QUEUE_STATS = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM delivery_queue
                               WHERE job_type = %(queue)s AND claimed_at IS NULL
                               LIMIT %(cap)s) AS q),
       (SELECT EXTRACT(EPOCH FROM statement_timestamp() - min(d.created_at))::float8
          FROM deliveries AS d
         WHERE d.job_type = %(queue)s
           AND d.token = ANY (ARRAY(
               SELECT (SELECT q.token FROM delivery_queue AS q
                        WHERE q.job_type = %(queue)s AND q.claimed_at IS NULL AND q.priority = p.priority
                        ORDER BY q.priority, q.token LIMIT 1)
                 FROM (VALUES (0::smallint), (1::smallint)) AS p (priority))))
"""


#: Seconds until something of the queue needs the collector (0: a queued row is
#: due now), NULL if nothing will: the earlier of the next retry's
#: ``next_attempt_at`` and the oldest claim's lease expiry.  The "due now" probe
#: stops at the first due row of the queued index and the lease side is one probe
#: of the claimed index; only when nothing is due does it read the queued rows,
#: which are then just those waiting for a retry.
_NEXT_DUE_IN = """
SELECT CASE
           -- Not EXISTS: its planner may seq-scan for a "common" row;
           -- ORDER BY + LIMIT walks the queued index from its start.
           WHEN (SELECT true FROM delivery_queue
                  WHERE job_type = %(queue)s AND claimed_at IS NULL{only}
                    AND next_attempt_at <= statement_timestamp()
                  ORDER BY priority, token LIMIT 1)
           THEN 0
           ELSE EXTRACT(EPOCH FROM LEAST(
                    (SELECT min(next_attempt_at) FROM delivery_queue
                      WHERE job_type = %(queue)s AND claimed_at IS NULL{only}),
                    (SELECT min(claimed_at) FROM delivery_queue
                      WHERE job_type = %(queue)s AND claimed_at IS NOT NULL)
                    + %(lease_ms)s * interval '1 millisecond'
                ) - statement_timestamp())
       END::float8
"""
NEXT_DUE_IN = _NEXT_DUE_IN.replace("{only}", "")
#: The same, for the rows of some actions only (``%(priorities)s``): the rows of
#: an action whose template is held wait without a time and are never due.
NEXT_DUE_IN_ACTIONS = _NEXT_DUE_IN.replace("{only}", " AND priority = ANY(%(priorities)s::smallint[])")


# -- status and checks: once per connection, or for a dashboard ------------------

#: Rows of a queue per status, and the age of the oldest of each: one pass over
#: the queue's whole ledger (``mailroom status``, never a hot loop).
STATUS_COUNTS = """
SELECT status::text, count(*),
       EXTRACT(EPOCH FROM statement_timestamp() - min(created_at))::float8
  FROM deliveries WHERE job_type = %(queue)s GROUP BY status
"""

#: The queue's claim mark.
LAST_SEQ = "SELECT last_seq FROM jobs WHERE job_type = %(queue)s"

#: Whether the migrations table exists, and whether the ledger's tables do.
SCHEMA_TABLES = """
SELECT to_regclass('schema_migrations') IS NOT NULL,
       to_regclass('deliveries') IS NOT NULL AND to_regclass('delivery_queue') IS NOT NULL
"""

#: golang-migrate's one row: the version and whether a migration failed half-way.
SCHEMA_VERSION = "SELECT version, dirty FROM schema_migrations LIMIT 1"

#: Compared as text: casting an unknown name to the ``job_type`` enum would be an
#: error in every claim, and the worker would be restarted in a loop.
CHECK_QUEUE = "SELECT EXISTS (SELECT FROM jobs WHERE job_type::text = %(queue)s)"

#: The collector's session settings, one statement each (the reasons are in
#: :func:`mailroom.ledger.connection.configure_session`).
SESSION_SETTINGS = (
    "SET synchronous_commit = off",
    "SET enable_seqscan = off",
    "SET enable_bitmapscan = off",
    "SET jit = off",
)


# ---------------------------------------------------------------- delivery events
# (DESIGN.md 11; mailroom.ledger.events runs these.)

# The delivery an event is about: the recipient's account (the unique index on
# accounts.email), its tokens (the index on tokens.account), their deliveries
# (the key), the one whose MessageId SES names.  Three index probes per event
# and no index on deliveries.message_id, which would make every claimed -> sent
# update non-HOT: matching costs the events worker, never the sending path.
# {spellings}: the recipient as SES wrote it and, when recording, with its domain
# in Unicode form: the sender hands SES the ASCII (IDNA) form of jane@bücher.de, and
# SES reports jane@xn--bcher-kva.de, which the account does not hold.
_MATCH = """
LEFT JOIN LATERAL (
    SELECT d.job_type, d.token
      FROM accounts AS a
      JOIN tokens AS t ON t.account = a.id
      JOIN deliveries AS d ON d.token = t.id
     WHERE a.email = ANY ({spellings}) AND d.message_id = {event}.message_id
     LIMIT 1
) AS m ON true"""

# A delivery's feedback rises to the highest of its events (the enum is in
# precedence order), so the order events arrive in does not matter, and an
# event recorded twice changes nothing.
_FEED = """
fed AS (
    UPDATE deliveries AS d SET feedback = GREATEST(d.feedback, f.type)
      FROM (SELECT job_type, token, max(type) AS type FROM {source}
             WHERE token IS NOT NULL GROUP BY job_type, token) AS f
     WHERE d.token = f.token AND d.job_type = f.job_type
       AND d.feedback IS DISTINCT FROM GREATEST(d.feedback, f.type)
    RETURNING d.token
)"""

#: Record a batch of parsed events in one statement: insert what is new (the
#: identity constraint drops redeliveries, including a duplicate within the
#: batch), raise the feedback of the deliveries they match, and suppress the
#: addresses of new permanent bounces and complaints, matched or not: another
#: sender's bounce on the same account hurts it just as much.  An address
#: already suppressed keeps its first reason.  Returns the new events by type
#: (JSON), how many of them matched no delivery, how many addresses were
#: suppressed and how many deliveries changed feedback.
RECORD_EVENTS = f"""
WITH incoming AS (
    SELECT * FROM unnest(%(message_ids)s::text[], %(recipients)s::text[],
                         %(types)s::delivery_feedback[], %(subtypes)s::text[],
                         %(event_at)s::timestamptz[], %(diagnostics)s::text[], %(raws)s::text[],
                         %(addresses)s::text[], %(unicode)s::text[], %(recipients_unicode)s::text[])
           AS e (message_id, recipient, type, subtype, event_at, diagnostic, raw, address,
                 address_unicode, recipient_unicode)
),
matched AS MATERIALIZED (
    SELECT e.*, m.job_type, m.token
      FROM incoming AS e {_MATCH.format(event="e", spellings="ARRAY[e.recipient, e.recipient_unicode]")}
),
inserted AS MATERIALIZED (
    INSERT INTO delivery_events (job_type, token, message_id, recipient, type, subtype, event_at,
                                 diagnostic, raw)
    SELECT job_type, token, message_id, recipient, type, subtype, event_at, diagnostic, raw
      FROM matched
    ON CONFLICT ON CONSTRAINT delivery_events_identity DO NOTHING
    RETURNING id, job_type, token, message_id, recipient, type, event_at, diagnostic
),
{_FEED.format(source="inserted")},
suppressed AS (
    INSERT INTO suppressions (address, address_unicode, reason, detail, event_id, created_by)
    SELECT DISTINCT ON (e.address) e.address, e.address_unicode, i.type::text, i.diagnostic, i.id,
           'ses'
      FROM inserted AS i
      JOIN incoming AS e ON e.message_id = i.message_id AND e.recipient = i.recipient
                        AND e.type = i.type AND e.event_at = i.event_at
     WHERE i.type IN ('bounced', 'complained') AND e.address IS NOT NULL
     ORDER BY e.address, i.type DESC, i.id
    ON CONFLICT (address) DO NOTHING
    RETURNING address
)
SELECT (SELECT COALESCE(json_object_agg(type, n), '{{}}') FROM
            (SELECT type::text, count(*) AS n FROM inserted GROUP BY type) AS c),
       (SELECT count(*) FROM inserted WHERE token IS NULL),
       (SELECT count(*) FROM suppressed),
       (SELECT count(*) FROM fed)
"""

#: Match again events recorded unmatched in the last %(within_s)s seconds: the
#: event came before the outcome that wrote its MessageId (the collector was
#: behind, or down).  Events of another sender on the configuration set stay
#: unmatched; the window bounds what each pass reads.  Returns how many matched.
REMATCH_EVENTS = f"""
WITH pending AS MATERIALIZED (
    SELECT e.id, e.message_id, e.recipient, e.type FROM delivery_events AS e
     WHERE e.token IS NULL AND e.recorded_at > statement_timestamp() - %(within_s)s * interval '1 s'
       FOR UPDATE SKIP LOCKED
),
found AS MATERIALIZED (
    SELECT p.id, p.type, m.job_type, m.token
      FROM pending AS p {_MATCH.format(event="p", spellings="ARRAY[p.recipient]")}
     WHERE m.token IS NOT NULL
),
linked AS (
    UPDATE delivery_events AS e SET job_type = f.job_type, token = f.token
      FROM found AS f WHERE e.id = f.id
),
{_FEED.format(source="found")}
SELECT count(*) FROM found
"""

# Deliverability over the last window (DESIGN.md 11, `mailroom status`, the
# events worker's heartbeats, the automatic pause): deliveries sent in the
# window, and of the events in the window the deliveries that bounced for good
# or complained, with the newest such event's id (the pause's "anything new
# since the operator resumed?"), and the size of the suppression list.  Sends are counted with a scan of the queue's
# deliveries, like STATUS_COUNTS: an index on sent_at would make every send a
# non-HOT update.  Events come by delivery_events_event_at_idx.
HEALTH = """
SELECT (SELECT count(*) FROM deliveries
         WHERE job_type = %(queue)s
           AND sent_at >= statement_timestamp() - make_interval(secs => %(window_s)s)),
       count(DISTINCT e.token) FILTER (WHERE e.type = 'bounced'),
       count(DISTINCT e.token) FILTER (WHERE e.type = 'complained'),
       coalesce(max(e.id) FILTER (WHERE e.type IN ('bounced', 'complained')), 0),
       (SELECT count(*) FROM suppressions)
  FROM delivery_events AS e
 WHERE e.event_at >= statement_timestamp() - make_interval(secs => %(window_s)s)
   AND e.job_type = %(queue)s
"""
