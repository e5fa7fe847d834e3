"""``mailroom-collector``: the compatibility mode, batch lines on stdout.

``mailroom-collector | mailroom-sender`` works like the original pipeline: each
claimed batch is printed as one line and flushed *before* its claim commits, so
the rows become ``emitted`` only once their line is out.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import BinaryIO

import psycopg

from mailroom import config, ledger
from mailroom._process import SignalFlag
from mailroom.collector.engine import Collector
from mailroom.config import Settings
from mailroom.vocabulary import DeliveryStatus

log = logging.getLogger("mailroom.collector")


class StdoutSink:
    """Compatibility mode: one line per batch on stdout, flushed before the commit."""

    final_status = DeliveryStatus.EMITTED

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def actions(self) -> frozenset[int] | None:
        return None  # compatibility mode prints every action, as the original did

    def ready(self) -> bool:
        return True

    def idle(self) -> bool:
        # A line is flushed before its claim commits: nothing is ever in flight
        # here, so adaptive batching claims each notification at once (the pipe
        # to mailroom-sender is what pushes back, by blocking the write).
        return True

    def deliver(self, claim: ledger.Claim, line: bytes) -> None:
        self.stream.write(line)
        self.stream.flush()

    def fileno(self) -> int | None:
        return None

    def receive(self) -> None:
        return None

    def service(self, conn: psycopg.Connection) -> int:
        return 0

    def tick(self) -> None:
        return None


def run_stdout(settings: Settings, stream: BinaryIO | None = None) -> int:
    """``mailroom-collector``: print batches on stdout until SIGTERM/SIGINT; exit code."""
    stop = SignalFlag()
    stop.install((signal.SIGTERM, signal.SIGINT), second_is_fatal=True)
    sink = StdoutSink(stream if stream is not None else sys.stdout.buffer)
    collector = Collector(settings, sink, stop, wakeup_fd=stop.read_fd)
    try:
        code = collector.run_or_exit_code()
    except BrokenPipeError:
        # The reader went away: the rows of the batch being written stay queued.
        log.error("stdout closed by the reader; stopping (unsent rows stay queued)")
        _silence_stdout()
        return config.EXIT_FAILURE
    if code is not None:
        return code
    log.info("stopped after %d batches, %d rows", collector.batches, collector.rows)
    return config.EXIT_OK


def _silence_stdout() -> None:
    # Python flushes stdout at exit; on a closed pipe that would print a traceback.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
