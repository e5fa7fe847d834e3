-- Migration 2: the fleet.  One row per running consumer (a supervisor's
-- collector) of a queue, on any host: who it is, since when, when it was last
-- heard of, how much it has claimed.  The collector registers at start,
-- refreshes its row every few seconds and deletes it at a clean exit
-- (mailroom.ledger.fleet); a row not refreshed for a while belongs to a
-- consumer that died or lost the database, and is shown stale.  Nothing in
-- the delivery path reads this table.  The runner wraps this file in one
-- transaction.

CREATE TABLE consumers (
    id           BIGSERIAL PRIMARY KEY,
    job_type     job_type NOT NULL REFERENCES jobs (job_type) ON DELETE CASCADE,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT statement_timestamp(),
    last_seen_at TIMESTAMPTZ NOT NULL DEFAULT statement_timestamp(),
    -- Totals since started_at, as the consumer counts them.
    batches      BIGINT NOT NULL DEFAULT 0,
    rows         BIGINT NOT NULL DEFAULT 0
);

-- The monitor lists a queue's consumers; a restarted process replaces its
-- predecessor's row found by (queue, host, pid).
CREATE INDEX consumers_job_type_host_pid_idx ON consumers (job_type, host, pid);
