"""The floors the benchmarks are measured against: the same unavoidable work, nothing else.

- :func:`sha256_floor`: the two SHA-256 compressions per row that HMAC-SHA256 needs
  (OpenSSL through hashlib, one call for the whole batch: no per-row overhead at all).
- :class:`ClaimFloor`: the collector's own claim statement (same text, prepared the
  same way, same session set-up), run back to back by a minimal loop: no signing, no
  encoding, no sink.  What it reaches is what the database allows.
- :class:`BareSes`: the same ``SendBulkTemplatedEmail`` calls as the sender, built
  in advance, made by bare threads through a client configured like the sender's.
- :func:`db_round_trip`: the median ``SELECT 1``, the yardstick for latencies.

Plus the test-only variant that shows a target catches a regression
(:data:`SLOW_CLAIM`), a sink that throws batches away (:class:`NullSink`) and one
that acknowledges them at once (:class:`AckSink`).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import threading
import time
from collections import deque
from typing import Any

import psycopg

from mailroom import ledger
from mailroom.collector import Collector
from mailroom.config import Settings
from mailroom.vocabulary import Outcome, OutcomeKind

#: ``MAILROOM_BENCH_SLOW_CLAIM=1``: the drain benchmarks' collector makes one extra
#: round trip (``SELECT pg_sleep(0.001)``) before each claim, the kind of regression
#: the drain target exists to catch.  Read here only, never by mailroom itself.
SLOW_CLAIM = os.environ.get("MAILROOM_BENCH_SLOW_CLAIM", "").strip() not in ("", "0")


# --- hot path -----------------------------------------------------------------------------

#: HMAC-SHA256 of a message shorter than 56 bytes (``/recover`` + 32-byte secret + code
#: is 45) with the key's pads precomputed: one compression for the inner hash, one for
#: the outer; SHA-256 compresses 64-byte blocks.
COMPRESSIONS_PER_ROW = 2
_BLOCK = 64


def sha256_floor(rows: int) -> None:
    """Compress ``rows`` x 2 blocks with SHA-256 in one OpenSSL call."""
    hashlib.sha256(_buffer(rows)).digest()


_buffers: dict[int, bytes] = {}


def _buffer(rows: int) -> bytes:
    # Allocated once per size, outside any timing.  55 bytes short of the last block
    # so the padding does not add one: exactly rows x 2 compressions.
    if rows not in _buffers:
        _buffers[rows] = bytes(rows * COMPRESSIONS_PER_ROW * _BLOCK - 9)
    return _buffers[rows]


# --- database -----------------------------------------------------------------------------


def db_round_trip(url: str, samples: int = 200) -> float:
    """The median seconds of ``SELECT 1`` (prepared) on a new connection to ``url``."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT 1", prepare=True)
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            conn.execute("SELECT 1", prepare=True).fetchone()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class NullSink:
    """A batch sink for the collector that drops every batch (``claimed`` mode:
    the claim commits, then the line is handed over and forgotten)."""

    final_status = "claimed"

    def ready(self) -> bool:
        return True

    def deliver(self, claim: ledger.Claim, line: bytes) -> None:
        pass

    def fileno(self) -> int | None:
        return None

    def receive(self) -> None:
        return None

    def service(self, conn: psycopg.Connection) -> int:
        return 0

    def tick(self) -> None:
        return None

    def actions(self) -> frozenset[int] | None:
        return None


class AckSink(NullSink):
    """A sink that acknowledges every batch at once as sent: the collector's whole
    share of the pipeline's work (claim, sign, encode, hand over, write the outcomes
    back to the ledger, as the supervised worker does), and nothing of the sender's.

    Set :attr:`conn` to the collector's connection after it connects.
    """

    def __init__(self, settings: Settings) -> None:
        self.queue = settings.queue_name
        self.max_attempts = settings.send_max_attempts
        self.conn: psycopg.Connection | None = None

    def deliver(self, claim: ledger.Claim, line: bytes) -> None:
        sent = Outcome(OutcomeKind.SENT, message_id="0100018f-0000-0000-0000-000000000000-000000")
        ledger.record_outcomes(self.conn, self.queue, [(row[5], sent) for row in claim.rows],
                               claimed_at=claim.claimed_at, max_attempts=self.max_attempts)


class SlowClaimCollector(Collector):
    """The collector with one extra round trip of 1 ms before each claim (test only)."""

    def claim_once(self) -> ledger.Claim:
        assert self.conn is not None
        self.conn.execute("SELECT pg_sleep(0.001)")
        return super().claim_once()


def collector_class() -> type[Collector]:
    """The collector the drain benchmarks run: the real one, or :class:`SlowClaimCollector`."""
    return SlowClaimCollector if SLOW_CLAIM else Collector


class ClaimFloor:
    """The collector's claims, run back to back with nothing else, on its own backlog copy.

    The connection is the collector's own (:meth:`Collector.connect`: the same session
    settings and LISTEN), and the statement is the one :func:`mailroom.ledger.claim`
    prepares: it is prepared by a claim that is rolled back, then found by name in
    ``pg_prepared_statements``, so the floor cannot drift from the product's SQL.  Each
    claim is the collector's transaction, ``BEGIN; EXECUTE`` then ``COMMIT``; the rows
    are fetched into Python, which any psycopg client has to do.
    """

    def __init__(self, settings: Settings, sink: Any) -> None:
        collector = Collector(settings, sink, lambda: False)
        self.conn = collector.connect()
        self.limit = settings.batch_limit
        self.rows = 0
        conn = self.conn
        conn.execute("BEGIN")
        ledger.claim(conn, settings.queue_name, self.limit, lease_ms=settings.claim_timeout,
                     final_status=sink.final_status)
        conn.rollback()
        names = [name for name, in conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE 'mailroom%' AND statement ~ 'delivery_queue'")]
        assert len(names) == 1, f"expected the claim statement alone to be prepared, found {names}"
        self._query = f"BEGIN; EXECUTE {names[0]}".encode()

    def drain(self, rows: int) -> int:
        """Claim until ``rows`` rows were claimed or a claim comes back short; return the count."""
        conn, limit, done = self.conn, self.limit, 0
        while done < rows:
            cur = conn.execute(self._query, prepare=False)
            cur.nextset()
            head, *claimed = cur.fetchall()
            conn.execute(b"COMMIT", prepare=False)
            done += len(claimed)
            if head[0] < limit:
                break
        self.rows += done
        return done

    def close(self) -> None:
        self.conn.close()


# --- SES ----------------------------------------------------------------------------------


class BareSes:
    """``calls`` (keyword arguments of ``send_bulk_templated_email``) made by
    ``threads`` bare threads through one client built by the sender's own
    :func:`mailroom.sender.ses.make_client`; every destination must come back a success."""

    def __init__(self, settings: Settings, calls: list[dict[str, Any]], threads: int) -> None:
        from mailroom.sender import ses

        self.client = ses.make_client(settings, connect_timeout=5, read_timeout=20, pool_size=threads)
        self.calls = calls
        self.threads = threads

    def run(self) -> None:
        work = deque(self.calls)
        failures: list[BaseException] = []

        def loop() -> None:
            try:
                while True:
                    try:
                        call = work.popleft()
                    except IndexError:
                        return
                    answer = self.client.send_bulk_templated_email(**call)
                    if len(answer["Status"]) != len(call["Destinations"]):
                        raise AssertionError("the stub did not accept every destination")
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        workers = [threading.Thread(target=loop) for _ in range(self.threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if failures:
            raise failures[0]


def sender_stage(pipe: Any, endpoint_url: str, work: list[list[tuple]]) -> None:
    """Child process: a :class:`~mailroom.sender.Sender` that sends ``work`` each time
    the parent says ``"go"`` and answers with the seconds it took; ``"stop"`` ends it.

    A process of its own, as the sender worker is: in the parent it would share the
    interpreter lock with the collector stage running beside it.
    """
    from mailroom.sender import Sender
    from mailroom.vocabulary import OutcomeKind

    sender = Sender(Settings(ses_endpoint_url=endpoint_url, ses_source="noreply@mailroom.test",
                             ses_max_send_rate=10**9))
    sender.start()
    try:
        while pipe.recv() == "go":
            start = time.perf_counter()
            for future in [sender.submit(batch) for batch in work]:
                assert future.result(120)[0].kind == OutcomeKind.SENT
            pipe.send(time.perf_counter() - start)
    finally:
        sender.close()
