-- Migration 1: the delivery ledger.
--
-- deliveries: one row per (queue, token), the record that operators and
-- `mailroom status` read (status, attempts, timestamps, MessageId, error).
-- delivery_queue: one row per delivery still open (queued, or claimed under a
-- lease), the only thing a claim reads.  The token trigger adds both rows;
-- mailroom.ledger moves them (its docstring has the lifecycle and the claim).
--
-- Unlike the original jobs.last_seq cursor this loses nothing on a crash,
-- does not skip ids that commit out of order, and lets several collectors
-- share a queue (FOR UPDATE SKIP LOCKED).  The runner wraps this file in one
-- transaction.

CREATE TYPE delivery_status AS ENUM
    ('queued', 'claimed', 'sent', 'emitted', 'failed', 'skipped');

-- Why two tables: a claim changes every row it takes.  Were the queue a
-- partial index on deliveries (WHERE status = 'queued'), that change would
-- touch an indexed column: a new tuple on another page and new entries in
-- every index, per row.  Here deliveries has no index on anything a claim or
-- an outcome changes, so its updates are HOT (the new version goes on the
-- same page, no index is touched), and taking a row off the queue is a
-- DELETE, which touches no index either.
--
-- fillfactor 45: a claim updates all the rows of a page in one transaction,
-- so the page must hold the old and the (longer) new version of every row at
-- once for all the updates to be HOT; at 50, one in twelve is not.  Dead
-- versions are pruned when the page is next read, so later updates (claimed
-- -> sent) find room too.  The price: the history takes about twice the space.
CREATE TABLE deliveries (
    job_type        job_type NOT NULL REFERENCES jobs (job_type) ON DELETE CASCADE,
    token           BIGINT NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    status          delivery_status NOT NULL DEFAULT 'queued',
    -- 0 = password recovery, 1 = activation: a user waiting at a "forgot my
    -- password" page is served before a backlog of sign-ups.
    priority        SMALLINT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_at      TIMESTAMPTZ,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at         TIMESTAMPTZ,
    message_id      TEXT,
    last_error      TEXT,
    -- token first: the key also serves the cascade when a token (or its
    -- account) is deleted, so it is the table's only index.
    PRIMARY KEY (token, job_type)
) WITH (fillfactor = 45);

-- The open work: claimed_at is null while queued, the lease start while
-- claimed.  queued_by is the transaction that (re)queued the row: a claim
-- that follows its hint finds rows queued behind it by that (see the ledger).
-- No foreign key to deliveries: a cascade from a token deletion would lock
-- the queue row after the delivery, the opposite order of a claim, and could
-- deadlock with it; a queue row whose delivery is gone or has moved on is
-- dropped when a claim (or lease expiry) meets it.
CREATE TABLE delivery_queue (
    job_type        job_type NOT NULL,
    token           BIGINT NOT NULL,
    priority        SMALLINT NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    claimed_at      TIMESTAMPTZ,
    queued_by       XID8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (job_type, token)
) WITH (
    -- Each claimed row leaves a dead tuple, and its index entry stays until
    -- VACUUM: where autovacuum runs, have it clean this small table often
    -- rather than at 20 % of its size.
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000
);

-- Claims read this in (priority, token) order.  Holding only open work, its
-- size does not depend on how many tokens were ever sent.
CREATE INDEX delivery_queue_queued_idx
    ON delivery_queue (job_type, priority, token) WHERE claimed_at IS NULL;

-- Rows queued since a given transaction.  queued_by is only ever compared
-- with values the planner cannot see (they come from the claim's hint):
-- statistics on it could only mislead.
CREATE INDEX delivery_queue_queued_by_idx
    ON delivery_queue (queued_by) WHERE claimed_at IS NULL;
ALTER TABLE delivery_queue ALTER COLUMN queued_by SET STATISTICS 0;

-- Lease expiry and next_due_in look for the oldest claims only.
CREATE INDEX delivery_queue_claimed_idx
    ON delivery_queue (job_type, claimed_at) WHERE claimed_at IS NOT NULL;

-- The original trigger function, extended: still one NOTIFY per token (the
-- collector's wake-up), plus per queue a ledger row and its queue row.  Rows
-- put into deliveries by other means (a bulk load with triggers off) need
-- their queue rows inserted too, as below.
CREATE OR REPLACE FUNCTION tokens_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH queued AS (
        INSERT INTO deliveries (job_type, token, priority)
        SELECT j.job_type, NEW.id,
               CASE NEW.action WHEN 'password_recovery' THEN 0 ELSE 1 END
          FROM jobs AS j
        RETURNING job_type, token, priority, next_attempt_at
    )
    INSERT INTO delivery_queue (job_type, token, priority, next_attempt_at)
    SELECT job_type, token, priority, next_attempt_at FROM queued;
    NOTIFY token_insert;
    RETURN NULL;
END;
$$;

-- Backfill: what the original cursor had not reached yet and could still be
-- sent.  Rows the original would skip for account status are queued anyway;
-- the claim marks them skipped with the reason, like anything that changes
-- state while queued.
INSERT INTO deliveries (job_type, token, priority)
SELECT j.job_type, t.id,
       CASE t.action WHEN 'password_recovery' THEN 0 ELSE 1 END
  FROM jobs AS j
  JOIN tokens AS t ON t.id > COALESCE(j.last_seq, 0)
 WHERE t.consumed_at IS NULL
   AND t.expires_at > EXTRACT(EPOCH FROM now());

INSERT INTO delivery_queue (job_type, token, priority, next_attempt_at)
SELECT job_type, token, priority, next_attempt_at FROM deliveries;

-- Statistics now, not at autovacuum's convenience.
ANALYZE deliveries;
ANALYZE delivery_queue;
