"""Migrations: the original schema (0_init), the runner and its golang-migrate bookkeeping."""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from mailroom.ledger import migrate

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def scalar(conn: psycopg.Connection, sql: str, params: tuple = ()) -> object:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def version_rows(url: str) -> list[tuple[int, bool]]:
    with connect(url) as conn:
        return conn.execute("SELECT version, dirty FROM schema_migrations").fetchall()


def objects(conn: psycopg.Connection) -> dict[str, set[str]]:
    """User-visible schema objects in the public schema, by kind."""
    q = {
        "tables": "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        "types": "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
        " WHERE n.nspname = 'public' AND t.typtype = 'e'",
        "functions": "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'public' AND p.prokind = 'f' AND NOT EXISTS (SELECT 1 FROM pg_depend d"
        " WHERE d.objid = p.oid AND d.deptype = 'e')",
        "triggers": "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal",
        "extensions": "SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'",
    }
    return {kind: {r[0] for r in conn.execute(sql)} for kind, sql in q.items()}


@pytest.fixture
def db0(fresh_db: str) -> str:
    """A fresh database at version 0 (the original schema)."""
    assert migrate.up(fresh_db, 1) == [0]
    return fresh_db


# ------------------------------------------------------------------ the runner


def test_available_finds_the_package_migrations() -> None:
    found = migrate.available()
    assert [(m.version, m.name) for m in found][:2] == [(0, "init"), (1, "deliveries")]
    assert found[0].label == "0_init"
    assert "CREATE EXTENSION IF NOT EXISTS pgcrypto" in (found[0].sql("up") or "")
    assert "CREATE FUNCTION gen_random_bytes(integer)" in (found[0].sql("up") or "")
    assert migrate.available(str(MIGRATIONS)) == migrate.available(MIGRATIONS)


def test_up_down_up(fresh_db: str) -> None:
    applied: list[str] = []
    assert migrate.up(fresh_db, progress=applied.append) == [0, 1, 2, 3]
    assert applied == ["applied 0_init", "applied 1_deliveries", "applied 2_consumers",
                       "applied 3_delivery_events"]
    with connect(fresh_db) as conn:
        found = objects(conn)
    assert {"accounts", "tokens", "jobs", "deliveries", "consumers", "schema_migrations", "delivery_events",
            "suppressions", "suppression_audit"} <= found["tables"]
    assert {"account_status", "token_action", "job_type", "delivery_status", "delivery_feedback"} <= found["types"]
    assert found["triggers"] == {"accounts_create_activation_token", "accounts_track_status_change",
                                 "tokens_activate_account", "tokens_notify_insert"}
    with connect(fresh_db) as conn:
        # pgcrypto where the server has it, else migration 0's stand-in (test_random_bytes.py).
        has_pgcrypto = scalar(conn, "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgcrypto'")
    assert found["extensions"] == ({"pgcrypto"} if has_pgcrypto else set())
    assert version_rows(fresh_db) == [(3, False)]

    assert migrate.down(fresh_db, None, all=True) == [3, 2, 1, 0]
    with connect(fresh_db) as conn:
        left = objects(conn)
    assert left.pop("tables") == {"schema_migrations"} and not any(left.values()), left
    assert version_rows(fresh_db) == []  # golang-migrate leaves it empty

    assert migrate.up(fresh_db) == [0, 1, 2, 3]
    assert migrate.up(fresh_db) == []
    assert version_rows(fresh_db) == [(3, False)]


def test_steps_and_version_bookkeeping(fresh_db: str) -> None:
    assert migrate.status(fresh_db)[:2] == (None, False)
    assert migrate.up(fresh_db, 1) == [0]
    assert version_rows(fresh_db) == [(0, False)]
    version, dirty, pending = migrate.status(fresh_db)
    assert (version, dirty, [m.label for m in pending]) == (0, False, ["1_deliveries", "2_consumers",
                                                                    "3_delivery_events"])
    assert migrate.up(fresh_db, 1) == [1]
    assert migrate.down(fresh_db, 1) == [1]  # down from V records the previous one
    assert version_rows(fresh_db) == [(0, False)]
    with connect(fresh_db) as conn:
        assert migrate.current_version(conn) == 0
    with pytest.raises(ValueError):
        migrate.down(fresh_db, None)


def test_schema_migrations_is_golang_migrates(db0: str) -> None:
    with connect(db0) as conn:
        cols = conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_name = 'schema_migrations' ORDER BY ordinal_position").fetchall()
        pkey = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'schema_migrations'::regclass AND contype = 'p'").fetchall()
    assert cols == [("version", "bigint", "NO"), ("dirty", "boolean", "NO")]
    assert pkey == [("PRIMARY KEY (version)",)]
    assert version_rows(db0) == [(0, False)]


def test_down_restores_the_original_trigger_function(db0: str) -> None:
    sql = "SELECT pg_get_functiondef('tokens_notify_insert'::regproc)"
    with connect(db0) as conn:
        original = scalar(conn, sql)
    migrate.up(db0)
    with connect(db0) as conn:
        assert scalar(conn, sql) != original
    migrate.down(db0, 3)
    with connect(db0) as conn:
        assert scalar(conn, sql) == original
        assert objects(conn)["types"] == {"account_status", "token_action", "job_type"}


def broken_source(tmp_path: Path) -> Path:
    shutil.copy(MIGRATIONS / "0_init.up.sql", tmp_path)
    shutil.copy(MIGRATIONS / "0_init.down.sql", tmp_path)
    (tmp_path / "1_broken.up.sql").write_text(
        "CREATE TABLE half_done (id int);\n-- the next line fails\nSELECT * FROM no_such_table;\n")
    (tmp_path / "1_broken.down.sql").write_text("DROP TABLE half_done;\n")
    return tmp_path


def test_failed_migration_leaves_dirty_and_force_clears(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = broken_source(tmp_path)
    with pytest.raises(migrate.MigrationError) as failed:
        migrate.up(fresh_db, source=source)
    message = str(failed.value)
    assert "\n" not in message
    assert "1_broken.up.sql" in message and "(line 3)" in message
    assert 'relation "no_such_table" does not exist' in message
    assert "mailroom migrate force 0" in message
    assert version_rows(fresh_db) == [(1, True)]
    with connect(fresh_db) as conn:  # one transaction: nothing of it is left
        assert scalar(conn, "SELECT to_regclass('half_done')") is None

    with pytest.raises(migrate.DirtyError, match=r"dirty at version 1 .*migrate force"):
        migrate.up(fresh_db, source=source)
    with pytest.raises(migrate.DirtyError):
        migrate.down(fresh_db, 1, source=source)

    (source / "1_broken.up.sql").write_text("CREATE TABLE half_done (id int);\n")
    assert migrate.main(["force", "0"], fresh_db) == 0
    assert capsys.readouterr().out == "forced version 0\n"
    assert version_rows(fresh_db) == [(0, False)]
    assert migrate.up(fresh_db, source=source) == [1]
    assert version_rows(fresh_db) == [(1, False)]


def test_failed_down_records_the_target_dirty(fresh_db: str, tmp_path: Path) -> None:
    source = broken_source(tmp_path)
    (source / "1_broken.up.sql").write_text("SELECT 1;\n")
    (source / "1_broken.down.sql").write_text("SELECT 1;\n")
    (source / "0_init.down.sql").write_text("DROP TABLE no_such_table;\n")
    migrate.up(fresh_db, source=source)
    migrate.down(fresh_db, 1, source=source)
    with pytest.raises(migrate.MigrationError, match="0_init.down.sql failed"):
        migrate.down(fresh_db, 1, source=source)
    assert version_rows(fresh_db) == [(-1, True)]  # golang-migrate's dirty NilVersion
    assert migrate.status(fresh_db, source=source)[:2] == (None, True)
    migrate.force(fresh_db, 0)
    assert version_rows(fresh_db) == [(0, False)]
    migrate.force(fresh_db, -1)
    assert version_rows(fresh_db) == []


def test_unknown_database_version_is_refused(fresh_db: str) -> None:
    migrate.up(fresh_db)
    migrate.force(fresh_db, 7)
    with pytest.raises(migrate.MigrationError, match="version 7"):
        migrate.up(fresh_db)


def test_concurrent_runners_do_not_interleave(fresh_db: str) -> None:
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: migrate.up(fresh_db), range(3)))
    assert sorted(results) == [[], [], [0, 1, 2, 3]]
    assert version_rows(fresh_db) == [(3, False)]


def test_runner_waits_for_the_lock(fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrate, "_LOCK_WAIT_S", 1)
    with connect(fresh_db) as holder:
        lock = migrate._lock_id(holder)
        holder.execute("SELECT pg_advisory_lock(%s)", (lock,))
        started = time.monotonic()
        with pytest.raises(migrate.MigrationError, match="another migration"):
            migrate.up(fresh_db)
        assert time.monotonic() - started >= 0.9
    assert migrate.up(fresh_db) == [0, 1, 2, 3]


# ------------------------------------------------------------------- the CLI


def test_cli(fresh_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert migrate.main(["status"], fresh_db) == 0
    assert capsys.readouterr().out.splitlines()[0] == "status: version none, clean, 4 pending"
    assert migrate.main(["up", "1"], fresh_db) == 0
    assert capsys.readouterr().out == "applied 0_init\n"
    assert migrate.main(["up"], fresh_db) == 0
    assert capsys.readouterr().out == "applied 1_deliveries\napplied 2_consumers\napplied 3_delivery_events\n"
    assert migrate.main(["up"], fresh_db) == 0
    assert capsys.readouterr().out == "no change\n"
    assert migrate.main(["status"], fresh_db) == 0
    assert capsys.readouterr().out == "status: version 3, clean, 0 pending\n"
    assert migrate.main(["down", "--all"], fresh_db) == 0
    assert capsys.readouterr().out == ("reverted 3_delivery_events\nreverted 2_consumers\nreverted 1_deliveries\n"
                                      "reverted 0_init\n")


BAD_USAGE = [[], ["sideways"], ["down"], ["down", "1", "--all"], ["up", "0"], ["force"], ["force", "-2"]]


@pytest.mark.parametrize("argv", BAD_USAGE)
def test_cli_bad_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert migrate.main(argv, "dbname=unused") == 2
    assert "usage: mailroom migrate" in capsys.readouterr().err


def test_cli_errors_are_one_line(fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert migrate.main(["status"], "postgresql://postgres@127.0.0.1:1/nowhere") == 1
    err = capsys.readouterr().err
    assert err.startswith("mailroom: ") and err.count("\n") == 1

    monkeypatch.setattr(migrate, "_default_source", lambda: broken_source(tmp_path))
    assert migrate.main(["up"], fresh_db) == 1
    captured = capsys.readouterr()
    assert captured.out == "applied 0_init\n"
    assert re.fullmatch(r"mailroom: migration 1_broken\.up\.sql failed \(line 3\): .*\n",
                        captured.err)
    assert migrate.main(["up"], fresh_db) == 1
    assert "migrate force" in capsys.readouterr().err
    assert migrate.main(["status"], fresh_db) == 0
    assert capsys.readouterr().out == "status: version 1, dirty, 0 pending\n"


# ------------------------------------------------------- the original schema


COLUMNS = {
    "accounts": [
        ("id", "bigint", None, "NO", r"nextval\('accounts_id_seq'::regclass\)"),
        ("email", "character varying", 254, "NO", None),
        ("status", "USER-DEFINED", None, "NO", r"'provisioned'::account_status"),
        ("login", "character varying", 254, "NO", None),
        ("created_at", "integer", None, "NO", r"EXTRACT\(epoch FROM now\(\)\)"),
        ("status_changed_at", "integer", None, "YES", None),
        ("activated_at", "integer", None, "YES", None),
        ("suspended_at", "integer", None, "YES", None),
        ("unsuspended_at", "integer", None, "YES", None),
    ],
    "tokens": [
        ("id", "bigint", None, "NO", r"nextval\('tokens_id_seq'::regclass\)"),
        ("action", "USER-DEFINED", None, "NO", None),
        ("secret", "bytea", None, "NO", r"gen_random_bytes\(32\)"),
        ("code", "character varying", 5, "YES", r"lpad\(.*100000.*5, '0'"),
        ("account", "bigint", None, "NO", None),
        ("expires_at", "integer", None, "NO", r"EXTRACT\(epoch FROM \(now\(\) \+ '00:15:00'"),
        ("consumed_at", "integer", None, "YES", None),
        ("created_at", "integer", None, "NO", r"EXTRACT\(epoch FROM now\(\)\)"),
    ],
    "jobs": [
        ("job_type", "USER-DEFINED", None, "NO", None),
        ("last_seq", "bigint", None, "YES", None),
    ],
}


@pytest.mark.parametrize("table", sorted(COLUMNS))
def test_columns_match_schema_md(db0: str, table: str) -> None:
    with connect(db0) as conn:
        found = conn.execute(
            "SELECT column_name, data_type, character_maximum_length, is_nullable,"
            " column_default, udt_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
            (table,),
        ).fetchall()
    assert [row[0] for row in found] == [col[0] for col in COLUMNS[table]]
    for (name, dtype, length, nullable, default, _udt), want in zip(found, COLUMNS[table], strict=True):
        assert (name, dtype, length, nullable) == want[:4]
        if want[4] is None:
            assert default is None, name
        else:
            assert default is not None and re.search(want[4], default), (name, default)
    udts = {row[0]: row[5] for row in found}
    assert udts.get("status", "account_status") == "account_status"
    assert udts.get("action", "token_action") == "token_action"
    assert udts.get("job_type", "job_type") == "job_type"


def test_types_keys_and_indexes(db0: str) -> None:
    with connect(db0) as conn:
        enums = dict(conn.execute(
            "SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder)"
            " FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid GROUP BY t.typname"))
        defs = {r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes")}
        fk = scalar(conn, "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE conrelid = 'tokens'::regclass AND contype = 'f'")
        jobs = conn.execute("SELECT job_type::text, last_seq FROM jobs").fetchall()
    assert enums == {
        "account_status": ["provisioned", "active", "suspended"],
        "token_action": ["activation", "password_recovery"],
        "job_type": ["mailroom"],
    }
    for wanted in [
        "UNIQUE INDEX accounts_email_key ON public.accounts USING btree (email)",
        "UNIQUE INDEX accounts_login_key ON public.accounts USING btree (login)",
        "INDEX accounts_id_status_idx ON public.accounts USING btree (id, status)",
        "UNIQUE INDEX tokens_secret_key ON public.tokens USING btree (secret)",
        "INDEX tokens_account_idx ON public.tokens USING btree (account)",
        "ON public.tokens USING btree (id, expires_at, consumed_at, action)",
        "INDEX jobs_last_seq_job_type_idx ON public.jobs USING btree (last_seq, job_type)",
        "UNIQUE INDEX jobs_pkey ON public.jobs USING btree (job_type)",
    ]:
        assert any(wanted in d for d in defs), wanted
    assert fk == ("FOREIGN KEY (account) REFERENCES accounts(id)"
                  " ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED")
    assert jobs == [("mailroom", 0)]


def test_token_defaults(db0: str) -> None:
    with connect(db0) as conn:
        conn.execute("INSERT INTO accounts (email, login, status) VALUES ('a@x', 'a', 'active')")
        conn.execute("INSERT INTO tokens (action, account)"
                     " SELECT 'password_recovery', id FROM accounts, generate_series(1, 300)")
        rows = conn.execute("SELECT code, secret, expires_at - created_at,"
                            " abs(created_at - EXTRACT(EPOCH FROM now())) FROM tokens").fetchall()
    codes = [r[0] for r in rows]
    assert all(re.fullmatch(r"\d{5}", c) for c in codes)
    assert any(c.startswith("0") for c in codes)  # zero-padded (P(miss) ~ 1e-14)
    assert len(set(codes)) > 250
    assert all(len(r[1]) == 32 for r in rows) and len({r[1] for r in rows}) == 300
    assert {r[2] for r in rows} == {900}
    assert all(r[3] <= 1 for r in rows)


def test_provisioned_account_gets_token_and_notify(db0: str) -> None:
    with connect(db0) as listener, connect(db0) as conn:
        listener.execute("LISTEN token_insert")
        conn.execute("INSERT INTO accounts (email, login) VALUES ('p@x', 'p')")
        conn.execute("INSERT INTO accounts (email, login, status) VALUES ('q@x', 'q', 'active')")
        tokens = conn.execute(
            "SELECT a.login, t.action::text FROM tokens t JOIN accounts a ON a.id = t.account"
        ).fetchall()
        assert tokens == [("p", "activation")]
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload) for n in notes] == [("token_insert", "")]


def account(conn: psycopg.Connection, login: str, status: str = "provisioned") -> int:
    sql = "INSERT INTO accounts (email, login, status) VALUES (%s, %s, %s) RETURNING id"
    return int(scalar(conn, sql, (f"{login}@x", login, status)))  # type: ignore[arg-type]


def state(conn: psycopg.Connection, account_id: int) -> tuple:
    return conn.execute(
        "SELECT status::text, status_changed_at IS NOT NULL, activated_at IS NOT NULL,"
        " suspended_at IS NOT NULL, unsuspended_at IS NOT NULL FROM accounts WHERE id = %s",
        (account_id,),
    ).fetchone()  # type: ignore[return-value]


def set_status(conn: psycopg.Connection, account_id: int, status: str) -> tuple:
    conn.execute("UPDATE accounts SET status = %s WHERE id = %s", (status, account_id))
    return state(conn, account_id)


def test_status_change_rules(db0: str) -> None:
    with connect(db0) as conn:
        a = account(conn, "a")
        assert state(conn, a) == ("provisioned", False, False, False, False)
        assert set_status(conn, a, "provisioned") == ("provisioned", False, False, False, False)
        assert set_status(conn, a, "active") == ("active", True, True, False, False)
        assert set_status(conn, a, "suspended") == ("suspended", True, True, True, False)
        assert set_status(conn, a, "active") == ("active", True, True, False, True)
        assert set_status(conn, a, "suspended") == ("suspended", True, True, True, False)

        # Never activated: lifting the suspension puts it back to provisioned.
        b = account(conn, "b")
        assert set_status(conn, b, "suspended") == ("suspended", True, False, True, False)
        assert set_status(conn, b, "active") == ("provisioned", True, False, False, True)

        # An unchanged status touches nothing.
        conn.execute("UPDATE accounts SET status_changed_at = 1 WHERE id = %s", (a,))
        conn.execute("UPDATE accounts SET status = 'suspended' WHERE id = %s", (a,))
        assert scalar(conn, "SELECT status_changed_at FROM accounts WHERE id = %s", (a,)) == 1


def test_consuming_tokens(db0: str) -> None:
    with connect(db0) as conn:
        a = account(conn, "a")
        s = account(conn, "s")
        set_status(conn, s, "suspended")
        r = account(conn, "r", "active")
        conn.execute("INSERT INTO tokens (action, account) VALUES ('password_recovery', %s)", (r,))
        conn.execute("UPDATE tokens SET consumed_at = 1")
        statuses = dict(conn.execute("SELECT login, status::text FROM accounts").fetchall())
        assert statuses == {"a": "active", "s": "suspended", "r": "active"}
        assert state(conn, a)[2] is True  # activated_at set by the status trigger
        # Only the null -> value transition counts.
        set_status(conn, a, "suspended")
        set_status(conn, a, "provisioned")
        conn.execute("UPDATE tokens SET consumed_at = 2 WHERE account = %s", (a,))
        assert state(conn, a)[0] == "provisioned"
