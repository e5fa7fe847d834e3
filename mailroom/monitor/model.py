"""The monitor's own typed state, and the one adapter from the control socket's JSON to it.

Everything the supervisor sends (the ``subscribe``/``status`` snapshot and the
events of OPERATIONS.md section 2) enters the monitor through :class:`MonitorState`:
:meth:`MonitorState.apply_event` and :meth:`MonitorState.apply_snapshot`.  Field
names inside ``data`` are read here and nowhere else, and they are those of the
supervisor's own event types (:mod:`mailroom.supervisor.messages`: ``BatchDone``,
``Tick``, ``SesQuota``, ``WorkerInfo``), so a renamed field shows in both at once.

Nothing here raises on what it receives: a missing field keeps its default, a
value of the wrong type is ignored (``"12"`` is accepted as 12, ``"x"`` is not),
unknown events are logged in the event list and otherwise ignored.
"""

# A little past the house's ~400 lines: every payload of the socket is read here and
# nowhere else (batches, ticks, workers, the supervisor itself, the batch reply), which
# is what keeps a renamed field a change in one module; split, it would be in several.

from __future__ import annotations

import datetime as dt
import json
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mailroom.monitor.coerce import as_bool, as_epoch, as_float, as_int, as_str
from mailroom.monitor.coerce import as_dict as _dict
from mailroom.supervisor import messages as msg
from mailroom.vocabulary import BATCH_STATES, RUN_STATES, BatchState, OutcomeKind, Pausable, WorkerState, batch_state

__all__ = [
    "BATCH_COUNTS", "BATCH_STATES", "MAX_BATCHES", "SES_NUMBERS", "RUN_STATES", "SUPERVISOR", "Batch", "Destination",
    "EventLine",
    "MonitorState", "Tick", "Worker", "as_bool", "as_epoch", "as_float", "as_int", "as_str", "destinations",
]

#: The live table keeps this many batches (the newest).
MAX_BATCHES = 500
#: Seconds of tick history behind the sparklines (5 minutes at one tick a second).
HISTORY_S = 300
#: The supervisor's row on the Processes screen (its workers are named by their role).
SUPERVISOR = "supervisor"
#: Lines kept on the events screen.
MAX_EVENT_LINES = 1000


def _fields(kind: type[msg.Payload], annotation: str) -> tuple[str, ...]:
    """The fields of one of the supervisor's event types declared ``annotation``."""
    return tuple(f.name for f in fields(kind) if f.type == annotation)


#: The row counts of ``batch.done`` (rows, activation, recovery, sent, failed, retry, skipped).
BATCH_COUNTS = _fields(msg.BatchDone, "int")
#: The numbers of a tick's ``ses`` (max_send_rate, max_24h_send, sent_last_24h).
SES_NUMBERS = _fields(msg.SesQuota, "float | None")


# ------------------------------------------------------------- the types


@dataclass
class Batch:
    """One batch of the live table, keyed by its id."""

    id: str
    state: str = BatchState.CLAIMED
    rows: int = 0
    activation: int = 0
    recovery: int = 0
    sent: int = 0
    failed: int = 0
    retry: int = 0
    skipped: int = 0
    held: int = 0  # not sent: the action's template is held
    ms: float | None = None
    error: str | None = None
    #: When the batch was claimed (epoch s, from the supervisor's event or snapshot):
    #: ages count from it, so a monitor started or reconnected later shows the truth.
    claimed: float | None = None
    #: When this monitor first heard of it (epoch s): the age's base when no claim time came.
    heard: float = field(default_factory=time.time)

    def update(self, data: Mapping[str, Any]) -> None:
        """Take every known, well-typed field of a batch event's ``data``."""
        state = as_str(data.get("state"))
        if state:
            self.state = state[:20]
        for name in BATCH_COUNTS:
            value = as_int(data.get(name))
            if value is not None and value >= 0:
                setattr(self, name, value)
        ms = as_float(data.get("ms"))
        if ms is not None:
            self.ms = ms
        if "error" in data:
            self.error = as_str(data.get("error"), limit=300)
        claimed = as_epoch(data.get("claimed"))
        if claimed is not None:
            self.claimed = claimed


@dataclass
class Tick:
    """The latest ``tick``: rates, in flight, queue, SES quota."""

    sent_per_s: float = 0.0
    failed_per_s: float = 0.0
    in_flight: int | None = None
    queue_depth: int | None = None
    oldest_queued_s: float | None = None
    rate_limit: float | None = None
    rate_cap: float | None = None  # the send quota: MAILROOM_SES_MAX_SEND_RATE, else SES's
    max_send_rate: float | None = None
    max_24h_send: float | None = None
    sent_last_24h: float | None = None
    ses_paused: bool = False
    #: Templates the sender holds (missing or not rendering): (template, reason).
    templates_held: list[tuple[str, str]] = field(default_factory=list)

    def update(self, data: Mapping[str, Any]) -> None:
        """Take the known fields of a tick (or of a snapshot's same-named fields)."""
        for name in ("sent_per_s", "failed_per_s"):
            value = as_float(data.get(name))
            if value is not None and value >= 0:
                setattr(self, name, value)
        for name in ("in_flight", "queue_depth"):
            value = as_int(data.get(name))
            if value is not None:
                setattr(self, name, value)
        for name in ("oldest_queued_s", "rate_limit", "rate_cap"):
            if name in data:
                setattr(self, name, as_float(data.get(name)))
        ses = _dict(data.get("ses"))
        for name in SES_NUMBERS:
            if name in ses:
                setattr(self, name, as_float(ses.get(name)))
        paused = as_bool(ses.get("paused"))
        if paused is not None:
            self.ses_paused = paused
        templates = data.get("templates")
        if isinstance(templates, list):
            self.templates_held = [(str(t.get("template")), str(t.get("reason") or "does not render"))
                                   for t in templates if isinstance(t, Mapping) and t.get("ok") is False]


@dataclass
class Worker:
    """One process of the supervisor's tree."""

    name: str
    pid: int | None = None
    state: str = "?"
    #: Epoch seconds (the socket may send a number or an ISO-8601 string).
    started: float | None = None
    restarts: int = 0
    last_heartbeat: float | None = None
    rss: int | None = None

    def update(self, data: Mapping[str, Any]) -> None:
        """Take the known fields of a worker event or snapshot entry."""
        pid = as_int(data.get("pid"))
        if pid is not None:
            self.pid = pid
        state = as_str(data.get("state"), limit=30)
        if state:
            self.state = state
        restarts = as_int(data.get("restarts"))
        if restarts is not None:
            self.restarts = restarts
        for name in ("started", "last_heartbeat"):
            if name in data:
                setattr(self, name, as_epoch(data.get(name)))
        rss = as_int(data.get("rss"))
        if rss is not None:
            self.rss = rss


@dataclass
class EventLine:
    """One line of the events screen; its text is made when first shown (most never are)."""

    seq: int | None
    ts: str
    event: str
    data: Mapping[str, Any]

    @property
    def text(self) -> str:
        """The event's data on one short line."""
        return _summary(self.data)


# ------------------------------------------------------------- the state


class MonitorState:
    """Everything the live screens show, built from the snapshot and events."""

    def __init__(self) -> None:
        self.batches: OrderedDict[str, Batch] = OrderedDict()
        self.tick = Tick()
        self.workers: dict[str, Worker] = {}
        self.run_state: str = "unknown"
        #: The supervisor itself (pid, start, RSS from the snapshot; its heartbeat is its ticks).
        self.supervisor = Worker(SUPERVISOR)
        self.paused_claims = False
        self.paused_sending = False
        #: Why the supervisor paused claims by itself (MAILROOM_PAUSE_*_RATE), None otherwise.
        self.paused_reason: str | None = None
        self.queue: str | None = None
        self.version: str | None = None
        self.sent_history: deque[float] = deque(maxlen=HISTORY_S)
        self.failed_history: deque[float] = deque(maxlen=HISTORY_S)
        # (monotonic time, failed count) of finished batches: "failed, last 15 min".
        self._failures: deque[tuple[float, int]] = deque()
        self.events: deque[EventLine] = deque(maxlen=MAX_EVENT_LINES)
        self.last_seq: int | None = None
        self.gap = False
        self.ignored = 0
        #: Events ever appended to ``events`` (the events screen writes the new ones).
        self.event_count = 0
        self.version_counter = 0

    # -- derived numbers for the big-number panel

    @property
    def sent_per_min(self) -> float:
        """Sent per minute: the mean of the last 60 ticks' sent/s, times 60."""
        recent = list(self.sent_history)[-60:]
        return 60.0 * sum(recent) / len(recent) if recent else 0.0

    def failed_last_15min(self, now: float | None = None) -> int:
        """Failed deliveries in batches finished in the last 15 minutes."""
        now = time.monotonic() if now is None else now
        while self._failures and self._failures[0][0] < now - 900:
            self._failures.popleft()
        return sum(n for _, n in self._failures)

    # -- input

    def apply_event(self, message: Any) -> bool:
        """Apply one event object; False when it was not a usable event (ignored)."""
        self.version_counter += 1
        if not isinstance(message, Mapping):
            self.ignored += 1
            return False
        name = as_str(message.get("event"), limit=40)
        if not name:
            self.ignored += 1
            return False
        seq = as_int(message.get("seq"))
        if seq is not None:
            if self.last_seq is not None and seq != self.last_seq + 1:
                # A gap means lost events: the caller asks for a new snapshot.
                self.gap = True
            self.last_seq = seq
        data = _dict(message.get("data"))
        ts = as_str(message.get("ts"), limit=40) or dt.datetime.now().isoformat(timespec="seconds")
        self.events.append(EventLine(seq, ts, name, data))
        self.event_count += 1
        handler = _HANDLERS.get(name)
        if handler is None:
            return True  # unknown event types are only listed
        handler(self, data)
        return True

    def apply_snapshot(self, snapshot: Any) -> None:
        """Replace what a snapshot (``subscribe`` result or ``status``) covers."""
        self.version_counter += 1
        snap = _dict(snapshot)
        self.queue = as_str(snap.get("queue"), self.queue, limit=60)
        self.version = as_str(snap.get("version"), self.version, limit=40)
        self._take_state(snap)
        self._take_supervisor(snap)
        self.tick.update(snap)
        self.tick.update(_dict(snap.get("tick")))
        workers = snap.get("workers")
        if isinstance(workers, Mapping):
            workers = [dict(_dict(v), worker=k) for k, v in workers.items()]
        if isinstance(workers, list):
            for entry in workers:
                self._take_worker(_dict(entry))
        batches = snap.get("batches") or snap.get("in_flight_batches")
        if isinstance(batches, list):
            for entry in batches:
                self._take_batch(_dict(entry))
        self.gap = False
        self.last_seq = as_int(snap.get("seq"), None)

    # -- handlers

    def _take_batch(self, data: Mapping[str, Any], state: str | None = None) -> Batch | None:
        batch_id = as_str(data.get("batch") if "batch" in data else data.get("id"), limit=60)
        if not batch_id:
            return None
        batch = self.batches.get(batch_id)
        if batch is None:
            batch = self.batches[batch_id] = Batch(batch_id)
            while len(self.batches) > MAX_BATCHES:
                self.batches.popitem(last=False)
        if state is not None:
            batch.state = state
        batch.update(data)
        return batch

    def _take_worker(self, data: Mapping[str, Any]) -> Worker | None:
        name = as_str(data.get("worker") or data.get("name"), limit=30)
        if not name:
            return None
        worker = self.workers.setdefault(name, Worker(name))
        worker.update(data)
        return worker

    def _take_supervisor(self, snap: Mapping[str, Any]) -> None:
        self.supervisor.update({name: snap[name] for name in ("pid", "started", "rss") if name in snap})
        self.supervisor.last_heartbeat = time.time()

    def _take_state(self, data: Mapping[str, Any]) -> None:
        state = as_str(data.get("state"), limit=30)
        if state:
            self.run_state = self.supervisor.state = state
        # state.changed carries paused_reason; a snapshot has it under guard.
        carrier = data if "paused_reason" in data else _dict(data.get("guard"))
        if "paused_reason" in carrier:
            self.paused_reason = as_str(carrier.get("paused_reason"), limit=300)
        paused = _dict(data.get("paused"))
        for key, attr in ((Pausable.CLAIMS, "paused_claims"), (Pausable.SENDING, "paused_sending")):
            value = as_bool(paused.get(key))
            if value is not None:
                setattr(self, attr, value)

    def _on_claimed(self, data: Mapping[str, Any]) -> None:
        self._take_batch(data, BatchState.CLAIMED)

    def _on_dispatched(self, data: Mapping[str, Any]) -> None:
        self._take_batch(data, BatchState.SENDING)

    def _on_done(self, data: Mapping[str, Any]) -> None:
        batch = self._take_batch(data, None)
        if batch is None:
            return
        if not as_str(data.get("state")):
            # No state given: derive it from the counts, as the supervisor does.
            batch.state = batch_state({OutcomeKind.SENT: batch.sent, OutcomeKind.FAILED: batch.failed,
                                       OutcomeKind.RETRY: batch.retry, OutcomeKind.SKIPPED: batch.skipped})
        if batch.failed:
            self._failures.append((time.monotonic(), batch.failed))

    def _on_worker(self, data: Mapping[str, Any], state: str) -> None:
        worker = self._take_worker(data)
        if worker is not None and not as_str(data.get("state")):
            worker.state = state

    def _on_templates(self, data: Mapping[str, Any]) -> None:
        # At once, not at the next tick: the banner says which template is held.
        self.tick.update({"templates": data.get("templates")})

    def _on_tick(self, data: Mapping[str, Any]) -> None:
        self.tick.update(data)
        self.supervisor.last_heartbeat = time.time()  # a tick is the supervisor's heartbeat
        workers = data.get("workers")  # uptime, heartbeat and RSS move every second
        if isinstance(workers, Mapping):
            workers = [dict(_dict(v), worker=k) for k, v in workers.items()]
        if isinstance(workers, list):
            for entry in workers:
                self._take_worker(_dict(entry))
        self.sent_history.append(self.tick.sent_per_s)
        self.failed_history.append(self.tick.failed_per_s)


def _summary(data: Mapping[str, Any]) -> str:
    """A short one-line rendering of an event's data for the events screen.

    A ``reason`` comes first, in words: ``account.paused`` carries the whole 24-hour
    deliverability beside it, which sorted first would fill the line and cut the
    reason off."""
    reason = data.get("reason")
    if isinstance(reason, str) and reason:
        data = {k: v for k, v in data.items() if k != "reason"}
    else:
        reason = None
    try:
        text = json.dumps(data, separators=(",", ":"), default=str, sort_keys=True)
    except (TypeError, ValueError):
        text = "?"
    if reason is not None:
        text = f"{reason}  {text}"
    return as_str(text, "", limit=200) or ""


_HANDLERS = {
    "batch.claimed": MonitorState._on_claimed,
    "batch.dispatched": MonitorState._on_dispatched,
    "batch.done": MonitorState._on_done,
    "worker.started": lambda s, d: s._on_worker(d, WorkerState.RUNNING),
    "worker.exited": lambda s, d: s._on_worker(d, WorkerState.EXITED),
    "state.changed": MonitorState._take_state,
    "tick": MonitorState._on_tick,
    "templates.changed": MonitorState._on_templates,
}


@dataclass
class Destination:
    """One destination of a batch (the ``batch {id}`` command's result)."""

    address: str
    action: str
    status: str
    message_id: str
    attempts: int | None
    error: str
    token: int | None = None


def destinations(result: Any) -> list[Destination]:
    """The destinations of a ``batch`` reply, whatever of it is usable."""
    res = _dict(result)
    entries = res.get("destinations")
    if not isinstance(entries, list):
        entries = _dict(res.get("batch")).get("destinations")
    out: list[Destination] = []
    for entry in entries if isinstance(entries, list) else []:
        d = _dict(entry)
        if not d:
            continue
        out.append(Destination(
            address=as_str(d.get("address") or d.get("email"), "", limit=254) or "",
            action=as_str(d.get("action"), "", limit=30) or "",
            status=as_str(d.get("status"), "", limit=30) or "",
            message_id=as_str(d.get("message_id") or d.get("MessageId"), "", limit=120) or "",
            attempts=as_int(d.get("attempts")),
            error=as_str(d.get("error"), "", limit=300) or "",
            token=as_int(d.get("token")),
        ))
    return out
