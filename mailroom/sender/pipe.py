"""The sender's side of the supervisor's pipe: batches in, outcomes and heartbeats out.

In a supervised run the sender worker reads :class:`~mailroom.supervisor.messages.SendBatch`
from the supervisor (:func:`read_pipe`, in a thread of its own) and reports each
batch's outcomes back (:class:`PipeOutcomes`, the driver's
:class:`~mailroom.sender.driver.OutcomeSink`), with the window of batches it
wants claimed ahead (:func:`window`).  Everything here runs in the sender worker
after the fork; it speaks the messages of :mod:`mailroom.supervisor.messages`, the
one module of the supervisor a role may import.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from mailroom._process import rss_bytes
from mailroom.sender.driver import Driver, Job, StopRequest
from mailroom.sender.engine import Sender
from mailroom.sender.quota import QuotaWatch
from mailroom.sender.ses import MAX_DESTINATIONS
from mailroom.supervisor import messages as msg
from mailroom.vocabulary import Outcome, OutcomeKind
from mailroom.wire import WireError, WireFields

log = logging.getLogger("mailroom.sender")


def window(sender: Sender, batch_limit: int) -> int:
    """Batches the sender wants claimed ahead of it (:class:`~mailroom.supervisor.messages.Window`)."""
    # Twice what the calls in flight hold when full: while they are on the
    # wire, the next ones fill up from the batches waiting behind them.
    wanted = 2 * sender.concurrency * MAX_DESTINATIONS
    return max(msg.FIRST_WINDOW, math.ceil(wanted / batch_limit))


def sender_stats(sender: Sender, quota: QuotaWatch) -> msg.SenderStats:
    """The sender's heartbeat: the rate limit in force, the quota, the pause, and
    the SES calls finished since the last heartbeat (each reported once)."""
    known = quota.quota or {}
    ses = msg.SesQuota(max_send_rate=known.get("max_send_rate"), max_24h_send=known.get("max_24h_send"),
                       sent_last_24h=known.get("sent_last_24h"), paused=sender.paused)
    templates = tuple(msg.TemplateState(**state) for state in sender.templates.states()) if sender.templates else ()
    return msg.SenderStats(rate_limit=sender.rate, ses=ses, calls=tuple(sender.take_calls()), templates=templates)


def read_pipe(pipe: Connection, driver: Driver, quota: QuotaWatch) -> None:
    """Hand what the supervisor sends to the driver, until the pipe closes.

    Run in a thread of its own: it keeps the supervisor's sends from ever
    blocking on us while the driver's thread is busy writing outcomes."""
    try:
        while True:
            message = pipe.recv()
            if isinstance(message, msg.SendBatch):
                driver.put(Job(message.batch_id, message.line, message.token_ids))
            elif isinstance(message, msg.Stop):
                driver.put(StopRequest(message.timeout, defer_retries=True))
            elif isinstance(message, msg.SetRate):
                quota.set_rate(message.per_second)  # thread-safe: the bucket locks
            else:
                log.warning("unexpected message %s from the supervisor", type(message).__name__)
    except (EOFError, OSError):
        log.error("supervisor is gone; stopping")
        driver.put(StopRequest(0.0, abandon=True))


class PipeOutcomes:
    """The sender worker's outcome sink: outcomes and heartbeats to the supervisor."""

    def __init__(self, pipe: Connection, stats: Callable[[], msg.SenderStats],
                 window: Callable[[], int], held: Callable[[], tuple[int, ...]] = tuple) -> None:
        self.pipe = pipe
        self.stats = stats
        self.window = window
        self.held = held
        self.last_beat = 0.0
        self.last_window = 0
        self.last_held: tuple[int, ...] | None = None

    def post(self, message: object) -> bool:
        try:
            self.pipe.send(message)
            return True
        except OSError:  # EPIPE/ECONNRESET: the supervisor is gone
            return False

    def done(self, job: Job, rows: list[WireFields], outcomes: list[Outcome]) -> None:
        # strict: a batch whose outcomes do not match its tokens one to one is a
        # bug to see, not rows to drop without a word (their leases would expire).
        self.post(msg.BatchOutcomes(str(job.key), list(zip(job.token_ids or [], outcomes, strict=True))))

    def malformed(self, job: Job, error: WireError) -> None:
        outcome = Outcome(OutcomeKind.FAILED, error=f"malformed batch: {error}")
        self.post(msg.BatchOutcomes(str(job.key), [(tid, outcome) for tid in job.token_ids or []]))

    def tick(self) -> None:
        now = time.monotonic()
        window = self.window()
        beat = now - self.last_beat >= msg.HEARTBEAT_INTERVAL
        if beat:
            self.beat()
        # At once when it changes, and with every heartbeat for a collector that
        # started since (the supervisor forwards it, it does not keep it).
        if beat or window != self.last_window:
            self.last_window = window
            self.post(msg.Window(window))
        held = self.held()
        if beat or held != self.last_held:
            self.last_held = held
            self.post(msg.HoldActions(held))

    def beat(self) -> None:
        """Send a heartbeat now, with the stats of the moment."""
        self.last_beat = time.monotonic()
        self.post(msg.Heartbeat(dataclasses.replace(self.stats(), rss=rss_bytes())))

    def stopping(self, stop: StopRequest) -> None:
        log.info("stopping: finishing the batches in flight (at most %g s)", stop.timeout)
