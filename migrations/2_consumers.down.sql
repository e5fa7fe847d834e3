-- Reverts migration 2: drops the fleet table.  The runner wraps this file in
-- one transaction.

DROP TABLE IF EXISTS consumers;
