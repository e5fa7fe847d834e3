"""Messages on the supervisor's pipes, and the events it publishes: one small frozen class each.

::

    collector -> supervisor   Ready, Heartbeat(CollectorStats), Claimed, Recorded, ClaimingSet
    events -> supervisor      Ready, Heartbeat(EventsStats)
    supervisor -> sender      SendBatch, SetRate, Stop
    sender -> supervisor      Ready, Heartbeat(SenderStats), BatchOutcomes, Window, HoldActions
    supervisor -> collector   Adopt, RecordOutcomes, Release, Drain, SetClaiming,
                              Window, HoldActions, Stop
    supervisor -> control     BatchClaimed, BatchDispatched, BatchDone, Tick (with WorkerInfo,
                              SesQuota, TemplateState), WorkerStarted, WorkerExited,
                              StateChanged, AccountPaused, TemplatesChanged: events, as JSON
                              through :meth:`Payload.payload`

Window and HoldActions are the sender's, passed on to the collector unchanged;
SetClaiming and SetRate are an operator's (:mod:`mailroom.supervisor.operator`).
The events are serialised in one place (:meth:`Payload.payload`), and the monitor
reads their fields by the names declared here (it may stay tolerant of fields
it does not know, and of a supervisor that leaves some out).

The supervisor routes them without understanding the wire format or touching the
database, so this module imports neither psycopg nor boto3.  ``claimed_at`` (the
claim's timestamp, opaque here) travels with a batch so that a late outcome only
changes the claim it belongs to, never a later claim of the same rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mailroom.vocabulary import Action, BatchState, RestartReason, Role, RunState, SesResult, TokenOutcomes, WorkerState

#: Seconds between heartbeats; a worker silent for ``MAILROOM_WORKER_TIMEOUT`` is killed.
HEARTBEAT_INTERVAL = 1.0
#: Batches the collector claims ahead until the sender's first :class:`Window`
#: arrives, and the least the sender ever asks for.
FIRST_WINDOW = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """The worker is up: connected, schema checked (collector) or client made (sender)."""


class Payload:
    """A message that leaves the supervisor as JSON (an event, a part of ``status``)."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every subclass is a dataclass

    def payload(self) -> dict[str, Any]:
        """The JSON object of this message: its fields by name, nested ones as objects,
        enum members as their plain values (``str`` subclasses: json writes the value)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class SesQuota(Payload):
    """The SES account as the sender knows it: ``GetSendQuota`` (None until read)
    and whether SES is being called (``paused``: the account is paused or the
    circuit open)."""

    max_send_rate: float | None = None
    max_24h_send: float | None = None
    sent_last_24h: float | None = None
    paused: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class CollectorStats:
    """What only the collector knows, in its heartbeat."""

    queue_depth: int | None = None
    oldest_queued_s: float | None = None  # age of the oldest queued row; None: none queued
    rss: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TemplateState(Payload):
    """One configured SES template as the sender last checked it (``ok`` False: its
    action's rows are held, ``reason`` says why)."""

    template: str
    action: str
    ok: bool
    reason: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SenderStats:
    """What only the sender knows, in its heartbeat."""

    rate_limit: float | None = None  # recipients/s in force; None: unlimited
    ses: SesQuota = SesQuota()
    rss: int | None = None
    #: The SES calls finished since the previous heartbeat: how each ended, how long it took.
    calls: tuple[tuple[SesResult, float], ...] = ()
    templates: tuple[TemplateState, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class EventsStats:
    """What the events worker did since its previous heartbeat."""

    received: int = 0
    recorded: dict[str, int] = dataclasses.field(default_factory=dict)  # new events by feedback type
    unmatched: int = 0
    unparsable: int = 0
    ignored: int = 0
    suppressed: int = 0
    rematched: int = 0
    lag_s: float | None = None  # SES event time -> recorded, the latest batch's largest
    deliverability: dict[str, Any] | None = None  # 24-hour bounce and complaint rates, suppressions
    rss: int | None = None


#: What a worker's heartbeat carries.
WorkerStats = CollectorStats | SenderStats | EventsStats


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """The worker's loop is alive; ``stats`` carries what only the worker knows."""

    stats: WorkerStats | None = None


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
    """supervisor -> collector: an operator paused (False) or resumed (True) claims.
    The collector answers :class:`ClaimingSet` with the same ``seq``."""

    enabled: bool
    seq: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimingSet:
    """collector -> supervisor: :class:`SetClaiming` ``seq`` holds.  The collector makes
    its claims in the thread that read it, so every claim made before it is ahead of
    this on the pipe: a drain that saw it and an empty router is done."""

    seq: int


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


# -- events (supervisor -> control socket) ------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class BatchClaimed(Payload):
    """``batch.claimed``: a committed claim, on its way to the sender."""

    EVENT: ClassVar[str] = "batch.claimed"
    batch: str
    rows: int
    activation: int
    recovery: int


@dataclasses.dataclass(frozen=True, slots=True)
class BatchDispatched(Payload):
    """``batch.dispatched``: the sender has the batch."""

    EVENT: ClassVar[str] = "batch.dispatched"
    batch: str


@dataclasses.dataclass(frozen=True, slots=True)
class BatchDone(Payload):
    """``batch.done``: a batch's end; ``sent`` counts printed rows too (debug mode),
    ``error`` is the first error of a row not sent, ``ms`` claim to last outcome."""

    EVENT: ClassVar[str] = "batch.done"
    batch: str
    rows: int
    activation: int
    recovery: int
    sent: int
    failed: int
    retry: int
    skipped: int
    held: int  # not sent: the action's template is missing or does not render
    ms: float
    error: str | None
    state: BatchState


#: What the router reports of a batch.
BatchEvent = BatchClaimed | BatchDispatched | BatchDone


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerInfo(Payload):
    """One worker slot, as ``status`` and ``tick`` report it (times: epoch seconds)."""

    worker: str
    pid: int | None
    up: bool
    state: str
    uptime_s: float | None
    started: float
    restarts: int
    last_heartbeat_s: float
    last_heartbeat: float
    rss: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Tick(Payload):
    """``tick``, once a second: rates, the workers, in flight, the queue, SES."""

    EVENT: ClassVar[str] = "tick"
    sent_per_s: float
    failed_per_s: float
    workers: dict[str, WorkerInfo]
    in_flight: int
    queue_depth: int | None
    oldest_queued_s: float | None
    rate_limit: float | None
    rate_cap: float | None  # the send quota: MAILROOM_SES_MAX_SEND_RATE, else SES's MaxSendRate
    ses: SesQuota
    templates: list[TemplateState] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStarted(Payload):
    """``worker.started``: a worker process is up; ``restarts`` before it, ``started``
    in epoch seconds."""

    EVENT: ClassVar[str] = "worker.started"
    worker: Role
    pid: int
    restarts: int
    started: float
    state: WorkerState = WorkerState.RUNNING


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerExited(Payload):
    """``worker.exited``: how it ended (``exit``, in words), whether it comes back, and
    why (``reason``; None when it does not: the supervisor is stopping)."""

    EVENT: ClassVar[str] = "worker.exited"
    worker: Role
    pid: int
    exit: str
    restarting: bool
    reason: RestartReason | None = None
    state: WorkerState = WorkerState.EXITED


#: What the arbiter reports of its workers.
WorkerEvent = WorkerStarted | WorkerExited


@dataclasses.dataclass(frozen=True, slots=True)
class StateChanged(Payload):
    """``state.changed``: the run state, what is paused, and the automatic pause's reason."""

    EVENT: ClassVar[str] = "state.changed"
    state: RunState
    paused: dict[str, bool]
    paused_reason: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class AccountPaused(Payload):
    """``account.paused``: the supervisor paused claims itself (``MAILROOM_PAUSE_*_RATE``):
    why, in words, and the 24-hour deliverability it judged."""

    EVENT: ClassVar[str] = "account.paused"
    reason: str
    deliverability: dict[str, Any] | None


@dataclasses.dataclass(frozen=True, slots=True)
class TemplatesChanged(Payload):
    """``templates.changed``: the sender's check of the templates came out differently."""

    EVENT: ClassVar[str] = "templates.changed"
    templates: list[TemplateState]


#: Every event the supervisor publishes (``control.protocol.EVENTS`` names them too,
#: with the server's own ``audit``).
Event = (BatchClaimed | BatchDispatched | BatchDone | Tick | WorkerStarted | WorkerExited | StateChanged
         | AccountPaused | TemplatesChanged)
