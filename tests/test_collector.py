"""mailroom-collector as a real process against real PostgreSQL (issue: collector)."""

from __future__ import annotations

import csv
import io
import pathlib
import subprocess
import threading
import time

import psycopg
import pytest
from collector_util import CollectorProcess, backend_pids, collector_env, insert_accounts, wait_for
from pgutil import console_script

from mailroom.ledger import migrate
from mailroom.wire import decode_line

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture
def run_collector(base_env):
    started: list[CollectorProcess] = []

    def start(url: str, **extra) -> CollectorProcess:
        proc = CollectorProcess(collector_env(base_env, url, **extra))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def rows_of(line: bytes) -> list[str]:
    """Split a batch line into its rows' texts (fields re-joined as printed)."""
    fields = next(csv.reader(io.StringIO(line.decode().rstrip("\n"))))
    return [",".join(fields[i:i + 5]) for i in range(0, len(fields), 5)]


def ledger_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT status::text, count(*) FROM deliveries GROUP BY 1").fetchall())


def test_upgrade_path_prints_the_originals_rows(fresh_db, run_collector, base_env):
    migrate.up(fresh_db, steps=1)                       # the original schema: version 0
    with psycopg.connect(fresh_db) as conn:
        conn.execute((DATA / "fixture.sql").read_text())
    env = dict(base_env, MAILROOM_DATABASE_URL=fresh_db)
    subprocess.run(console_script("mailroom") + ["migrate", "up"], env=env, check=True,
                   capture_output=True, timeout=60)

    # The original's batching, exactly: the rows and lines are compared with its output.
    collector = run_collector(fresh_db, batch_limit=3, batch_mode="fixed")
    lines = collector.take(5)
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    assert all(len(decode_line(line)) <= 3 for line in lines)
    expected = [row for line in (DATA / "expected-limit3.txt").read_bytes().splitlines()
                for row in rows_of(line + b"\n")]
    got = [row for line in lines for row in rows_of(line)]
    assert sorted(got) == sorted(expected)
    # Password recovery (tokens 1 and 8) is claimed before activation.
    assert [r.split(",")[0] for r in got] == ["2", "2", "1", "1", "1"]
    assert collector.quiet(0.5) == []
    assert collector.stop() == 0
    counts = ledger_counts(fresh_db)
    assert counts == {"emitted": 5, "skipped": 1}        # token 5: suspended account


@pytest.mark.timing
def test_500_accounts_in_one_transaction_arrive_within_one_batch_timeout(db, run_collector):
    collector = run_collector(db, batch_limit=10, batch_timeout=1000)
    wait_for(lambda: backend_pids(db), what="collector connection")
    start = time.monotonic()
    insert_accounts(db, 500, "bulk")                     # ONE folded notification
    lines = collector.take(500, timeout=10)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0 + 1.0, f"took {elapsed:.2f}s"
    emails = [row[1] for line in lines for row in decode_line(line)]
    assert len(emails) == len(set(emails)) == 500
    assert all(len(decode_line(line)) <= 10 for line in lines)


def test_out_of_order_commits_both_arrive(db, run_collector):
    collector = run_collector(db, batch_limit=1)
    wait_for(lambda: backend_pids(db), what="collector connection")
    first = psycopg.connect(db)
    first.execute("INSERT INTO accounts (email, login) VALUES ('early@x.test', 'early')")  # lower id
    insert_accounts(db, 1, "late")                       # higher id, commits first
    collector.take(1)
    first.commit()                                       # the lower id commits last
    first.close()
    collector.take(1)
    emails = sorted(row[1] for line in collector.all_lines for row in decode_line(line))
    assert emails == ["early@x.test", "late1@example.test"]


def test_tokens_inserted_while_stopped_arrive_at_start(db, run_collector):
    insert_accounts(db, 25, "waiting")
    collector = run_collector(db, batch_limit=10)
    lines = collector.take(25)
    assert len(lines) == 3


def test_reconnects_after_backend_terminated(db, run_collector):
    collector = run_collector(db, batch_limit=5)
    # Listening, not only connected: a backend terminated while the collector still sets
    # its session up is a failed connection attempt, logged as such (CI saw that race).
    wait_for(lambda: "listening on" in collector.log(), what="collector listening")
    pids = wait_for(lambda: backend_pids(db), what="collector connection")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    insert_accounts(db, 7, "during")                     # its NOTIFY reaches nobody
    lines = collector.take(7, timeout=20)
    assert sum(len(decode_line(line)) for line in lines) == 7
    new_pids = wait_for(lambda: backend_pids(db), what="reconnection")
    assert set(new_pids).isdisjoint(pids)
    assert "database connection lost" in collector.log()


def test_ineligible_tokens_are_skipped_and_odd_fields_quoted(db, run_collector):
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO accounts (email, login, status) VALUES"
                     " ('q\"uote@x.test', 'comma,login', 'provisioned'),"
                     " ('new@x.test', E'line\\nbreak', 'provisioned'),"
                     " ('gone@x.test', 'expired', 'provisioned'),"
                     " ('used@x.test', 'consumed', 'provisioned'),"
                     " ('sus@x.test', 'suspended', 'active'),"
                     " ('prov@x.test', 'provisioned-recovery', 'provisioned')")
        conn.execute("UPDATE tokens SET expires_at = 1000 FROM accounts a"
                     " WHERE a.id = tokens.account AND a.login = 'expired'")
        conn.execute("UPDATE tokens SET consumed_at = 1000 FROM accounts a"
                     " WHERE a.id = tokens.account AND a.login = 'consumed'")
        conn.execute("UPDATE accounts SET status = 'suspended' WHERE login = 'suspended'")
        conn.execute("INSERT INTO tokens (action, account) SELECT 'password_recovery', id"
                     " FROM accounts WHERE login IN ('suspended', 'provisioned-recovery')")
    collector = run_collector(db, batch_limit=10)
    lines = collector.take(3)
    assert collector.quiet(0.5) == []
    rows = [row for line in lines for row in decode_line(line)]
    assert sorted((r[1], r[2]) for r in rows) == [
        ("new@x.test", "line\nbreak"), ("prov@x.test", "provisioned-recovery"), ('q"uote@x.test', "comma,login")]
    parsed = next(csv.reader(io.StringIO(lines[0].decode(), newline="")))
    assert len(parsed) == 15 and {"comma,login", "line\nbreak", 'q"uote@x.test'} <= set(parsed)
    assert collector.stop() == 0
    counts = ledger_counts(db)
    assert counts.get("emitted") == 3
    # The expired and the consumed activation tokens, recovery for a suspended and
    # for a not yet activated account: queued by the trigger, skipped at claim.
    assert counts.get("skipped") == 4


def test_three_collectors_share_a_queue_exactly_once(db, run_collector):
    collectors = [run_collector(db, batch_limit=25, batch_timeout=100) for _ in range(3)]
    wait_for(lambda: len(backend_pids(db)) == 3, what="three collectors")

    def writer(n: int) -> None:
        for chunk in range(20):
            insert_accounts(db, 50, f"w{n}c{chunk}_")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 3 * 20 * 50
    wait_for(lambda: ledger_counts(db).get("emitted", 0) == total, timeout=60, what="all emitted")
    for c in collectors:
        assert c.stop() == 0
    emails = [row[1] for c in collectors for line in c.all_lines for row in decode_line(line)]
    assert len(emails) == total and len(set(emails)) == total
    assert all(c.all_lines for c in collectors), "every collector took a share"


def test_sigterm_exits_zero(db, run_collector):
    collector = run_collector(db)
    wait_for(lambda: backend_pids(db), what="collector connection")
    assert collector.stop() == 0
    assert "stopped after" in collector.log()


def test_status_command(db, base_env):
    insert_accounts(db, 3, "st")
    env = dict(base_env, MAILROOM_DATABASE_URL=db)
    out = subprocess.run(console_script("mailroom") + ["status"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "queued" in out and "3" in out
    import json
    report = json.loads(subprocess.run(console_script("mailroom") + ["status", "--json"], env=env,
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    assert report["counts"]["queued"] == 3 and report["counts"]["sent"] == 0


def test_missing_schema_exits_with_its_code(fresh_db, base_env):
    env = dict(base_env, MAILROOM_DATABASE_URL=fresh_db)
    proc = subprocess.run(console_script("mailroom-collector"), env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3
    assert "mailroom migrate up" in proc.stderr


def test_health_check_after_a_quiet_interval(db, run_collector):
    collector = run_collector(db, batch_timeout=100, healthcheck_interval=300, log_level="DEBUG")
    wait_for(lambda: collector.log().count("health check ok") >= 2, timeout=10, what="two health checks")
    insert_accounts(db, 2, "alive")
    assert len(collector.take(2)) >= 1
    assert collector.stop() == 0


class _RefusingSink:
    """A pipe-like sink (rows committed as ``claimed`` before the hand-off) whose
    first hand-off fails, as when the supervisor's pipe breaks."""

    final_status = "claimed"

    def __init__(self) -> None:
        self.delivered: list[bytes] = []
        self.refused = 0

    def ready(self) -> bool:
        return True

    def deliver(self, claim, line: bytes) -> None:
        if not self.refused:
            self.refused += 1
            raise BrokenPipeError("the pipe is gone")
        self.delivered.append(line)

    def fileno(self):
        return None

    def receive(self) -> None:
        pass

    def service(self, conn) -> int:
        return 0

    def actions(self):
        return None

    def tick(self) -> None:
        pass


def test_a_failed_hand_off_puts_the_batch_back(db, base_env):
    from mailroom import config
    from mailroom.collector import Collector

    insert_accounts(db, 4, "handoff")
    sink = _RefusingSink()
    settings = config.load(dict(base_env, MAILROOM_DATABASE_URL=db, MAILROOM_BATCH_LIMIT="10"))
    collector = Collector(settings, sink, lambda: False)
    collector.connect()
    try:
        with pytest.raises(BrokenPipeError):
            collector.claim_once()
        with psycopg.connect(db) as conn:
            # Back in the queue, the attempt given back: nothing was tried.
            assert conn.execute("SELECT status::text, attempts FROM deliveries").fetchall() == \
                [("queued", 0)] * 4
            assert conn.execute("SELECT count(*) FROM delivery_queue WHERE claimed_at IS NULL"
                                ).fetchone()[0] == 4
        assert len(collector.claim_once().rows) == 4
        assert [len(decode_line(line)) for line in sink.delivered] == [4]
        assert ledger_counts(db) == {"claimed": 4}
    finally:
        collector._close()
