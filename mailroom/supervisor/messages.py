"""Messages on the supervisor's pipes: one small frozen class per message.

::

    collector -> supervisor   Ready, Heartbeat, Claimed
    supervisor -> sender      SendBatch, Stop
    sender -> supervisor      Ready, Heartbeat, BatchOutcomes
    supervisor -> collector   Adopt, RecordOutcomes, Release, Drain, Stop

The supervisor routes them without understanding the wire format or touching the
database, so this module imports neither psycopg nor boto3.  ``claimed_at`` (the
claim's timestamp, opaque here) travels with a batch so that a late outcome only
changes the claim it belongs to, never a later claim of the same rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mailroom.vocabulary import TokenOutcomes

#: Seconds between heartbeats; a worker silent for ``MAILROOM_WORKER_TIMEOUT`` is killed.
HEARTBEAT_INTERVAL = 1.0

_message = dataclasses.dataclass(frozen=True, slots=True)


@_message
class Ready:
    """The worker is up: connected, schema checked (collector) or client made (sender)."""


@_message
class Heartbeat:
    """The worker's loop is alive; ``stats`` carries what only the worker knows
    (queue depth, SES quota, RSS, ...), or is empty."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@_message
class Claimed:
    """collector -> supervisor: a batch whose claim is committed, to be sent."""

    batch_id: str
    line: bytes  # the wire format
    token_ids: list[int]
    activation: int
    recovery: int
    claimed_at: Any  # the claim's timestamp, echoed back to the collector


@_message
class SendBatch:
    """supervisor -> sender: send this batch, answer with :class:`BatchOutcomes`."""

    batch_id: str
    line: bytes
    token_ids: list[int]


@_message
class BatchOutcomes:
    """sender -> supervisor: one outcome per token of a batch."""

    batch_id: str
    outcomes: TokenOutcomes


@_message
class Adopt:
    """supervisor -> a new collector: batches in flight that a former one claimed."""

    batch_ids: list[str]


@_message
class RecordOutcomes:
    """supervisor -> collector: write these outcomes to the ledger."""

    batch_id: str
    outcomes: TokenOutcomes
    claimed_at: Any


@_message
class Release:
    """supervisor -> collector: these rows were never sent; queue them again."""

    batch_id: str
    token_ids: list[int]
    claimed_at: Any


@_message
class Drain:
    """supervisor -> collector: stop claiming (shutdown has begun)."""


@_message
class Stop:
    """supervisor -> worker: finish (the sender: within ``timeout`` s) and exit 0."""

    timeout: float = 0.0
