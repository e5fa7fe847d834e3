"""``mailroom-sender``'s compatibility mode: batch lines on stdin, sent through SES.

``mailroom-collector | mailroom-sender`` works like the original pipeline: each
line read is decoded and handed to the :class:`~mailroom.sender.Sender` engine;
a malformed line is reported with its line number and skipped.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, TextIO

from mailroom import config
from mailroom._process import SignalFlag, one_line
from mailroom.config import Settings
from mailroom.sender.calls import SendPolicy
from mailroom.sender.driver import Driver, EndOfInput, Job, StopRequest
from mailroom.sender.engine import Sender
from mailroom.vocabulary import Outcome, OutcomeKind
from mailroom.wire import WireError, WireFields

log = logging.getLogger("mailroom.sender")


_CHUNK = 1 << 16
_MAX_JOINED_LINE = 8 << 20  # a quoted field may span lines, but not without end


def run_stdin(
    settings: Settings,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    *,
    policy: SendPolicy | None = None,
) -> int:
    """``mailroom-sender``: send every batch line read from ``stdin``; return the exit code.

    A malformed line is logged with its line number and skipped, and so is a last
    line without its newline (the writer died mid-line).  Lines are submitted
    without waiting for earlier ones, at most ``ses_concurrency + max_in_flight``
    batches at a time (so a huge input is not read ahead into memory).  At the end of
    input everything in flight is finished; after SIGTERM/SIGINT reading stops and
    what is in flight gets ``shutdown_timeout`` ms (a second signal ends the process
    at once).  A paused account holds the batches: nobody would send them later.
    """
    stdin = stdin if stdin is not None else sys.stdin.buffer
    sender = Sender(settings, stdout=stdout, policy=policy or SendPolicy(hold_when_paused=True))
    try:
        sender.start()
    except Exception as exc:  # noqa: BLE001 - boto3 refusing its settings, e.g. a bad endpoint URL
        # Creating the client does not talk to SES: what fails here is configuration.
        log.error("cannot start the sender: %s", one_line(exc))
        return config.EXIT_CONFIG
    signals = SignalFlag()
    signals.install((signal.SIGTERM, signal.SIGINT), second_is_fatal=True)
    on_signal = StopRequest(settings.shutdown_timeout / 1000)
    # Read ahead: what the calls in flight need, plus the in-flight window (auto: 4).
    read_ahead = (settings.ses_concurrency or sender.concurrency) + (settings.max_in_flight or 4)
    driver = Driver(sender, _LogSink(signals), window=read_ahead,
                    poll_stop=lambda: on_signal if signals() else None)
    reader = threading.Thread(target=_read, args=(stdin, signals, driver), name="stdin-reader", daemon=True)
    try:
        reader.start()
        driver.run()
    except BaseException:
        sender.close(0)
        raise
    finally:
        # Handlers back, pipe left open: the reader thread may still be polling it.
        signals.restore()
    return config.EXIT_OK


def _read(stdin: BinaryIO, signals: SignalFlag, driver: Driver) -> None:
    """The source: number the lines of ``stdin`` and hand them to the driver.

    Runs in its own thread; it waits for room in the driver's window before each
    line, so a huge input is not read ahead.  What was read but not yet handed over
    when a signal came stays unsent.
    """
    from mailroom.wire import decode_line

    try:
        for number, line in _batch_lines(_split_lines(_chunks(stdin, signals)), decode_line):
            if not line.endswith(b"\n"):
                # A writer that died mid-line: the cut could fall inside a field (a
                # shorter code still parses), so an unterminated line is never sent.
                log.error("line %d: incomplete (input ended without a newline); skipped", number)
                continue
            while not driver.window.acquire(timeout=0.1):
                if signals():
                    return
            if signals():
                return
            driver.put(Job(number, line))
    except Exception as exc:  # noqa: BLE001 - an unreadable stdin ends the input, with a line
        log.error("cannot read the input: %s", one_line(exc))
    if not signals():  # a signal is the driver's to act on, not an end of input
        driver.put(EndOfInput())


class _LogSink:
    """Stdin mode's outcome sink: a log line per destination not sent, then a summary."""

    def __init__(self, signals: SignalFlag) -> None:
        self.signals = signals

    def done(self, job: Job, rows: list[WireFields], outcomes: list[Outcome]) -> None:
        if not rows:
            return
        counts = collections.Counter(outcome.kind for outcome in outcomes)
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome.kind == OutcomeKind.FAILED:
                log.warning("line %s: failed to send to %s: %s", job.key, _printable(row[1]), outcome.error)
            elif outcome.kind == OutcomeKind.RETRY:
                log.warning("line %s: not sent to %s (%s)", job.key, _printable(row[1]), outcome.error)
        log.info(
            "line %s: %d rows, %d sent, %d failed%s, %d ms",
            job.key,
            len(rows),
            counts[OutcomeKind.SENT] + counts[OutcomeKind.EMITTED],
            counts[OutcomeKind.FAILED],
            f", {counts[OutcomeKind.RETRY]} not sent" if counts[OutcomeKind.RETRY] else "",
            (time.monotonic() - job.started) * 1000,
        )

    def malformed(self, job: Job, error: WireError) -> None:
        log.error("line %s: %s", job.key, error)

    def tick(self) -> None:
        return None

    def stopping(self, stop: StopRequest) -> None:
        log.info("%s: stopped reading; finishing the batches in flight (at most %g s)",
                 signal.Signals(self.signals.first or signal.SIGTERM).name, stop.timeout)


def _printable(text: str) -> str:
    # An address may hold a quoted line break; a log line must stay one line.
    return text if text.isprintable() else repr(text)


def _chunks(stdin: BinaryIO, signals: SignalFlag) -> Iterator[bytes]:
    """Read ``stdin`` in chunks until end of input or a signal."""
    try:
        fd: int | None = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # io.BytesIO and friends
        fd = None
    if fd is None:
        read = stdin.read1 if hasattr(stdin, "read1") else stdin.read
        while not signals():
            data = read(_CHUNK)
            if not data:
                return
            yield data
        return
    # poll, not epoll: stdin may be a regular file, which epoll refuses.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(signals.read_fd, select.POLLIN)
    while True:
        ready = {ready_fd for ready_fd, _ in poller.poll()}
        if signals.read_fd in ready:
            try:
                os.read(signals.read_fd, 512)
            except BlockingIOError:
                pass
        if signals():
            return
        if fd in ready:
            data = os.read(fd, _CHUNK)
            if not data:
                return
            yield data


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Physical lines, each with its ``\\n`` (the last one may lack it)."""
    buf = bytearray()
    for chunk in chunks:
        scan = len(buf)  # the part already searched holds no newline
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", scan)) >= 0:
            yield bytes(buf[start : end + 1])
            start = scan = end + 1
        del buf[:start]
    if buf:
        yield bytes(buf)


def _batch_lines(lines: Iterable[bytes], decode: Any) -> Iterator[tuple[int, bytes]]:
    """Number the physical lines and join those that one quoted field spans.

    A quoted field may hold a line break, so a line with an odd number of ``"``
    continues on the next.  But a broken line (a quote never closed) must not swallow
    the good lines after it: when the next line is a valid batch line on its own, the
    broken one ends where it is.  Yields ``(first line number, bytes)``.
    """
    pending: list[bytes] = []
    first = quotes = size = 0
    for number, line in enumerate(lines, 1):
        count = line.count(b'"')
        if pending:
            if count % 2 == 0 and _is_batch(line, decode):
                yield first, b"".join(pending)
                pending = []
            else:
                pending.append(line)
                quotes += count
                size += len(line)
                if quotes % 2 == 0 or size > _MAX_JOINED_LINE:
                    yield first, b"".join(pending)
                    pending = []
                continue
        if count % 2:
            pending, first, quotes, size = [line], number, count, len(line)
        else:
            yield number, line
    if pending:
        yield first, b"".join(pending)


def _is_batch(line: bytes, decode: Any) -> bool:
    try:
        return bool(decode(line))
    except ValueError:
        return False
