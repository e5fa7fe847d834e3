"""The collector survives a PostgreSQL restart (run serially: it restarts the server).

Marked ``pg_restart``: the parallel run excludes it, a second, serial run does it
alone, so no other test loses its connections to the restart.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import psycopg
import pytest
from collector_util import CollectorProcess, backend_pids, collector_env, insert_accounts, wait_for
from pgutil import ADMIN_URL, create_database, drop_database

from mailroom.ledger import migrate
from mailroom.wire import decode_line

pytestmark = pytest.mark.pg_restart


def _cluster() -> list[str]:
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        pytest.skip("needs a local Debian PostgreSQL cluster (pg_ctlcluster)")
    version = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".")])[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def _server_up() -> bool:
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def test_tokens_arrive_after_a_server_restart(base_env):
    cluster = _cluster()
    url = create_database()
    migrate.up(url)
    collector = CollectorProcess(collector_env(base_env, url, batch_limit=5))
    try:
        wait_for(lambda: backend_pids(url), what="collector connection")
        first_backends = set(backend_pids(url))
        insert_accounts(url, 3, "before")
        collector.take(3)
        subprocess.run(cluster + ["stop", "-m", "fast"], check=True, timeout=60)
        try:
            wait_for(lambda: "connection" in collector.log(), what="the collector noticing", timeout=30)
        finally:
            subprocess.run(cluster + ["start"], check=True, timeout=60)
        wait_for(_server_up, what="server back", timeout=60)
        insert_accounts(url, 12, "after")        # possibly before the collector is back
        lines = collector.take(12, timeout=60)
        emails = {row[1] for line in lines for row in decode_line(line)}
        assert emails == {f"after{i}@example.test" for i in range(1, 13)}
        # The rows came through a new connection: the collector noticed the loss,
        # connected again (a second "connected" line after it), from a new backend.
        log = collector.log()
        lost = max(log.find("database connection lost"), log.find("connection failed"))
        assert lost >= 0, log
        assert log.count("connected, listening on") == 2 and log.rfind("connected, listening on") > lost, log
        assert set(backend_pids(url)).isdisjoint(first_backends)
        assert collector.stop() == 0
    finally:
        collector.kill()
        drop_database(url)
