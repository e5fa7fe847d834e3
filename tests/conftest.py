"""Shared fixtures: a real PostgreSQL database per test module, console scripts.

Tests connect to ``MAILROOM_TEST_DATABASE_URL`` (default: the local server) and
create a uniquely named database for each module, so modules can run in
parallel (pytest-xdist) without seeing each other's rows.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import conninfo

ADMIN_URL = os.environ.get(
    "MAILROOM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SECRET_KEY_HEX = "deadbeef" * 8


def _url_for(dbname: str) -> str:
    params = conninfo.conninfo_to_dict(ADMIN_URL)
    params["dbname"] = dbname
    return conninfo.make_conninfo(**params)


def create_database(prefix: str = "mailroom_test") -> str:
    """Create an empty database with a unique name and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return _url_for(name)


def drop_database(url: str) -> None:
    """Drop a database made by :func:`create_database`, closing its sessions."""
    name = conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def empty_db() -> Iterator[str]:
    """URL of a fresh, empty database for this test module."""
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """URL of a fresh, empty database for this one test."""
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


def console_script(name: str) -> list[str]:
    """argv prefix that runs an installed console script.

    The real installed entry point is used; a missing one is an error (run
    ``pip install -e .[test]``), never silently replaced by something else.
    """
    # Prefer the scripts beside this interpreter (a venv's, or pyenv's real bin
    # rather than its shims), so signals reach the Python process itself.
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        pytest.fail(f"console script {name!r} is not installed: run pip install -e '.[test]'")
    return [found]


@pytest.fixture
def base_env() -> dict[str, str]:
    """Environment for a mailroom subprocess: the caller's, minus MAILROOM_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_") or k == "MAILROOM_IMPL"}
    env["MAILROOM_SECRET_KEY"] = SECRET_KEY_HEX
    env["PYTHONUNBUFFERED"] = "1"
    return env
