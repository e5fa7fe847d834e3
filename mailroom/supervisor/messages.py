"""Messages on the supervisor's pipes: one small frozen class per message.

::

    collector -> supervisor   Ready, Heartbeat, Claimed, Recorded
    supervisor -> sender      SendBatch, SetRate, Stop
    sender -> supervisor      Ready, Heartbeat, BatchOutcomes, Window, HoldActions
    supervisor -> collector   Adopt, RecordOutcomes, Release, Drain, SetClaiming,
                              Window, HoldActions, Stop

Window and HoldActions are the sender's, passed on to the collector unchanged;
SetClaiming and SetRate are an operator's (:mod:`mailroom.supervisor.operator`).

The supervisor routes them without understanding the wire format or touching the
database, so this module imports neither psycopg nor boto3.  ``claimed_at`` (the
claim's timestamp, opaque here) travels with a batch so that a late outcome only
changes the claim it belongs to, never a later claim of the same rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mailroom.vocabulary import Action, TokenOutcomes

#: Seconds between heartbeats; a worker silent for ``MAILROOM_WORKER_TIMEOUT`` is killed.
HEARTBEAT_INTERVAL = 1.0
#: Batches the collector claims ahead until the sender's first :class:`Window`
#: arrives, and the least the sender ever asks for.
FIRST_WINDOW = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """The worker is up: connected, schema checked (collector) or client made (sender)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """The worker's loop is alive; ``stats`` carries what only the worker knows
    (queue depth, SES quota, RSS, ...), or is empty."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed:
    """collector -> supervisor: a batch whose claim is committed, to be sent."""

    batch_id: str
    line: bytes  # the wire format
    token_ids: list[int]
    activation: int
    recovery: int
    claimed_at: Any  # the claim's timestamp, echoed back to the collector


@dataclasses.dataclass(frozen=True, slots=True)
class SendBatch:
    """supervisor -> sender: send this batch, answer with :class:`BatchOutcomes`."""

    batch_id: str
    line: bytes
    token_ids: list[int]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchOutcomes:
    """sender -> supervisor: one outcome per token of a batch."""

    batch_id: str
    outcomes: TokenOutcomes


@dataclasses.dataclass(frozen=True, slots=True)
class Window:
    """sender -> supervisor -> collector: batches to keep claimed ahead, so that the
    calls the sender may have in flight can be full (``MAILROOM_MAX_IN_FLIGHT`` bounds it)."""

    batches: int


@dataclasses.dataclass(frozen=True, slots=True)
class Adopt:
    """supervisor -> a new collector: batches in flight that a former one claimed.

    ``claims`` gives each one's token ids and ``claimed_at``, so the new
    collector renews their leases as if it had claimed them itself."""

    batch_ids: list[str]
    claims: dict[str, tuple[list[int], Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """collector -> supervisor: the outcomes (or releases) of these batches are
    committed to the ledger; until then the supervisor keeps them, and hands
    them to the next collector if this one dies.  ``latencies``: each row
    recorded ``sent``, its action and seconds from its creation to now."""

    batch_ids: list[str]
    latencies: list[tuple[Action, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class RecordOutcomes:
    """supervisor -> collector: write these outcomes to the ledger."""

    batch_id: str
    outcomes: TokenOutcomes
    claimed_at: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    """supervisor -> collector: these rows were never sent; queue them again."""

    batch_id: str
    token_ids: list[int]
    claimed_at: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Drain:
    """supervisor -> collector: stop claiming (shutdown has begun)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    """supervisor -> worker: finish (the sender: within ``timeout`` s) and exit 0."""

    timeout: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class SetClaiming:
    """supervisor -> collector: an operator paused (False) or resumed (True) claims."""

    enabled: bool


@dataclasses.dataclass(frozen=True, slots=True)
class HoldActions:
    """sender -> supervisor -> collector: claim no rows of these actions (their
    template is missing or does not render; empty: claim every action).  Sent
    when it changes and with every heartbeat, like :class:`Window`."""

    actions: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SetRate:
    """supervisor -> sender: an operator's send-rate limit (recipients/s)."""

    per_second: float
