"""Flow control (issue 13): adaptive batching against real PostgreSQL and real processes.

``MAILROOM_BATCH_MODE=adaptive`` (the default) claims a notification at once while
the pipeline is idle; while batches are in flight, notifications pile up and are
claimed together when the pipeline is idle again, at the limit, or at the timeout.
``fixed`` keeps the original's rule (limit or timeout only).  The timeouts here are
long on purpose: a test that passes only because a timeout fired proves nothing.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from collector_util import CollectorProcess, backend_pids, collector_env, insert_accounts, wait_for
from supervisor_util import SupervisorProcess, ledger, supervisor_env

from mailroom.wire import decode_line


@pytest.fixture
def started():
    """Processes started by a test, killed at its end whatever happened."""
    procs: list[SupervisorProcess | CollectorProcess] = []
    yield procs
    for proc in procs:
        proc.kill()


def start_supervisor(started, env: dict[str, str], url: str) -> SupervisorProcess:
    """A supervisor whose collector listens and whose sender has its SES client."""
    sup = SupervisorProcess(env)
    started.append(sup)
    wait_for(lambda: backend_pids(url), timeout=30, what="collector connection")
    wait_for(lambda: "sending through SES" in sup.log(), timeout=30, what="sender ready")
    return sup


def insert_one_by_one(url: str, n: int, prefix: str) -> None:
    """``n`` accounts in ``n`` transactions: ``n`` notifications."""
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n):
            conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)",
                         (f"{prefix}{i}@example.test", f"{prefix}{i}"))


@pytest.mark.timing
def test_adaptive_sends_a_lone_account_at_once(db, base_env, stub, started):
    env = supervisor_env(base_env, db, stub.url, control_socket="off", batch_timeout=10_000, batch_limit=10)
    sup = start_supervisor(started, env, db)
    start = time.monotonic()
    insert_accounts(db, 1, "quiet")
    stub.wait_for(1, timeout=2.0)
    elapsed = time.monotonic() - start
    assert [a for r in stub.bulk for a in r.addresses] == ["quiet1@example.test"]
    assert elapsed < 2.0, f"took {elapsed:.2f}s"
    wait_for(lambda: ledger(db).get("sent") == 1, what="sent recorded")
    assert sup.stop() == 0


@pytest.mark.timing
def test_fixed_mode_still_waits_for_the_timeout(db, base_env, stub, started):
    env = supervisor_env(base_env, db, stub.url, control_socket="off", batch_timeout=3_000, batch_limit=10,
                         batch_mode="fixed")
    sup = start_supervisor(started, env, db)
    start = time.monotonic()
    insert_accounts(db, 1, "patient")
    time.sleep(1.5)
    assert stub.bulk == [], "fixed mode claimed before the timeout"
    stub.wait_for(1, timeout=10.0)
    assert time.monotonic() - start >= 2.9
    # At the limit, it does not wait: ten notifications make a batch at once.
    start = time.monotonic()
    insert_one_by_one(db, 10, "full")
    requests = stub.wait_for(2, timeout=2.5)
    assert len(requests[1].addresses) == 10
    assert time.monotonic() - start < 2.5
    assert sup.stop() == 0


@pytest.mark.timing
def test_adaptive_collects_while_a_batch_is_in_flight(db, base_env, stub, started):
    env = supervisor_env(base_env, db, stub.url, control_socket="off", batch_timeout=2_000, batch_limit=10)
    sup = start_supervisor(started, env, db)
    stub.gate.clear()                                    # SES holds every call
    insert_accounts(db, 1, "first")
    stub.wait_for(1, timeout=2.0)                        # claimed and sent at once
    start = time.monotonic()
    insert_one_by_one(db, 5, "later")
    time.sleep(0.7)
    # A batch is in flight: the five notifications wait for it (or the timeout).
    assert ledger(db).get("queued") == 5
    # The timeout stays an upper bound, in flight or not.
    wait_for(lambda: ledger(db).get("claimed") == 6, timeout=5, interval=0.02, what="claim at the timeout")
    assert time.monotonic() - start >= 1.9
    stub.gate.set()
    requests = stub.wait_for(2, timeout=5.0)
    assert sorted(len(r.addresses) for r in requests) == [1, 5]
    wait_for(lambda: ledger(db).get("sent") == 6, what="all sent")
    # Once the pipeline is idle, a burst of notifications goes out as soon as the
    # batch in flight comes back: well before the 2 s timeout.
    stub.gate.clear()
    insert_accounts(db, 1, "head")
    stub.wait_for(3, timeout=2.0)
    insert_one_by_one(db, 3, "tail")
    time.sleep(0.3)
    start = time.monotonic()
    stub.gate.set()
    requests = stub.wait_for(4, timeout=2.0)
    assert time.monotonic() - start < 1.0
    assert len(requests[3].addresses) == 3
    assert sup.stop() == 0


def _in_loop(url: str) -> bool:
    """Whether the one collector session left has run its listen loop's next_due_in query."""
    with psycopg.connect(url, autocommit=True) as conn:
        sessions = conn.execute(
            "SELECT query LIKE '%%next_attempt_at%%' FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'mailroom-collector'"
        ).fetchall()
    return sessions == [(True,)]


@pytest.mark.timing
def test_stdout_adaptive_prints_at_once_and_fixed_waits(db, base_env, started):
    adaptive = CollectorProcess(collector_env(base_env, db, batch_timeout=10_000))
    started.append(adaptive)
    wait_for(lambda: backend_pids(db), what="collector connection")
    start = time.monotonic()
    insert_accounts(db, 1, "now")
    lines = adaptive.take(1, timeout=2.0)
    assert time.monotonic() - start < 2.0
    assert [row[1] for row in decode_line(lines[0])] == ["now1@example.test"]
    assert adaptive.stop() == 0

    fixed = CollectorProcess(collector_env(base_env, db, batch_timeout=2_000, batch_mode="fixed"))
    started.append(fixed)
    # Its own connection, not the stopped one's backend on its way out; and past the
    # drain every collector runs when it connects (it would claim the row at once):
    # its loop's first query (next_due_in) comes after that drain.
    wait_for(lambda: "listening on" in fixed.log(), what="collector connection")
    wait_for(lambda: _in_loop(db), what="the collector past its start-up drain")
    insert_accounts(db, 1, "later")
    assert fixed.quiet(1.0) == []
    assert len(fixed.take(1, timeout=5.0)) == 1
    assert fixed.stop() == 0


def test_a_backlog_goes_out_in_full_calls_exactly_once(db, base_env, stub, started):
    """Default window and concurrency (auto), batches of 10, SES answering in 60 ms:
    the sender fills its calls from several batches, every token goes out once."""
    from ses_emulator import success

    stub.default = success(delay=0.06)
    stub.quota_rate = 1000.0
    insert_accounts(db, 600, "backlog")
    env = supervisor_env(base_env, db, stub.url, control_socket="off", batch_limit=10)
    del env["MAILROOM_SES_MAX_SEND_RATE"]               # the stub's quota: 1000/s
    sup = SupervisorProcess(env)
    started.append(sup)
    wait_for(lambda: ledger(db).get("sent") == 600, timeout=60, interval=0.1, what="600 sent")
    assert sup.stop() == 0
    addresses = [a for r in stub.bulk for a in r.addresses]
    assert len(addresses) == len(set(addresses)) == 600
    sizes = [len(r.addresses) for r in stub.bulk]
    # Batches of 10 made calls of 10 before; the first calls go before the window opens.
    assert max(sizes) == 50 and sum(sizes) / len(sizes) >= 20, sizes
