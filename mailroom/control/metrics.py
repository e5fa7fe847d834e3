"""Prometheus metrics of the supervisor (OPERATIONS.md 3) and their listener.

:class:`Metrics` owns a private ``CollectorRegistry`` (no multiprocess mode: only
the supervisor counts, from what it routes and what the workers' heartbeats say)
with every metric of the list, known label combinations at 0. :class:`MetricsServer`
serves ``GET /metrics`` from the supervisor's loop, like the control socket: no
thread, non-blocking sockets, one request per connection, slow clients dropped.

Local abuse must not starve a scrape (issue 20): a full table of connections does
not turn new ones away, it evicts the oldest one still without a complete request
(an idle or dribbling client: a scraper sends its request at once), and a new
connection is read as soon as it is accepted, so a scrape is usually answered
before anything can evict it.  Accepts are taken in slices per loop turn, so a
flood of connections cannot push out one accepted in the same instant before its
request is read.

Past the house's ~400 lines: the metrics of OPERATIONS.md 3 are one list: every series
is declared, zeroed and fed here, and the listener serving them is small enough
to stay beside it.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from mailroom import __version__, config
from mailroom.control import protocol
from mailroom.control.nonblocking import accept_pending, send_pending
from mailroom.vocabulary import (
    ACTION_NAMES,
    BATCH_RESULTS,
    PAUSABLE,
    RESTART_REASONS,
    ROLES,
    SES_EVENT_TYPES,
    SES_RESULTS,
    Action,
    OutcomeKind,
    Role,
    SesResult,
    batch_state,
)

log = logging.getLogger("mailroom.control")

# No ``_created`` companion series (OPERATIONS.md 3): each counter and histogram
# would export a second gauge holding its creation time, which doubles the
# series, reads as a metric of its own in queries and alerts, and changes at
# every supervisor start.  Process-wide, as prometheus_client has it; here and
# not through PROMETHEUS_DISABLE_CREATED_SERIES, so no environment can bring
# them back.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

#: The ``outcome`` label of ``mailroom_deliveries_total`` for each outcome kind
#: (printed in debug mode counts as sent: the row is done with, as for ``sent``).
OUTCOME_LABELS = {OutcomeKind.SENT: "sent", OutcomeKind.EMITTED: "sent", OutcomeKind.FAILED: "failed",
                  OutcomeKind.RETRY: "retried", OutcomeKind.SKIPPED: "skipped",
                  # back to the queue, unsent, while its template is missing (not a retry: no attempt)
                  OutcomeKind.HELD: "held"}
OUTCOMES = tuple(dict.fromkeys(OUTCOME_LABELS.values()))
#: ``mailroom_paused{what}``: what an operator pauses, and SES pausing the account.
PAUSED_WHAT = (*PAUSABLE, "ses")

_SES_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# What a user waiting for the email feels: from a fraction of a second to hours.
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
_ROWS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    """Every metric of OPERATIONS.md 3, and the calls the supervisor makes to move them."""

    def __init__(self, impl: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.deliveries = Counter("mailroom_deliveries_total", "Deliveries by action and outcome",
                                  ("action", "outcome"), registry=r)
        self.batches = Counter("mailroom_batches_total", "Batches finished, by result", ("result",), registry=r)
        self.ses_requests = Counter("mailroom_ses_requests_total", "SES calls by result", ("result",), registry=r)
        self.worker_restarts = Counter("mailroom_worker_restarts_total",
                                       "Worker restarts, by reason: planned (SIGHUP, ctl restart) or crash",
                                       ("worker", "reason"), registry=r)
        self.commands = Counter("mailroom_control_commands_total", "Control socket requests answered",
                                ("cmd", "result"), registry=r)
        self.ses_duration = Histogram("mailroom_ses_request_duration_seconds", "SES call duration",
                                      buckets=_SES_BUCKETS, registry=r)
        self.batch_duration = Histogram("mailroom_batch_duration_seconds", "Claim to last outcome of a batch",
                                        buckets=_BATCH_BUCKETS, registry=r)
        self.latency = Histogram("mailroom_delivery_latency_seconds", "Token created to SES accepted",
                                 ("action",), buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("mailroom_batch_rows", "Rows per batch", buckets=_ROWS_BUCKETS, registry=r)
        self.in_flight = Gauge("mailroom_in_flight_batches", "Batches between claim and outcomes", registry=r)
        self.queue_depth = Gauge("mailroom_queue_depth", "Queued rows of this queue", registry=r)
        self.oldest_queued = Gauge("mailroom_oldest_queued_timestamp_seconds",
                                   "Creation time of the oldest queued row (0: none)", registry=r)
        # Rates in recipients per second, as SES counts its quota (one call of 50
        # destinations is 50) and as README and `ctl set-rate` say.
        self.rate_limit = Gauge("mailroom_send_rate_limit",
                                "Sender's send-rate limit in force, recipients per second", registry=r)
        self.ses_max_rate = Gauge("mailroom_ses_max_send_rate",
                                  "SES MaxSendRate of the account, recipients per second", registry=r)
        self.ses_sent_24h = Gauge("mailroom_ses_sent_last_24h",
                                  "SES SentLast24Hours: recipients sent in the last 24 hours", registry=r)
        self.ses_max_24h = Gauge("mailroom_ses_max_24h_send",
                                 "SES Max24HourSend: recipients the account may send in 24 hours", registry=r)
        self.paused = Gauge("mailroom_paused", "1 while paused", ("what",), registry=r)
        self.worker_up = Gauge("mailroom_worker_up", "1 while the worker runs", ("worker",), registry=r)
        self.template_ok = Gauge("mailroom_template_ok",
                                 "1 while the template renders with mailroom's data, 0 while its action is held",
                                 ("template",), registry=r)
        self.build_info = Gauge("mailroom_build_info", "Version and wire implementation",
                                ("version", "impl"), registry=r)
        # Delivery events (DESIGN.md 11), from the events worker's heartbeats.
        self.events_total = Counter("mailroom_ses_events_total", "SES delivery events recorded, by type",
                                  ("type",), registry=r)
        self.bounce_rate = Gauge("mailroom_bounce_rate",
                                 "Deliveries that bounced for good over those sent, last 24 hours", registry=r)
        self.complaint_rate = Gauge("mailroom_complaint_rate",
                                    "Deliveries complained of over those sent, last 24 hours", registry=r)
        self.suppressed = Gauge("mailroom_suppressed_addresses", "Addresses on the suppression list", registry=r)
        self.events_lag = Gauge("mailroom_events_lag_seconds",
                                "SES event time to recorded in the ledger, the latest batch's oldest", registry=r)
        # Known label combinations exist from the start, at 0: a rate() over a
        # series that appears with its first increment misses that increment.
        for action in ACTION_NAMES:
            self.latency.labels(action)
            for outcome in OUTCOMES:
                self.deliveries.labels(action, outcome)
        for result in BATCH_RESULTS:
            self.batches.labels(result)
        for result in SES_RESULTS:
            self.ses_requests.labels(result)
        for worker in ROLES:
            for reason in RESTART_REASONS:
                self.worker_restarts.labels(worker, reason)
            # The events worker runs only when MAILROOM_SES_EVENTS_QUEUE_URL is set: its
            # series appears with it, so "worker_up == 0" never alerts on a worker not configured.
            if worker != Role.EVENTS:
                self.worker_up.labels(worker)
        for what in PAUSED_WHAT:
            self.paused.labels(what)
        for kind in SES_EVENT_TYPES:
            self.events_total.labels(kind)
        for cmd in protocol.COMMANDS:
            self.commands.labels(cmd, "ok")
        self.build_info.labels(__version__, impl or "unknown").set(1)

    def batch_done(self, outcomes: Mapping[tuple[Action, OutcomeKind], int], seconds: float) -> None:
        """A batch got its outcomes: how many rows of each action ended each way
        (a ``Counter`` of ``(action, kind)``), ``seconds`` after its claim."""
        kinds = collections.Counter[OutcomeKind]()
        for (action, kind), n in outcomes.items():
            kinds[kind] += n
            if n:
                self.deliveries.labels(action.db_name, OUTCOME_LABELS[kind]).inc(n)
        self.batch_rows.observe(kinds.total())
        self.batch_duration.observe(max(0.0, seconds))
        self.batches.labels(batch_state(kinds)).inc()

    def batch_released(self) -> None:
        """A batch went back to the queue unsent (paused sending, shutdown): no
        delivery was tried, so only ``mailroom_batches_total{result="released"}`` moves."""
        self.batches.labels(batch_state({}, released=True)).inc()

    def ses_request(self, result: str, seconds: float) -> None:
        """One SES call finished: ``ok``, ``throttled`` or ``error``."""
        self.ses_requests.labels(result if result in SES_RESULTS else SesResult.ERROR).inc()
        self.ses_duration.observe(max(0.0, seconds))

    def delivery_latency(self, action: str, seconds: float) -> None:
        """One email accepted by SES, ``seconds`` after its token was created."""
        self.latency.labels(action).observe(max(0.0, seconds))

    def worker_restarted(self, worker: str, reason: str) -> None:
        """A worker is being restarted after it exited: ``planned`` or ``crash``."""
        self.worker_restarts.labels(worker, reason).inc()

    def ses_events(self, changed: Mapping[str, Any]) -> None:
        """What the events worker did since its last heartbeat: new events by
        feedback type, unmatched and unparsable counts, the lag."""
        counts = {**(changed.get("recorded") or {}), "unmatched": changed.get("unmatched"),
                  "unparsable": changed.get("unparsable")}
        for kind, n in counts.items():
            if n and kind in SES_EVENT_TYPES:
                self.events_total.labels(kind).inc(n)
        if changed.get("lag_s") is not None:
            self.events_lag.set(changed["lag_s"])

    def deliverability(self, health: Mapping[str, Any]) -> None:
        """The 24-hour rates (0 before any send) and the suppression list's size."""
        self.bounce_rate.set(health.get("bounce_rate") or 0)
        self.complaint_rate.set(health.get("complaint_rate") or 0)
        self.suppressed.set(health.get("suppressions") or 0)

    def command(self, cmd: str, result: str) -> None:
        """A control request was answered (``ok`` or its error code): ControlServer's on_command."""
        self.commands.labels(cmd, result).inc()

    def set_gauges(self, *, in_flight: int | None = None, queue_depth: int | None = None,
                   oldest_queued_ts: float | None = None, send_rate_limit: float | None = None,
                   ses_max_send_rate: float | None = None, ses_sent_last_24h: float | None = None,
                   ses_max_24h_send: float | None = None, paused: Mapping[str, bool] | None = None,
                   worker_up: Mapping[str, bool] | None = None,
                   template_ok: Mapping[str, bool] | None = None) -> None:
        """Set the gauges given (``None`` leaves one as it is). ``oldest_queued_ts`` is a
        Unix time, 0 when nothing is queued."""
        pairs: Iterable[tuple[Gauge, float | None]] = (
            (self.in_flight, in_flight), (self.queue_depth, queue_depth),
            (self.oldest_queued, oldest_queued_ts), (self.rate_limit, send_rate_limit),
            (self.ses_max_rate, ses_max_send_rate), (self.ses_sent_24h, ses_sent_last_24h),
            (self.ses_max_24h, ses_max_24h_send))
        for gauge, value in pairs:
            if value is not None:
                gauge.set(value)
        for what, flag in (paused or {}).items():
            self.paused.labels(what).set(1 if flag else 0)
        for worker, flag in (worker_up or {}).items():
            self.worker_up.labels(worker).set(1 if flag else 0)
        for template, flag in (template_ok or {}).items():
            self.template_ok.labels(template).set(1 if flag else 0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


# -- the listener -------------------------------------------------------------------

#: A request's head may not be longer (bytes) and must arrive within this time.
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
#: Connections held at once; past it the oldest one still reading is evicted.
#: Each is a descriptor of the supervisor's and a socket polled on every turn.
MAX_CONNECTIONS = 128
#: Seconds a connection may hold its slot before a newcomer can evict it: time
#: for a client that just connected to send its request.
MIN_HOLD = 0.5
#: Connections accepted per turn of the loop (the rest wait in the backlog).
ACCEPT_SLICE = MAX_CONNECTIONS // 2
#: Listen backlog (the kernel caps it at net.core.somaxconn): hundreds of
#: connections at once wait there instead of being reset.
BACKLOG = 1024


class _Conn:
    __slots__ = ("sock", "inbuf", "outbuf", "started")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.started = now


def _response(status: str, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


class MetricsServer:
    """``GET /metrics`` on ``addr`` (``host:port``), served from the caller's loop with
    the same ``readers()/writers()/service()`` calls as :class:`ControlServer`."""

    def __init__(self, addr: str, render: Callable[[], bytes]) -> None:
        self.host, self.port = config.split_host_port(addr)
        self.render = render
        self._listener: socket.socket | None = None
        self._conns: dict[socket.socket, _Conn] = {}

    def start(self) -> None:
        """Listen; ``OSError`` (address in use, permission) propagates."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.port = sock.getsockname()[1]  # port 0 picks a free one (tests)
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def close(self) -> None:
        """Stop listening and drop every connection."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    detach = close  # nothing on disk: in a forked child, closing is all there is

    def readers(self) -> list[socket.socket]:
        """The listener and connections whose request is not complete yet."""
        found = [c.sock for c in self._conns.values() if not c.outbuf]
        # Full, and nobody held long enough to evict: leave new connections in the
        # backlog until the next turn (a listener polled but not accepted would spin).
        if self._listener is not None and self._has_room(time.monotonic()):
            found.append(self._listener)
        return found

    def writers(self) -> list[socket.socket]:
        """Connections with a response to send."""
        return [c.sock for c in self._conns.values() if c.outbuf]

    def service(self, readable: Iterable[Any] = (), writable: Iterable[Any] = ()) -> None:
        """Accept, read, answer, flush; drop connections older than REQUEST_TIMEOUT."""
        readable = set(readable)
        now = time.monotonic()
        if self._listener is not None and self._listener in readable:
            self._accept(now)
        del writable  # pending output is tried every call, as in ControlServer.service
        for conn in [c for c in self._conns.values() if c.outbuf]:
            self._flush(conn)
        for sock in [s for s in readable if s in self._conns]:
            self._read(self._conns[sock])
        for conn in list(self._conns.values()):
            if now - conn.started > REQUEST_TIMEOUT:
                self._drop(conn)

    def _accept(self, now: float) -> None:
        assert self._listener is not None
        accepted = 0
        while accepted < ACCEPT_SLICE and self._make_room(now):
            # One at a time: room is made before each accept, never after it.
            sock = next(accept_pending(self._listener, lambda: True, "metrics"), None)
            if sock is None:
                return
            conn = self._conns[sock] = _Conn(sock, now)
            self._read(conn)  # a scraper's request is usually there already
            accepted += 1

    def _victim(self, now: float) -> _Conn | None:
        """The connection to evict for a new one: the oldest still reading its
        request, once it had :data:`MIN_HOLD` to send it (None: nobody yet).

        The dict keeps accept order, so the first one without output is the
        oldest idle or partial one; if every connection is being answered (a
        response waits for a peer that does not read) the oldest of those goes.
        """
        victim = next((c for c in self._conns.values() if not c.outbuf), None)
        if victim is None:
            victim = next(iter(self._conns.values()), None)
        return victim if victim is not None and now - victim.started >= MIN_HOLD else None

    def _has_room(self, now: float) -> bool:
        return len(self._conns) < MAX_CONNECTIONS or self._victim(now) is not None

    def _make_room(self, now: float) -> bool:
        """Evict :meth:`_victim` if the table is full; False when nobody can go yet
        (the next connections wait in the backlog)."""
        if len(self._conns) < MAX_CONNECTIONS:
            return True
        victim = self._victim(now)
        if victim is None:
            return False
        self._drop(victim)
        return True

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        try:
            conn.sock.close()
        except OSError:
            pass

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        conn.inbuf += data
        if b"\r\n\r\n" not in conn.inbuf and b"\n\n" not in conn.inbuf:
            if len(conn.inbuf) > MAX_REQUEST:
                conn.outbuf += _response("431 Request Header Fields Too Large", b"too large\n", "text/plain")
                self._flush(conn)
            return
        self._answer(conn)

    def _answer(self, conn: _Conn) -> None:
        parts = bytes(conn.inbuf.split(b"\n", 1)[0]).decode("latin-1").split()
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            reply = _response("405 Method Not Allowed", b"GET only\n", "text/plain")
        elif path != "/metrics":
            reply = _response("404 Not Found", b"try /metrics\n", "text/plain", method == "HEAD")
        else:
            try:
                reply = _response("200 OK", self.render(), CONTENT_TYPE_LATEST, method == "HEAD")
            except Exception:
                log.exception("metrics: rendering failed")
                reply = _response("500 Internal Server Error", b"error\n", "text/plain")
        conn.outbuf += reply
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        if not send_pending(conn.sock, conn.outbuf) or not conn.outbuf:
            self._drop(conn)  # gone, or answered: one request per connection
