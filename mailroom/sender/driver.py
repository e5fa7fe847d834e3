"""The one loop that drives the :class:`~mailroom.sender.engine.Sender`.

Both ways of running the sender use it: stdin mode (``mailroom-collector |
mailroom-sender``) and the supervisor's sender worker.  They differ only in where
batches come from and where outcomes go:

- a *source* runs in its own thread (reading stdin, or the supervisor's pipe) and
  :meth:`Driver.put`\\ s a :class:`Job` per batch line, :class:`EndOfInput` at the
  end, or a :class:`StopRequest`;
- an :class:`OutcomeSink` gets each batch's outcomes (:meth:`OutcomeSink.done`), the
  lines that do not decode (:meth:`OutcomeSink.malformed`), and a :meth:`tick` at
  least once a second on the driver's thread (heartbeats).

Everything the sink sees is called from the thread running :meth:`Driver.run`, so
a sink needs no locking.  The driver counts exactly the batches it submitted and
subtracts exactly the ones that finished, so its "in flight" count is what stop
waits for.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mailroom.sender.engine import Sender
from mailroom.vocabulary import Outcome, OutcomeKind
from mailroom.wire import WireError, WireFields, decode_line

log = logging.getLogger("mailroom.sender")

#: Longest wait for input, so stop requests and ticks are never late by more.
TICK = 0.25
#: After close(), how long to wait for callbacks that report the last batches.
REPORT_GRACE = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One batch line to send.  ``key`` names it to the sink (a batch id, a line
    number); ``token_ids`` are the ledger's ids of its rows, when known."""

    key: object
    line: bytes
    token_ids: list[int] | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)  # when it was read


@dataclasses.dataclass(frozen=True, slots=True)
class EndOfInput:
    """The source has nothing more: finish everything, however long it takes."""


@dataclasses.dataclass(frozen=True, slots=True)
class StopRequest:
    """Stop taking batches; give those in flight ``timeout`` seconds.

    ``defer_retries`` hands back at once what waits for a retry or a paused
    account (someone else will send it later: the ledger); ``abandon`` reports
    nothing at all (nobody is left to record outcomes).
    """

    timeout: float
    defer_retries: bool = False
    abandon: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Finished:
    job: Job
    rows: list[WireFields]
    outcomes: list[Outcome]


class OutcomeSink(Protocol):
    """Where the driver reports; every method runs on the driver's thread."""

    def done(self, job: Job, rows: list[WireFields], outcomes: list[Outcome]) -> None:
        """A batch finished: one outcome per row, in row order (empty for an empty line)."""

    def malformed(self, job: Job, error: WireError) -> None:
        """A line that does not decode: nothing was sent."""

    def tick(self) -> None:
        """Called at least every :data:`TICK` seconds."""

    def stopping(self, stop: StopRequest) -> None:
        """A stop begins: no new batches; those in flight get ``stop.timeout`` s."""


class Driver:
    """Feeds a :class:`Sender` from a source and reports to a sink; see the module doc.

    ``window`` bounds the batches submitted and not finished: a source that should
    not read ahead acquires :attr:`window` before each :meth:`put` of a job (the
    driver releases it when the job is reported).  ``poll_stop`` is called on every
    turn of the loop (e.g. to look at a signal flag): a :class:`StopRequest` it
    returns stops the driver as if it had been :meth:`put`.
    """

    def __init__(self, sender: Sender, sink: OutcomeSink, *, window: int,
                 poll_stop: Callable[[], StopRequest | None]) -> None:
        self.sender = sender
        self.sink = sink
        # A plain semaphore: a source that does not use the window (the worker's
        # pipe is bounded by the supervisor) never acquires, and release must not fail.
        self.window = threading.Semaphore(window)
        self._poll_stop = poll_stop
        self._inbox: queue.SimpleQueue[Job | EndOfInput | StopRequest | _Finished] = queue.SimpleQueue()
        self.in_flight = 0

    def put(self, item: Job | EndOfInput | StopRequest) -> None:
        """Hand the driver a job or a control item (any thread)."""
        self._inbox.put(item)

    def run(self) -> StopRequest | None:
        """Send until the end of input or a stop; return the stop (None: end of input)."""
        stop: StopRequest | None = None
        while True:
            self.sink.tick()
            stop = stop or self._poll_stop()
            if stop is not None:
                break
            try:
                item = self._inbox.get(timeout=TICK)
            except queue.Empty:
                continue
            if isinstance(item, EndOfInput):
                stop = self._poll_stop()  # the input may have ended because of a signal
                break
            if isinstance(item, StopRequest):
                stop = item
            elif isinstance(item, _Finished):
                self._report(item)
            else:
                self._submit(item)
        self._finish(stop)
        return stop

    def _submit(self, job: Job) -> None:
        try:
            rows = decode_line(job.line)
        except WireError as exc:
            self.window.release()
            self.sink.malformed(job, exc)
            return
        if not rows:
            self.window.release()
            self.sink.done(job, [], [])
            return
        self.in_flight += 1
        future = self.sender.submit(rows)
        started = time.monotonic()

        def finished(_: object) -> None:  # a sending thread: only queue it
            try:
                outcomes = future.result()
            except Exception as exc:  # a bug, not an SES answer: let the ledger retry later
                log.exception("a batch failed inside the sender")
                outcomes = [Outcome(OutcomeKind.RETRY, error=f"sender error: {exc}", retry_after=60.0)] * len(rows)
            log.debug("batch %s finished in %.1f ms", job.key, (time.monotonic() - started) * 1000)
            self._inbox.put(_Finished(job, rows, outcomes))

        future.add_done_callback(finished)

    def _report(self, finished: _Finished) -> None:
        self.in_flight -= 1
        self.window.release()
        self.sink.done(finished.job, finished.rows, finished.outcomes)

    def _finish(self, stop: StopRequest | None) -> None:
        """Close the sender, then report every batch it resolved."""
        if stop is None:
            self.sender.close(None)
        elif stop.abandon:
            self.sender.close(0)
            return
        else:
            self.sink.stopping(stop)
            self.sender.close(stop.timeout, defer_retries=stop.defer_retries)
        # close() resolves every batch (unfinished ones as "retry") and their
        # callbacks run before it returns: the reports are in the inbox.
        deadline = time.monotonic() + REPORT_GRACE
        while self.in_flight:
            try:
                item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                log.error("%d batches were not reported at stop", self.in_flight)
                return
            if isinstance(item, _Finished):
                self._report(item)
