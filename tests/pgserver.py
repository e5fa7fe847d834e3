"""The test session's PostgreSQL: chosen once, in the pytest process that controls the run.

Order: ``MAILROOM_TEST_DATABASE_URL``; else the local server on 127.0.0.1:5432 when one
answers; else an embedded PostgreSQL (``mailroom.demo.embedded``) started for the session.
``MAILROOM_TEST_EMBEDDED=1`` skips the local server (CI uses it to run tests on both).

Why in the controller: with pytest-xdist the workers are started by the controller after its
``pytest_configure``, inheriting its environment.  So the controller starts the one embedded
server, puts its URL into ``MAILROOM_TEST_DATABASE_URL`` (and its data directory into
``MAILROOM_TEST_EMBEDDED_DATA``), and every worker connects to that server: no lock files, no
race between workers, and the server's life is exactly the session's (stopped and its
directory removed in ``pytest_unconfigure``).  A worker never starts a server: it finds the
variable set.  Without xdist the single pytest process is the controller.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest
from pgutil import EMBEDDED_DATA_VAR, EMBEDDED_VAR, LOCAL_URL, URL_VAR

_started: dict[str, object] = {}


def _local_server_answers() -> bool:
    try:
        with psycopg.connect(LOCAL_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def configure(config: pytest.Config) -> None:
    """``pytest_configure``: choose the server; start an embedded one if none is given."""
    if hasattr(config, "workerinput"):         # an xdist worker: the controller chose
        return
    if os.environ.get(URL_VAR):
        return
    if os.environ.get(EMBEDDED_VAR, "") not in ("1", "true", "yes") and _local_server_answers():
        return
    try:
        from mailroom.demo.embedded import EmbeddedPostgres, available
    except ImportError:                        # an older package without the demo
        return
    if not available():
        return                                 # tests fail with "connection refused": say so below
    top = Path(tempfile.mkdtemp(prefix="mailroom-test-pg-"))
    top.chmod(0o711)                           # the server user (under root) must reach pg/
    server = EmbeddedPostgres(top / "pg", durable=False)
    try:
        url = server.start()
    except Exception:
        shutil.rmtree(top, ignore_errors=True)
        raise
    _started.update(server=server, top=top)
    os.environ[URL_VAR] = url
    os.environ[EMBEDDED_DATA_VAR] = str(server.data_dir)
    config.stash[_KEY] = f"embedded PostgreSQL {url} (data {server.data_dir})"


_KEY = pytest.StashKey[str]()


def report_header(config: pytest.Config) -> str:
    """One header line naming the server the run uses."""
    return config.stash.get(_KEY, f"PostgreSQL {os.environ.get(URL_VAR, LOCAL_URL)}")


def unconfigure(config: pytest.Config) -> None:
    """``pytest_unconfigure``: stop the embedded server this process started, remove its data."""
    server = _started.pop("server", None)
    top = _started.pop("top", None)
    if server is None:
        return
    try:
        server.stop("immediate")               # throw-away data: no checkpoint needed
    finally:
        shutil.rmtree(top, ignore_errors=True)
        os.environ.pop(URL_VAR, None)
        os.environ.pop(EMBEDDED_DATA_VAR, None)


# --- pytest hooks (this module is a plugin: tests/conftest.py lists it) -------------

def pytest_configure(config: pytest.Config) -> None:
    configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    unconfigure(config)


def pytest_report_header(config: pytest.Config) -> str:
    return report_header(config)
