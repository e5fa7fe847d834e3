"""The operator's side of the supervisor: control socket commands, events, metrics.

:class:`Operator` sits beside the arbiter and the router in the supervisor's one
loop.  It owns the :class:`~mailroom.control.server.ControlServer` and the
:class:`~mailroom.control.metrics.MetricsServer` (both non-blocking, no thread),
answers commands (status, batches, pause/resume, drain, set_rate, restart,
shutdown), turns what the router and the arbiter see into events, and keeps the
Prometheus numbers.  Numbers only a worker knows arrive in its heartbeats.
"""

# A little past the house's ~400 lines: opening both listeners at start (with the
# one-line StartError), every command, the events and the gauges all read the same
# state of one supervisor; the control server and the metrics live in control/.

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Any

from mailroom import __version__, wire
from mailroom._process import rss_bytes
from mailroom.control.metrics import Metrics, MetricsServer
from mailroom.control.server import ControlServer, ControlSocketError, Request, default_socket_path
from mailroom.supervisor import messages as msg
from mailroom.supervisor.guard import AccountGuard
from mailroom.supervisor.router import Batch
from mailroom.supervisor.view import SupervisorView
from mailroom.vocabulary import (
    Action,
    BatchState,
    OutcomeKind,
    Pausable,
    RestartReason,
    Role,
    RunState,
    TokenOutcomes,
    WorkerState,
)

log = logging.getLogger("mailroom.supervisor")

#: Finished batches kept for ``batches`` / ``batch`` (the monitor's live table).
RECENT_BATCHES = 500
#: A batch held by "pause sending" goes back to the ledger once it has been
#: claimed this share of the lease: it must never expire into a duplicate.
HOLD_SHARE_OF_LEASE = 0.5
TICK_EVERY = 1.0
RATE_WINDOW_S = 10.0


class StartError(Exception):
    """A listener the supervisor opens at start cannot be opened (a configuration
    error: exit 2, never a restart loop); ``str()`` is one printable line."""


@dataclasses.dataclass
class _Recent:
    """One of the latest batches: what ``batches`` reports (the events' fields, the
    state, the claim time), and what ``batch {id}`` decodes once it is done."""

    data: dict[str, Any]
    line: bytes | None = None
    outcomes: TokenOutcomes = dataclasses.field(default_factory=list)


class Operator:
    """Commands, events and metrics for one supervisor (see the module docstring)."""

    def __init__(self, supervisor: SupervisorView) -> None:
        self.sup = supervisor
        self.settings = supervisor.settings
        self.metrics = Metrics(impl=wire.IMPL)
        self.control: ControlServer | None = None
        self.metrics_server: MetricsServer | None = None
        self.claims_paused = False
        #: The latest SetClaiming sent to a collector, and the latest it confirmed.
        self.claiming_seq = 0
        self.claiming_confirmed = 0
        #: When this supervisor started (epoch s): its own row of the monitor's Processes.
        self.started = time.time()
        # An operator's set_rate (recipients/s, as asked): held here so that a new
        # sender (a restart, a crash) gets it, instead of reverting to the quota.
        self.send_rate: float | None = None
        self.templates_held: list[tuple[str, str]] = []  # (template, reason) the sender holds
        self.recent: collections.OrderedDict[str, _Recent] = collections.OrderedDict()
        self.counters = collections.Counter[str]()
        #: The events worker's totals since this supervisor started (its heartbeats
        #: carry what changed since the last one); ``None`` without an events worker.
        self.events: dict[str, Any] | None = None
        if Role.EVENTS in supervisor.workers:
            self.events = {"received": 0, "recorded": collections.Counter[str](), "unmatched": 0,
                           "unparsable": 0, "ignored": 0, "suppressed": 0, "rematched": 0, "lag_s": None}
        #: The latest 24-hour deliverability the events worker read from the ledger.
        self.deliverability: dict[str, Any] | None = None
        self.guard = AccountGuard(self.settings.pause_bounce_rate, self.settings.pause_complaint_rate,
                                  self.settings.pause_min_sends)
        self.history: collections.deque[tuple[float, int, int]] = collections.deque()
        self.drains: list[tuple[Request, float, float]] = []
        self.started_at = time.monotonic()
        self.ticked_at = 0.0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Open the metrics listener and the control socket; :class:`StartError` (one
        printable line) when either cannot be opened, with nothing left open."""
        s = self.settings
        try:
            # Metrics first: a busy port then fails before any socket file exists.
            if s.metrics_addr:
                self.metrics_server = MetricsServer(s.metrics_addr, self.metrics.render)
                try:
                    self.metrics_server.start()
                except OSError as exc:
                    self.metrics_server = None
                    raise StartError(f"MAILROOM_METRICS_ADDR {s.metrics_addr}: cannot listen:"
                                     f" {(exc.strerror or str(exc)).lower()}") from None
            path = s.control_socket if s.control_socket not in (None, "") else None
            path = default_socket_path({**os.environ, **({"MAILROOM_CONTROL_SOCKET": path} if path else {})},
                                       s.queue_name)
            if path is not None:
                hello = {"version": __version__, "pid": os.getpid(), "queue": s.queue_name}
                control = ControlServer(path, s.control_group, self.handle, self.snapshot, hello,
                                        on_command=self.metrics.command)
                control.start()
                self.control = control
        except ControlSocketError as exc:
            self.close()
            raise StartError(str(exc)) from None
        except StartError:
            self.close()
            raise

    def servers(self) -> list[Any]:
        return [server for server in (self.control, self.metrics_server) if server is not None]

    def readers(self) -> list[Any]:
        return [sock for server in self.servers() for sock in server.readers()]

    def writing(self) -> bool:
        return any(server.writers() for server in self.servers())

    def service(self, ready: list[Any]) -> None:
        for server in self.servers():
            server.service(ready, ready)

    def flush(self) -> None:
        """End of a loop turn: the events it published go out, one write per client."""
        if self.control is not None:
            self.control.flush()

    def detach(self) -> None:
        """In a forked worker: drop the supervisor's sockets without touching files."""
        for server in self.servers():
            server.detach()

    def close(self) -> None:
        for server in self.servers():
            server.close()

    def publish(self, event: str, data: dict[str, Any]) -> None:
        if self.control is not None:
            self.control.publish(event, data)

    def emit(self, event: msg.Event) -> None:
        """Publish an event as it is declared (:mod:`mailroom.supervisor.messages`)."""
        self.publish(event.EVENT, event.payload())

    # -- what the router and the arbiter see -----------------------------------------
    def on_router_event(self, event: msg.BatchEvent) -> None:
        data = event.payload()
        if isinstance(event, msg.BatchClaimed):
            # The claim's time goes out with the event too: a monitor's ages count from
            # it, not from when that monitor heard of the batch.
            data["claimed"] = time.time()
            self._remember(event.batch, _Recent({**data, "state": BatchState.CLAIMED}))
        elif isinstance(event, msg.BatchDispatched) and event.batch in self.recent:
            self.recent[event.batch].data["state"] = BatchState.SENDING
            data["state"] = BatchState.SENDING
        elif isinstance(event, msg.BatchDone):
            entry = self.recent.get(event.batch) or _Recent({})
            entry.data.update(data)
            self._remember(event.batch, entry)
            for kind in ("sent", "failed", "retry", "skipped"):
                self.counters[kind] += data[kind]
            self.counters["batches"] += 1
        self.publish(event.EVENT, data)

    def on_batch_finished(self, batch: Batch, outcomes: TokenOutcomes, seconds: float) -> None:
        """Metrics, and what ``batch {id}`` shows later (the line, never a secret)."""
        by_action = collections.Counter[tuple[Action, OutcomeKind]]()
        # Recovery rows come first in a claim (the ledger claims them first).
        for index, (_, outcome) in enumerate(outcomes):
            action = Action.RECOVERY if index < batch.recovery else Action.ACTIVATION
            by_action[(action, outcome.kind)] += 1
        self.metrics.batch_done(by_action, seconds)
        entry = self.recent.get(batch.batch_id)
        if entry is not None:
            entry.line, entry.outcomes = batch.line, outcomes

    def on_batch_released(self, batch: Batch) -> None:
        """A batch went back to the queue unsent (paused sending, shutdown)."""
        self.metrics.batch_released()

    def on_heartbeat(self, beat: msg.Heartbeat) -> None:
        """The SES calls a sender made since its last heartbeat; the events worker's
        counts since its last one."""
        if isinstance(beat.stats, msg.SenderStats):
            for result, seconds in beat.stats.calls:
                self.metrics.ses_request(result, seconds)
        elif isinstance(beat.stats, msg.EventsStats):
            changed = beat.stats
            if self.events is not None:
                self.events["recorded"].update(changed.recorded)
                if changed.lag_s is not None:
                    self.events["lag_s"] = changed.lag_s
                for key in ("received", "unmatched", "unparsable", "ignored", "suppressed", "rematched"):
                    if key in self.events:
                        self.events[key] += getattr(changed, key)
                self.metrics.ses_events(dataclasses.asdict(changed))
            if changed.deliverability:
                self.deliverability = changed.deliverability
                self.metrics.deliverability(changed.deliverability)
                reason = self.guard.judge(changed.deliverability)
                if reason is not None:
                    self._protect(reason)

    def _protect(self, reason: str) -> None:
        """Past MAILROOM_PAUSE_*_RATE: pause claims and say why, once (supervisor/guard.py)."""
        log.warning("pausing claims to protect the SES account: %s (mailroom ctl resume claims resumes)",
                       reason)
        self.emit(msg.AccountPaused(reason, self.deliverability))
        if not self.set_paused(Pausable.CLAIMS, True):
            self._state_changed()  # paused already: the banner gets its reason all the same

    def on_recorded(self, recorded: msg.Recorded) -> None:
        """Rows the collector recorded ``sent``: how long after their creation."""
        for action, seconds in recorded.latencies:
            self.metrics.delivery_latency(action.db_name, seconds)

    def on_worker(self, event: msg.WorkerEvent) -> None:
        if isinstance(event, msg.WorkerExited) and event.restarting:
            self.metrics.worker_restarted(event.worker, event.reason or RestartReason.CRASH)
        self.emit(event)

    def _remember(self, batch_id: str, entry: _Recent) -> None:
        self.recent[batch_id] = entry
        self.recent.move_to_end(batch_id)
        while len(self.recent) > RECENT_BATCHES:
            self.recent.popitem(last=False)

    # -- state -------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        if self.sup.stopping:
            return RunState.STOPPING
        if self.drains:
            return RunState.DRAINING
        if self._sender().ses.paused:
            return RunState.SES_PAUSED
        if self.claims_paused or self.sup.router.holding:
            return RunState.PAUSED
        return RunState.RUNNING

    def _state_changed(self) -> None:
        self.emit(msg.StateChanged(self.state, self._paused(), self.guard.reason))

    def _paused(self) -> dict[str, bool]:
        return {Pausable.CLAIMS: self.claims_paused, Pausable.SENDING: self.sup.router.holding}

    def _collector(self) -> msg.CollectorStats:
        """The collector's latest heartbeat stats (empty before the first)."""
        stats = self.sup.workers[Role.COLLECTOR].stats
        return stats if isinstance(stats, msg.CollectorStats) else msg.CollectorStats()

    def _sender(self) -> msg.SenderStats:
        """The sender's latest heartbeat stats (empty before the first)."""
        stats = self.sup.workers[Role.SENDER].stats
        return stats if isinstance(stats, msg.SenderStats) else msg.SenderStats()

    def status(self) -> dict[str, Any]:
        collector, sender = self._collector(), self._sender()
        tick = self._tick()
        rows = sum(len(b.token_ids) for b in self.sup.router.batches.values())
        return {"state": self.state, "paused": self._paused(), "pid": os.getpid(), "version": __version__,
                "started": self.started, "rss": rss_bytes(),
                "workers": {role: info.payload() for role, info in tick.workers.items()},
                "in_flight": {"batches": len(self.sup.router), "rows": rows},
                "counters": dict(self.counters), "rates": self._rates(),
                "ses": {**sender.ses.payload(), "rate_limit": sender.rate_limit, "rate_cap": self.rate_cap()},
                "queue": self.settings.queue_name, "queue_depth": collector.queue_depth,
                "oldest_queued_s": collector.oldest_queued_s,
                "events": None if self.events is None else {**self.events, "recorded": dict(self.events["recorded"])},
                "deliverability": self.deliverability, "guard": self.guard.as_status(),
                "templates": [t.payload() for t in tick.templates],
                "tick": tick.payload()}

    def _workers(self) -> dict[str, msg.WorkerInfo]:
        now, wall = time.monotonic(), time.time()
        workers: dict[str, msg.WorkerInfo] = {}
        for role, worker in self.sup.workers.items():
            workers[role] = msg.WorkerInfo(
                worker=role, pid=worker.process.pid if worker.process else None, up=worker.up,
                state=WorkerState.RUNNING if worker.up else WorkerState.DOWN,
                uptime_s=round(now - worker.started_at, 1) if worker.up else None,
                started=wall - (now - worker.started_at), restarts=worker.restarts,
                last_heartbeat_s=round(now - worker.last_seen, 1), last_heartbeat=wall - (now - worker.last_seen),
                rss=worker.stats.rss if worker.stats is not None else None)
        return workers

    def snapshot(self) -> dict[str, Any]:
        return {**self.status(), "batches": self._batches(None, RECENT_BATCHES)}

    def _rates(self) -> dict[str, float]:
        if len(self.history) < 2:
            return {"sent_per_s": 0.0, "failed_per_s": 0.0}
        (t0, s0, f0), (t1, s1, f1) = self.history[0], self.history[-1]
        span = max(t1 - t0, 1e-3)
        return {"sent_per_s": round((s1 - s0) / span, 2), "failed_per_s": round((f1 - f0) / span, 2)}

    def _tick(self) -> msg.Tick:
        collector, sender = self._collector(), self._sender()
        rates = self._rates()
        return msg.Tick(sent_per_s=rates["sent_per_s"], failed_per_s=rates["failed_per_s"],
                        workers=self._workers(), in_flight=len(self.sup.router),
                        queue_depth=collector.queue_depth, oldest_queued_s=collector.oldest_queued_s,
                        rate_limit=sender.rate_limit, rate_cap=self.rate_cap(), ses=sender.ses,
                        templates=list(sender.templates))

    # -- the loop's turn -----------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Once a second: the tick event, gauges, drains that finished, held leases."""
        self._answer_drains(now)
        self._release_held()
        if now - self.ticked_at < TICK_EVERY:
            return
        self.ticked_at = now
        self.history.append((now, self.counters["sent"], self.counters["failed"]))
        while self.history and now - self.history[0][0] > RATE_WINDOW_S:
            self.history.popleft()
        tick = self._tick()
        ses, oldest = tick.ses, tick.oldest_queued_s
        self.metrics.set_gauges(
            in_flight=tick.in_flight, queue_depth=tick.queue_depth,
            oldest_queued_ts=(time.time() - oldest) if oldest is not None else 0.0,
            send_rate_limit=tick.rate_limit, ses_max_send_rate=ses.max_send_rate,
            ses_sent_last_24h=ses.sent_last_24h, ses_max_24h_send=ses.max_24h_send,
            paused={**self._paused(), "ses": ses.paused},
            worker_up={role: worker.up for role, worker in self.sup.workers.items()},
            template_ok={t.template: t.ok for t in tick.templates})
        held = [(t.template, t.reason or "") for t in tick.templates if not t.ok]
        if held != self.templates_held:
            # The sender checked again (at start, a recheck, a send): say what changed.
            self.templates_held = held
            self.emit(msg.TemplatesChanged(list(tick.templates)))
        self.emit(tick)

    def _answer_drains(self, now: float) -> None:
        for entry in list(self.drains):
            request, started, deadline = entry
            # Drained: no claim on its way, nothing in flight, every outcome recorded.
            if self._claims_held() and not len(self.sup.router) and not self.sup.router.unconfirmed:
                request.reply({"drained": True, "waited_s": round(now - started, 3)})
            elif now >= deadline:
                why = (f"{len(self.sup.router)} batches still in flight" if self._claims_held()
                       else "the collector has not confirmed that claims are paused")
                request.fail("invalid_state", f"{why} after {deadline - started:g} s (claims stay paused)")
            else:
                continue
            self.drains.remove(entry)
            self._state_changed()

    def _release_held(self) -> None:
        router = self.sup.router
        if not router.holding:
            return
        limit = self.settings.claim_timeout / 1000 * HOLD_SHARE_OF_LEASE
        now = time.monotonic()
        for batch in list(router.batches.values()):
            if not batch.dispatched and now - batch.received_at >= limit:
                log.info("batch %s held for %.0f s while sending is paused: back to the queue"
                            " before its lease runs out", batch.batch_id, now - batch.received_at)
                router.release(batch.batch_id)

    # -- commands --------------------------------------------------------------------------
    def handle(self, request: Request) -> None:
        """The control server's handler: every command but hello/subscribe."""
        getattr(self, "cmd_" + request.cmd)(request, **request.args)

    def cmd_status(self, request: Request) -> None:
        request.reply(self.status())

    def _batches(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        rows = [dict(entry.data) for entry in self.recent.values()]
        if state:
            rows = [row for row in rows if row.get("state") == state]
        return rows[-limit:]

    def cmd_batches(self, request: Request, state: str | None = None, limit: int = 100) -> None:
        request.reply({"batches": self._batches(state, limit)})

    def cmd_batch(self, request: Request, id: str) -> None:  # noqa: A002 - the protocol's name
        entry = self.recent.get(id)
        if entry is None:
            request.fail("not_found", f"no batch {id} among the latest {RECENT_BATCHES}")
            return
        line = entry.line
        batch = self.sup.router.batches.get(id)
        if line is None and batch is not None:
            line = batch.line
        outcomes = entry.outcomes
        destinations = []
        if line is not None:
            for index, row in enumerate(wire.decode_line(line)):  # address and action only: no secret
                token, outcome = outcomes[index] if index < len(outcomes) else (None, None)
                destinations.append({"address": row[1], "action": Action(row[0]).db_name, "token": token,
                                     "status": str(outcome.kind) if outcome else entry.data.get("state"),
                                     "message_id": outcome.message_id if outcome else None,
                                     "error": outcome.error if outcome else None})
        request.reply({**entry.data, "destinations": destinations})

    def cmd_pause(self, request: Request, what: str) -> None:
        if self.sup.stopping:
            request.fail("invalid_state", "the supervisor is stopping")
            return
        changed = self.set_paused(what, True)
        request.reply({"what": what, "changed": changed, "state": self.state})

    def cmd_resume(self, request: Request, what: str) -> None:
        if self.sup.stopping:
            request.fail("invalid_state", "the supervisor is stopping")
            return
        if what == Pausable.CLAIMS and self.guard.reason is not None:
            self.guard.resumed()  # a person decided: the same numbers do not pause again
        changed = self.set_paused(what, False)
        request.reply({"what": what, "changed": changed, "state": self.state})

    def set_paused(self, what: str, paused: bool) -> bool:
        """Pause or resume claims or sending; whether anything changed."""
        if what == Pausable.CLAIMS:
            if self.claims_paused == paused:
                return False
            self.claims_paused = paused
            self._tell_claiming(not paused)
        else:
            router = self.sup.router
            if router.holding == paused:
                return False
            router.holding = paused
            if not paused:
                router.dispatch_all()
        log.info("%s %s", "paused" if paused else "resumed", what)
        self._state_changed()
        return True

    def cmd_drain(self, request: Request, timeout_s: float = 300.0) -> None:
        if self.sup.stopping:
            request.fail("invalid_state", "the supervisor is stopping")
            return
        self.set_paused(Pausable.CLAIMS, True)
        now = time.monotonic()
        self.drains.append((request, now, now + timeout_s))
        self._state_changed()
        self._answer_drains(now)

    def cmd_set_rate(self, request: Request, per_second: float) -> None:
        if not self.sup.send(Role.SENDER, msg.SetRate(per_second)):
            request.fail("invalid_state", "the sender is not running")
            return
        self.send_rate = per_second
        cap = self.rate_cap()
        applied = min(per_second, cap) if cap is not None else per_second
        request.reply({"per_second": applied, "requested": per_second, "capped": applied < per_second})

    def rate_cap(self) -> float | None:
        """The effective send quota, as the sender applies it: MAILROOM_SES_MAX_SEND_RATE
        when set, else the MaxSendRate of the sender's last heartbeat (None: not known)."""
        if self.settings.ses_max_send_rate is not None:
            return self.settings.ses_max_send_rate
        reported = self._sender().ses.max_send_rate or 0
        return float(reported) if reported > 0 else None

    def cmd_restart(self, request: Request, worker: str) -> None:
        if self.sup.stopping:
            request.fail("invalid_state", "the supervisor is stopping")
            return
        if Role(worker) not in self.sup.workers:
            request.fail("invalid_state", f"no {worker} worker here (MAILROOM_SES_EVENTS_QUEUE_URL is not set)")
            return
        self.sup.request_restart(Role(worker))
        request.reply({"worker": worker, "restarting": True})

    def cmd_shutdown(self, request: Request, mode: str = "graceful") -> None:
        request.reply({"mode": mode})
        if mode == "now":
            self.sup.stop_now()
        elif not self.sup.stopping:
            self.sup.handle_term()

    def on_sender_started(self) -> None:
        """A new sender sends at the operator's rate, if one was set (it caps it itself)."""
        if self.send_rate is not None:
            self.sup.send(Role.SENDER, msg.SetRate(self.send_rate))

    def on_collector_started(self) -> None:
        """A new collector claims only if claims are not paused."""
        if self.claims_paused:
            self._tell_claiming(False)

    def _tell_claiming(self, enabled: bool) -> None:
        self.claiming_seq += 1
        self.sup.send(Role.COLLECTOR, msg.SetClaiming(enabled, self.claiming_seq))

    def on_claiming_set(self, confirmed: msg.ClaimingSet) -> None:
        """The collector applied a SetClaiming: the claims it made before are all in."""
        self.claiming_confirmed = max(self.claiming_confirmed, confirmed.seq)
        if self.drains:
            self._answer_drains(time.monotonic())

    def _claims_held(self) -> bool:
        """No claim can still be on its way: the collector confirmed the latest
        SetClaiming, or there is no collector (a new one hears it before it claims)."""
        return self.claiming_confirmed >= self.claiming_seq or not self.sup.workers[Role.COLLECTOR].up
