-- Migration 0: the original mailroom schema (accounts, tokens, jobs, triggers).
--
-- A database set up for the original C collector is already at this version, so
-- names, types and defaults must stay exactly as they were: applications write
-- these tables directly.  The runner wraps this file in one transaction
-- (golang-migrate runs it as one multi-statement Exec, which is one implicit
-- transaction too), so there is no BEGIN/COMMIT here.

-- gen_random_bytes() for token secrets and codes: pgcrypto's where the server
-- has it (as the original required, so its databases read as this version),
-- else a function of the same signature built from core functions (servers
-- shipped without contrib, such as the embedded one of `mailroom demo`).
--
-- The stand-in takes its bytes from gen_random_uuid() (PostgreSQL 13+), which
-- reads the server's strong random source like pgcrypto does.  A version-4 UUID
-- has 122 random bits: byte 6 holds the version nibble and byte 8 the variant
-- bits, so those two bytes are left out and each UUID gives its 14 fully random
-- bytes, concatenated as they come (no hashing needed: every byte is uniform).
-- It refuses the lengths pgcrypto refuses (1..1024 only).
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgcrypto') THEN
        CREATE EXTENSION IF NOT EXISTS pgcrypto;
    ELSE
        CREATE FUNCTION gen_random_bytes(integer) RETURNS bytea
        LANGUAGE plpgsql VOLATILE STRICT PARALLEL SAFE AS $fn$
        DECLARE
            out bytea := ''::bytea;
            u   bytea;
        BEGIN
            IF $1 < 1 OR $1 > 1024 THEN
                RAISE EXCEPTION 'Length not in range' USING ERRCODE = 'invalid_parameter_value';
            END IF;
            WHILE length(out) < $1 LOOP
                u := uuid_send(gen_random_uuid());
                out := out || substring(u FROM 1 FOR 6) || substring(u FROM 8 FOR 1)
                           || substring(u FROM 10 FOR 7);
            END LOOP;
            RETURN substring(out FROM 1 FOR $1);
        END;
        $fn$;
    END IF;
END;
$do$;

CREATE TYPE account_status AS ENUM ('provisioned', 'active', 'suspended');
CREATE TYPE token_action AS ENUM ('activation', 'password_recovery');
CREATE TYPE job_type AS ENUM ('mailroom');

-- Times are INTEGER epoch seconds, as the original stored them.
CREATE TABLE accounts (
    id                BIGSERIAL PRIMARY KEY,
    email             VARCHAR(254) UNIQUE NOT NULL,
    status            account_status NOT NULL DEFAULT 'provisioned',
    login             VARCHAR(254) UNIQUE NOT NULL,
    created_at        INTEGER NOT NULL DEFAULT EXTRACT(EPOCH FROM NOW()),
    status_changed_at INTEGER,
    activated_at      INTEGER,
    suspended_at      INTEGER,
    unsuspended_at    INTEGER
);

CREATE INDEX accounts_id_status_idx ON accounts (id, status);

CREATE TABLE tokens (
    id          BIGSERIAL PRIMARY KEY,
    action      token_action NOT NULL,
    secret      BYTEA UNIQUE NOT NULL DEFAULT gen_random_bytes(32),
    -- A number 0..99999, zero-padded to 5 digits.  It is drawn from the
    -- server's CSPRNG (gen_random_bytes) rather than random(): the code is part of what a password
    -- recovery link proves, so it must not be predictable from the PRNG state
    -- (2^32 mod 100000 makes the modulo bias negligible).
    code        VARCHAR(5) DEFAULT lpad(
                    ((('x' || encode(gen_random_bytes(4), 'hex'))::bit(32)::bigint) % 100000)::text,
                    5, '0'),
    -- Deferred so that the accounts BEFORE INSERT trigger can insert the
    -- activation token before the account row itself exists.
    account     BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE
                    DEFERRABLE INITIALLY DEFERRED,
    expires_at  INTEGER NOT NULL DEFAULT EXTRACT(EPOCH FROM NOW() + INTERVAL '15 minutes'),
    consumed_at INTEGER,
    created_at  INTEGER NOT NULL DEFAULT EXTRACT(EPOCH FROM NOW())
);

CREATE INDEX tokens_account_idx ON tokens (account);
CREATE INDEX tokens_id_expires_at_consumed_at_action_idx
    ON tokens (id, expires_at, consumed_at, action);

-- In the original, last_seq was the consumer's cursor: the highest token id
-- handed out.  mailroom keeps it as a high-water mark.
CREATE TABLE jobs (
    job_type job_type PRIMARY KEY,
    last_seq BIGINT
);

CREATE INDEX jobs_last_seq_job_type_idx ON jobs (last_seq, job_type);

INSERT INTO jobs (job_type, last_seq) VALUES ('mailroom', 0);

-- 1. A new provisioned account gets an activation token.
CREATE FUNCTION accounts_create_activation_token() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'provisioned' THEN
        INSERT INTO tokens (action, account) VALUES ('activation', NEW.id);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER accounts_create_activation_token
    BEFORE INSERT ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_create_activation_token();

-- 2. Status changes stamp the matching *_at columns.
CREATE FUNCTION accounts_track_status_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    now_epoch INTEGER := EXTRACT(EPOCH FROM NOW());
BEGIN
    IF NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NEW;
    END IF;

    NEW.status_changed_at := now_epoch;

    IF NEW.status = 'active' THEN
        IF OLD.status = 'provisioned' THEN
            NEW.activated_at := now_epoch;
        ELSIF OLD.status = 'suspended' THEN
            NEW.unsuspended_at := now_epoch;
            NEW.suspended_at := NULL;
            -- Lifting a suspension must not skip activation.
            IF NEW.activated_at IS NULL THEN
                NEW.status := 'provisioned';
            END IF;
        END IF;
    ELSIF NEW.status = 'suspended' THEN
        NEW.suspended_at := now_epoch;
        NEW.unsuspended_at := NULL;
    END IF;

    RETURN NEW;
END;
$$;

CREATE TRIGGER accounts_track_status_change
    BEFORE UPDATE OF status ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_track_status_change();

-- 3. Consuming an activation token activates a provisioned account.
CREATE FUNCTION tokens_activate_account() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.action = 'activation' THEN
        UPDATE accounts SET status = 'active'
         WHERE id = NEW.account AND status = 'provisioned';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tokens_activate_account
    AFTER UPDATE OF consumed_at ON tokens
    FOR EACH ROW
    WHEN (OLD.consumed_at IS NULL AND NEW.consumed_at IS NOT NULL)
    EXECUTE FUNCTION tokens_activate_account();

-- 4. Every new token wakes the LISTENing collector (no payload).
CREATE FUNCTION tokens_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NOTIFY token_insert;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tokens_notify_insert
    AFTER INSERT ON tokens
    FOR EACH ROW EXECUTE FUNCTION tokens_notify_insert();
