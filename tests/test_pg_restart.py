"""The collector survives a PostgreSQL restart (run serially: it restarts the server).

Marked ``pg_restart``: the parallel run excludes it, a second, serial run does it
alone, so no other test loses its connections to the restart.  It restarts whichever
server the session uses: the embedded one through its own ``pg_ctl``, a local Debian
cluster through ``pg_ctlcluster``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import psycopg
import pytest
from collector_util import CollectorProcess, backend_pids, collector_env, insert_accounts, wait_for
from pgutil import EMBEDDED_DATA_VAR, admin_url, create_database, drop_database

from mailroom.ledger import migrate
from mailroom.wire import decode_line

pytestmark = pytest.mark.pg_restart


def _controls() -> tuple[Callable[[], object], Callable[[], object]]:
    """(stop, start) of the session's server."""
    data = os.environ.get(EMBEDDED_DATA_VAR)
    if data:
        from mailroom.demo.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(data)
        if server.running_pid() is None:
            pytest.fail(f"the session's embedded server in {data} does not run")
        port = server.port
        return (lambda: server.stop("fast")), (lambda: server.start(port))
    target = psycopg.conninfo.conninfo_to_dict(admin_url())
    if (target.get("host"), str(target.get("port", 5432))) not in (("127.0.0.1", "5432"), ("localhost", "5432")):
        pytest.skip("the session's server is neither embedded nor the local cluster: not restarting it")
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        pytest.skip("needs the session's embedded server or a local Debian cluster (pg_ctlcluster)")
    version = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".")])[-1]
    cluster = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
    return (lambda: subprocess.run(cluster + ["stop", "-m", "fast"], check=True, timeout=60),
            lambda: subprocess.run(cluster + ["start"], check=True, timeout=60))


def _server_up() -> bool:
    try:
        with psycopg.connect(admin_url(), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def test_tokens_arrive_after_a_server_restart(base_env):
    stop, start = _controls()
    url = create_database()
    migrate.up(url)
    collector = CollectorProcess(collector_env(base_env, url, batch_limit=5))
    try:
        wait_for(lambda: backend_pids(url), what="collector connection")
        first_backends = set(backend_pids(url))
        insert_accounts(url, 3, "before")
        collector.take(3)
        stop()
        try:
            wait_for(lambda: "connection" in collector.log(), what="the collector noticing", timeout=30)
        finally:
            start()
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
