"""Test plumbing shared by tests/ and benchmarks/: databases and console scripts.

A plain module (not a conftest) so that benchmarks, which have a conftest of
their own, can import it too.
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

#: The server the tests use, in this order: ``MAILROOM_TEST_DATABASE_URL``; else the local
#: server at :data:`LOCAL_URL` when one answers; else an embedded PostgreSQL (the ``demo``
#: extra) started for the test session.  ``MAILROOM_TEST_EMBEDDED=1`` skips the local server.
URL_VAR = "MAILROOM_TEST_DATABASE_URL"
EMBEDDED_VAR = "MAILROOM_TEST_EMBEDDED"
#: Data directory of the session's embedded server, for tests that restart it.
EMBEDDED_DATA_VAR = "MAILROOM_TEST_EMBEDDED_DATA"
LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SECRET_KEY_HEX = "deadbeef" * 8


def admin_url() -> str:
    """URL of the test server's ``postgres`` database (see :data:`URL_VAR`).

    Read at each call: the session's server is chosen in ``pytest_configure``, after this
    module was imported.
    """
    return os.environ.get(URL_VAR, LOCAL_URL)


def _url_for(dbname: str) -> str:
    params = conninfo.conninfo_to_dict(admin_url())
    params["dbname"] = dbname
    return conninfo.make_conninfo(**params)


def create_database(prefix: str = "mailroom_test", template_url: str | None = None) -> str:
    """Create a database with a unique name and return its URL: empty, or a copy
    of the database at ``template_url`` (which must have no open session)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy = ""
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        if template_url is not None:
            copy = f' TEMPLATE "{conninfo.conninfo_to_dict(template_url)["dbname"]}"'
            # From PostgreSQL 15 on, the default strategy writes the copy through
            # the WAL: slower for a large template.  Older servers only copy files.
            if admin.info.server_version >= 150000:
                copy += " STRATEGY FILE_COPY"
        admin.execute(f'CREATE DATABASE "{name}"{copy}')
    return _url_for(name)


def drop_database(url: str) -> None:
    """Drop a database made by :func:`create_database`, closing its sessions."""
    name = conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


# --- fixtures (a plugin for tests/: tests/conftest.py lists this module) -----------

@pytest.fixture
def fresh_db() -> Iterator[str]:
    """URL of a fresh, empty database for this one test."""
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to ``db`` with the workers' session settings (a test
    module may define its own ``conn``, which then takes precedence)."""
    from mailroom import ledger

    with psycopg.connect(db, autocommit=True) as c:
        ledger.configure_session(c)
        yield c


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
