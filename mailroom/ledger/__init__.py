"""The delivery ledger: everything that talks to it.

- :mod:`~mailroom.ledger.operations`: what the workers run (claim, record outcomes,
  release, lease expiry, status), re-exported here: ``ledger.claim(...)``.
- :mod:`~mailroom.ledger.connection`: a connection's schema and queue checks and
  session settings (re-exported too), and how statements run on it.
- :mod:`~mailroom.ledger.sql`: the statements those operations run.
- :mod:`~mailroom.ledger.migrate`: ``mailroom migrate``, golang-migrate compatible.
- :mod:`~mailroom.ledger.report`: ``mailroom status``.
- :mod:`~mailroom.ledger.admin`: operators' lookups and changes (deliveries of an
  address, counts, failure groups, retry, skip); :mod:`~mailroom.ledger.commands`
  puts them on the command line (``mailroom deliveries|retry|skip``).
"""

from mailroom.ledger.connection import (
    SchemaError,
    check_queue,
    check_schema,
    configure_session,
    mark_pooled,
)
from mailroom.ledger.operations import (
    STATUSES,
    Claim,
    claim,
    mark_emitted,
    next_due_in,
    queue_stats,
    record_claims,
    record_outcomes,
    release,
    renew,
    requeue_expired,
    status,
)

__all__ = [
    "STATUSES", "Claim", "SchemaError",
    "check_queue", "check_schema", "claim", "configure_session", "mark_emitted", "mark_pooled", "next_due_in",
    "queue_stats", "record_claims", "record_outcomes", "release", "renew", "requeue_expired", "status",
]
