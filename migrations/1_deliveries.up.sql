-- Migration 1: the delivery ledger.
--
-- One row per (queue, token): the token-insert trigger creates a 'queued' row
-- for every queue registered in jobs, and mailroom moves it through
-- claimed -> sent / failed / queued (retry), or straight to skipped when the
-- token is no longer eligible.  Unlike the original jobs.last_seq cursor this
-- loses nothing on a crash, does not skip ids that commit out of order, and
-- lets several collectors share a queue (FOR UPDATE SKIP LOCKED).
-- The runner wraps this file in one transaction.

CREATE TYPE delivery_status AS ENUM
    ('queued', 'claimed', 'sent', 'emitted', 'failed', 'skipped');

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
    PRIMARY KEY (job_type, token)
);

-- The claim walks this in (priority, token) order; being partial, it holds
-- only the work still to do, so a claim costs the same after a billion sends.
CREATE INDEX deliveries_queued_idx
    ON deliveries (job_type, priority, token) WHERE status = 'queued';

-- Lease expiry and next_due_in look for the oldest claims only.
CREATE INDEX deliveries_claimed_idx
    ON deliveries (job_type, claimed_at) WHERE status = 'claimed';

-- The primary key leads with job_type, so without this every token (or
-- account) deletion would scan the whole ledger for its cascade.
CREATE INDEX deliveries_token_idx ON deliveries (token);

-- The original trigger function, extended: still one NOTIFY per token (the
-- collector's wake-up), plus one ledger row per queue.
CREATE OR REPLACE FUNCTION tokens_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deliveries (job_type, token, priority)
    SELECT j.job_type, NEW.id,
           CASE NEW.action WHEN 'password_recovery' THEN 0 ELSE 1 END
      FROM jobs AS j;
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

-- Statistics now, not at autovacuum's convenience: a large backfill planned
-- with none could be read whole and sorted by every claim.
ANALYZE deliveries;
