"""Shared fixtures: real PostgreSQL databases, SES endpoints over HTTP, subprocess env.

Tests connect to ``MAILROOM_TEST_DATABASE_URL``, else the local server when one answers,
else an embedded server started for the session (see pgserver.py), and create a uniquely
named database for each test that needs one, so tests can run in parallel (pytest-xdist)
without seeing each other's rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pgserver
import pytest
from pgutil import SECRET_KEY_HEX, create_database, drop_database
from ses_emulator import SesStub, moto_server
from supervisor_util import SupervisorProcess


def pytest_configure(config: pytest.Config) -> None:
    pgserver.configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    pgserver.unconfigure(config)


def pytest_report_header(config: pytest.Config) -> str:
    return pgserver.report_header(config)


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """URL of a fresh, empty database for this one test."""
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def base_env() -> Iterator[dict[str, str]]:
    """Environment for a mailroom subprocess: the caller's, minus MAILROOM_* settings.

    Each test gets a control socket of its own: supervisors of parallel tests
    serve the same queue, and the default path is one per queue and user (a
    second supervisor there exits 2, as it should on a real host).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_") or k == "MAILROOM_IMPL"}
    env["MAILROOM_SECRET_KEY"] = SECRET_KEY_HEX
    env["PYTHONUNBUFFERED"] = "1"
    where = tempfile.mkdtemp(prefix="mailroom-ctl-")
    env["MAILROOM_CONTROL_SOCKET"] = os.path.join(where, "control.sock")
    yield env
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def db() -> Iterator[str]:
    """URL of a fresh database migrated to the latest version, for this one test."""
    from mailroom.ledger import migrate

    url = create_database()
    migrate.up(url)
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture(scope="module")
def moto_module():
    """moto's server mode on 127.0.0.1, shared by the tests of a module."""
    with moto_server() as server:
        yield server


@pytest.fixture
def moto(moto_module):
    """moto, reset, with the source verified and both templates created."""
    moto_module.reset()
    return moto_module


@pytest.fixture
def stub():
    """A scripted SES stub on 127.0.0.1 (what moto cannot do: throttling, 5xx, ...)."""
    with SesStub() as server:
        yield server


@pytest.fixture
def supervisors() -> Iterator[Callable[[dict[str, str]], SupervisorProcess]]:
    """Start ``mailroom-supervisor`` processes (``supervisors(env)``); all killed at the end."""
    started: list[SupervisorProcess] = []

    def start(env: dict[str, str]) -> SupervisorProcess:
        sup = SupervisorProcess(env)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.kill()
