"""The collector against real PostgreSQL: backlog drain rate and commit-to-stdout latency.

- drain: rows/s to drain a whole backlog of queued tokens, in-process
  ``Collector.drain()`` (claim + skip check + sign + encode + write + commit, the
  real code path), at limit 1000 and limit 10, from 100,000 and from 1,000,000
  tokens (the cost per batch must not grow with the table).  Each round drains a
  fresh copy of the backlog database, so no round pays for another's dead rows.
- latency: the real ``mailroom-collector`` process, one account inserted every
  5 ms (200/s) for a few seconds at limit 10; time from each commit to its row on
  stdout.

Targets (2-core machine): >= 100,000 rows/s at limit 1000, >= 10,000 rows/s at
limit 10, the 1M rate within 20 % of the 100k one. Run::

    python -m pytest benchmarks/test_collector.py --benchmark-only
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from conftest import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from collector_util import CollectorProcess, backend_pids, wait_for  # noqa: E402
from pgutil import SECRET_KEY_HEX, create_database, drop_database  # noqa: E402

from mailroom import config  # noqa
from mailroom.collector import Collector, StdoutSink  # noqa: E402
from mailroom.ledger import migrate  # noqa: E402

SIZES = {"100k": 100_000, "1M": 1_000_000}


def fill_backlog(url: str, n: int) -> None:
    """``n`` provisioned accounts, each with a queued activation token (bulk SQL, triggers off)."""
    with psycopg.connect(url) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO accounts (id, email, login) SELECT i, 'user' || i || '@example.test',"
                     " 'user' || i FROM generate_series(1, %s) AS i", (n,))
        conn.execute("INSERT INTO tokens (id, action, account) SELECT i, 'activation', i"
                     " FROM generate_series(1, %s) AS i", (n,))
        conn.execute("INSERT INTO deliveries (job_type, token, priority) SELECT 'mailroom', i, 1"
                     " FROM generate_series(1, %s) AS i", (n,))
        # With triggers off, the queue rows the insert trigger would add.
        conn.execute("INSERT INTO delivery_queue (job_type, token, priority, next_attempt_at)"
                     " SELECT job_type, token, priority, next_attempt_at FROM deliveries")
        conn.execute("SELECT setval('accounts_id_seq', %s), setval('tokens_id_seq', %s)", (n, n))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE deliveries")
        conn.execute("VACUUM ANALYZE delivery_queue")


@pytest.fixture(scope="module", params=list(SIZES))
def backlog_template(request):
    """A database holding the backlog, built once per size; rounds drain copies of it."""
    url = create_database("mailroom_bench_tpl")
    migrate.up(url)
    fill_backlog(url, SIZES[request.param])
    yield request.param, url
    drop_database(url)


@pytest.mark.parametrize("limit", [1000, 10])
def test_backlog_drain(benchmark, backlog_template, limit):
    """Each round drains the whole backlog of a fresh copy, with ``Collector.drain()``."""
    size, template_url = backlog_template
    drained: list[int] = []
    # Copies not yet dropped: with --benchmark-disable, pytest-benchmark calls
    # setup but never teardown, so the test drops what is left itself.
    copies: list[Collector] = []
    devnull = open(os.devnull, "wb")

    def setup():
        url = create_database("mailroom_bench", template_url=template_url)
        settings = config.load({"MAILROOM_DATABASE_URL": url, "MAILROOM_SECRET_KEY": SECRET_KEY_HEX,
                                "MAILROOM_BATCH_LIMIT": str(limit)})
        collector = Collector(settings, StdoutSink(devnull), lambda: False)
        copies.append(collector)
        collector.connect()     # connection and LISTEN are not part of the drain
        return (collector,), {}

    def teardown(collector):
        copies.remove(collector)
        collector._close()
        drop_database(collector.settings.database_url)

    def drain(collector):
        drained.append(collector.drain())

    try:
        benchmark.pedantic(drain, setup=setup, teardown=teardown, rounds=3, iterations=1)
    finally:
        for collector in list(copies):
            teardown(collector)
        devnull.close()
    assert drained and set(drained) == {SIZES[size]}, drained    # every token, each round
    benchmark.extra_info.update(backlog=size, limit=limit)
    record(benchmark, f"drain limit {limit}", size, SIZES[size])


def test_commit_to_stdout_latency(benchmark):
    url = create_database("mailroom_bench")
    migrate.up(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_") or k == "MAILROOM_IMPL"}
    env.update(MAILROOM_DATABASE_URL=url, MAILROOM_SECRET_KEY=SECRET_KEY_HEX, MAILROOM_BATCH_LIMIT="10")
    collector = CollectorProcess(env)
    latencies: list[float] = []
    try:
        wait_for(lambda: backend_pids(url), what="collector connection")

        def run() -> None:
            count = 600
            committed: dict[str, float] = {}
            arrived: dict[str, float] = {}

            def read() -> None:
                from mailroom.wire import decode_line
                while len(arrived) < count:
                    line = collector.lines.get(timeout=30)
                    now = time.monotonic()
                    for row in decode_line(line):
                        arrived[row[1]] = now

            reader = threading.Thread(target=read)
            reader.start()
            with psycopg.connect(url, autocommit=True) as conn:
                start = time.monotonic()
                for i in range(count):
                    target = start + i / 200
                    if (delay := target - time.monotonic()) > 0:
                        time.sleep(delay)       # pacing the load generator, not waiting on the system
                    email = f"lat{len(latencies)}_{i}@example.test"
                    conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)", (email, email))
                    committed[email] = time.monotonic()
            reader.join(60)
            latencies.extend(arrived[e] - committed[e] for e in committed)

        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        collector.stop()
        drop_database(url)
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    benchmark.extra_info.update(p50_ms=round(p50, 1), p99_ms=round(p99, 1), max_ms=round(ordered[-1] * 1000, 1))
    print(f"\ncommit-to-stdout latency at 200 inserts/s, limit 10: p50 {p50:.1f} ms, p99 {p99:.1f} ms,"
          f" max {ordered[-1] * 1000:.1f} ms")
