-- Migration 3: what became of each email (DESIGN.md 11).  SES delivery events
-- (delivered, bounced, complained, ...) come back through SNS and SQS; the
-- events worker (mailroom.events) records them here through
-- mailroom.ledger.events.  The runner wraps this file in one transaction.

-- In ascending precedence, so GREATEST() and max() pick the feedback a
-- delivery shows whatever order its events arrive in: a complaint outranks a
-- bounce, which outranks everything else; a delay is the weakest word.
CREATE TYPE delivery_feedback AS ENUM
    ('delayed', 'delivered', 'soft_bounced', 'render_failed', 'rejected', 'bounced', 'complained');

-- NULL until an event arrives.  No index and no default: adding the column is
-- a catalogue change (no rewrite of a large ledger), and its updates stay HOT.
ALTER TABLE deliveries ADD COLUMN feedback delivery_feedback;

-- One row per event and recipient.  (job_type, token) is the delivery, NULL
-- while none matches (an event for another sender on the same configuration
-- set, or one that came before the outcome that records its MessageId; the
-- events worker matches those again for a while).  No foreign key: like
-- delivery_queue, so that deleting a token never locks events, and so that
-- the events outlive the delivery as a record of what SES said.
CREATE TABLE delivery_events (
    id          BIGSERIAL PRIMARY KEY,
    job_type    job_type,
    token       BIGINT,
    message_id  TEXT NOT NULL,                 -- SES MessageId
    recipient   TEXT NOT NULL,                 -- as SES reports it
    type        delivery_feedback NOT NULL,
    subtype     TEXT,                          -- Permanent, Transient, abuse, MailboxFull, ...
    event_at    TIMESTAMPTZ NOT NULL,          -- when SES says it happened
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT statement_timestamp(),
    diagnostic  TEXT,                          -- short: "5.1.1 user unknown"
    raw         TEXT,                          -- the event's JSON, capped by the writer
    -- The event's identity: SQS delivers at least once, and a redelivered
    -- event must change nothing (DESIGN.md 11).
    CONSTRAINT delivery_events_identity UNIQUE (message_id, recipient, type, event_at)
);

-- The story of one delivery (`mailroom deliveries`).
CREATE INDEX delivery_events_delivery_idx ON delivery_events (token, job_type) WHERE token IS NOT NULL;
-- Rates and latest bounces over the last 24 hours.
CREATE INDEX delivery_events_event_at_idx ON delivery_events (event_at);
-- Unmatched events, matched again while young.
CREATE INDEX delivery_events_unmatched_idx ON delivery_events (recorded_at) WHERE token IS NULL;

-- Addresses never sent to again.  address is normalised as
-- mailroom.addresses.normalise does (local part as is, domain lower-cased in its
-- ASCII IDNA form); address_unicode is the same with the domain in its Unicode
-- form.  A claim compares an account's email (domain lower-cased) with both:
-- SQL cannot convert IDNA, so the writer stores both forms.
CREATE TABLE suppressions (
    address         TEXT PRIMARY KEY,
    address_unicode TEXT NOT NULL,
    reason          TEXT NOT NULL,             -- bounced, complained, operator
    detail          TEXT,                      -- the diagnostic, or the operator's note
    event_id        BIGINT REFERENCES delivery_events (id) ON DELETE SET NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT statement_timestamp(),
    created_by      TEXT NOT NULL              -- 'ses', or the operator
);
CREATE INDEX suppressions_address_unicode_idx ON suppressions (address_unicode);

-- Who added or removed an address by hand, and when (`mailroom suppression add|remove`).
CREATE TABLE suppression_audit (
    id      BIGSERIAL PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL DEFAULT statement_timestamp(),
    action  TEXT NOT NULL CHECK (action IN ('add', 'remove')),
    address TEXT NOT NULL,
    reason  TEXT,
    actor   TEXT NOT NULL
);
