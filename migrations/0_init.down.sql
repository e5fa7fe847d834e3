-- Reverts migration 0: drops everything 0_init.up.sql created, in reverse
-- order.  The runner wraps this file in one transaction.

DROP TRIGGER IF EXISTS tokens_notify_insert ON tokens;
DROP TRIGGER IF EXISTS tokens_activate_account ON tokens;
DROP TRIGGER IF EXISTS accounts_track_status_change ON accounts;
DROP TRIGGER IF EXISTS accounts_create_activation_token ON accounts;

DROP FUNCTION IF EXISTS tokens_notify_insert();
DROP FUNCTION IF EXISTS tokens_activate_account();
DROP FUNCTION IF EXISTS accounts_track_status_change();
DROP FUNCTION IF EXISTS accounts_create_activation_token();

DROP INDEX IF EXISTS jobs_last_seq_job_type_idx;
DROP INDEX IF EXISTS tokens_id_expires_at_consumed_at_action_idx;
DROP INDEX IF EXISTS tokens_account_idx;
DROP INDEX IF EXISTS accounts_id_status_idx;

DROP TABLE IF EXISTS jobs;
DROP TABLE IF EXISTS tokens;
DROP TABLE IF EXISTS accounts;

DROP TYPE IF EXISTS job_type;
DROP TYPE IF EXISTS token_action;
DROP TYPE IF EXISTS account_status;

-- Whichever gen_random_bytes() the up migration provided: pgcrypto, or the
-- stand-in built from core functions where pgcrypto was not available (a plain
-- DROP FUNCTION would fail where the function belongs to the extension).
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pgcrypto') THEN
        DROP EXTENSION pgcrypto;
    ELSE
        DROP FUNCTION IF EXISTS gen_random_bytes(integer);
    END IF;
END;
$do$;
