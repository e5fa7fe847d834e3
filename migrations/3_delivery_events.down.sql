-- Reverts migration 3: drops delivery events, suppressions and the delivery's
-- feedback.  The runner wraps this file in one transaction.

DROP TABLE IF EXISTS suppression_audit;
DROP TABLE IF EXISTS suppressions;
DROP TABLE IF EXISTS delivery_events;
ALTER TABLE deliveries DROP COLUMN IF EXISTS feedback;
DROP TYPE IF EXISTS delivery_feedback;
