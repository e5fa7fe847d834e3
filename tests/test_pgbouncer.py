"""Issue 20 item 7: the collector behind a real PgBouncer in transaction pooling mode.

PgBouncer (the Debian package) runs in front of the test's own database with
``pool_mode = transaction`` and a pool of two server connections: LISTEN through it
never hears a NOTIFY, and statements of one client land on either server connection.
The real supervisor claims through it; duplicates are counted at the SES stub,
statuses and latencies read from the ledger.
"""

from __future__ import annotations

import collections
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from collector_util import wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from ses_emulator import free_port
from supervisor_util import ledger, supervisor_env

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)

pytestmark = [
    pytest.mark.skipif(PGBOUNCER is None, reason="needs pgbouncer (apt-get install pgbouncer)"),
    pytest.mark.timeout(180),
]


@pytest.fixture
def pooled(db) -> Iterator[str]:
    """URL of ``db`` through a PgBouncer in transaction mode started for this test."""
    assert PGBOUNCER is not None
    target = conninfo_to_dict(db)
    where = Path(tempfile.mkdtemp(prefix="mailroom-pgbouncer-"))
    port = free_port()
    (where / "users.txt").write_text('"postgres" ""\n')
    (where / "pgbouncer.ini").write_text(f"""
[databases]
* = host={target.get("host", "127.0.0.1")} port={target.get("port", "5432")}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {where / "users.txt"}
pool_mode = transaction
default_pool_size = 2
max_client_conn = 100
logfile = {where / "pgbouncer.log"}
""")
    argv = [PGBOUNCER, str(where / "pgbouncer.ini")]
    if os.geteuid() == 0:  # it refuses to run as root
        user = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
        os.chown(where, user.pw_uid, user.pw_gid)
        for path in where.iterdir():
            os.chown(path, user.pw_uid, user.pw_gid)
        argv[1:1] = ["-u", user.pw_name]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = make_conninfo(db, host="127.0.0.1", port=str(port))
    try:
        wait_for(lambda: _answers(url) or proc.poll() is not None, what="pgbouncer")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(where, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _insert_one_at_a_time(url: str, n: int, prefix: str, gap: float) -> None:
    """``n`` sign-ups, each its own transaction, ``gap`` seconds apart (directly: the app)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n):
            conn.execute("INSERT INTO accounts (email, login, status)"
                         " VALUES (%s, %s, 'provisioned')", (f"{prefix}{i}@example.test", f"{prefix}{i}"))
            time.sleep(gap)


def _latencies(url: str, first: int) -> tuple[float, float]:
    """p50 and max of created -> sent of the ``first`` tokens (the ones inserted one
    at a time: a burst's latency is mostly its own sending), seconds."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s), max(s) FROM"
                           " (SELECT extract(epoch FROM sent_at - created_at)::float8 AS s"
                           "  FROM deliveries WHERE status = 'sent' ORDER BY token LIMIT %s) AS t",
                           (first,)).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def _run(db: str, env: dict[str, str], supervisors, stub, prefix: str) -> tuple[float, float]:
    sup = supervisors(env)
    sup.worker("collector")
    wait_for(lambda: "does not deliver notifications" in sup.log(), what="the pooled connection detected")
    _insert_one_at_a_time(db, 40, prefix, 0.05)
    with psycopg.connect(db) as conn:  # and a burst in one transaction
        conn.execute("INSERT INTO accounts (email, login, status) SELECT %s || i || '@example.test',"
                     " %s || i, 'provisioned' FROM generate_series(1, 200) AS i", (prefix + "b", prefix + "b"))
    wait_for(lambda: ledger(db).get("sent") == 240, timeout=60, what="240 sent")
    assert sup.stop() == 0
    log = sup.log()
    assert "Traceback" not in log and 'prepared statement "' not in log, log
    assert len(sup.started("collector")) == 1, log
    counts = collections.Counter(a for request in stub.bulk for a in request.addresses)
    assert len(counts) == 240 and max(counts.values()) == 1, counts.most_common(3)
    return _latencies(db, 40)


def test_behind_pgbouncer_without_a_listen_url_the_collector_polls(db, pooled, base_env, supervisors, stub):
    env = supervisor_env(base_env, pooled, stub.url, batch_limit=50, batch_timeout=1000)
    p50, worst = _run(db, env, supervisors, stub, "poll_")
    print(f"PgBouncer, polling every 1 s: created -> sent (40 single sign-ups) p50 {p50 * 1000:.0f} ms,"
          f" max {worst * 1000:.0f} ms")
    # Bounded by the poll interval (1 s), the claim and the send.
    assert worst < 3.0, worst


def test_behind_pgbouncer_with_a_listen_url_notifications_wake_the_collector(db, pooled, base_env,
                                                                             supervisors, stub):
    env = supervisor_env(base_env, pooled, stub.url, batch_limit=50, batch_timeout=1000, listen_url=db)
    p50, worst = _run(db, env, supervisors, stub, "listen_")
    print(f"PgBouncer, LISTEN on MAILROOM_LISTEN_URL: created -> sent (40 single sign-ups) p50 {p50 * 1000:.0f} ms,"
          f" max {worst * 1000:.0f} ms")
    # Woken by the notification, not by a poll a second later.
    assert p50 < 0.5, p50
