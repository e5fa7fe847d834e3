-- Reverts migration 1: puts back the original token-insert trigger function,
-- byte for byte as 0_init.up.sql created it, and drops the ledger.
-- jobs.last_seq has been kept as a high-water mark (exact whenever a drain
-- ends), so the original collector resumes after the highest token mailroom
-- claimed.
-- The runner wraps this file in one transaction.

CREATE OR REPLACE FUNCTION tokens_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NOTIFY token_insert;
    RETURN NULL;
END;
$$;

DROP TABLE IF EXISTS delivery_queue;
DROP TABLE IF EXISTS deliveries;
DROP TYPE IF EXISTS delivery_status;
