"""The delivery ledger (migration 1 + mailroom.ledger) on a real PostgreSQL."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailroom import ledger, migrate

DATA = Path(__file__).resolve().parent / "data"
Q = "mailroom"


def connect(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    ledger.configure_session(conn)
    return conn


def rows_of(conn: psycopg.Connection, sql: str, params: Any = ()) -> list[tuple]:
    return conn.execute(sql, params).fetchall()


def statuses(conn: psycopg.Connection) -> dict[int, str]:
    return dict(rows_of(conn, "SELECT token, status::text FROM deliveries ORDER BY token"))


def claim(conn: psycopg.Connection, limit: int, **kw: Any) -> ledger.Claim:
    return ledger.claim(conn, Q, limit, lease_ms=kw.pop("lease_ms", 60_000), **kw)


def tokens_of(c: ledger.Claim) -> list[int]:
    return [row[5] for row in c.rows]


@pytest.fixture
def db(fresh_db: str) -> str:
    """Version 0, the fixture loaded as an old deployment left it, then migrated up."""
    migrate.up(fresh_db, 1)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute((DATA / "fixture.sql").read_text())
    assert migrate.up(fresh_db) == [1]
    return fresh_db


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    with connect(db) as c:
        yield c


def new_tokens(conn: psycopg.Connection, n: int, action: str = "password_recovery") -> list[int]:
    """``n`` new tokens, by id, made through the real triggers: activation tokens
    by new provisioned accounts, recovery tokens for the fixture's active account 1."""
    if action == "activation":
        stamp = f"{time.monotonic_ns()}-"
        ids = [r[0] for r in rows_of(conn, "INSERT INTO accounts (email, login) SELECT %s || g"
                                     " || '@x', %s || g FROM generate_series(1, %s) g"
                                     " RETURNING id", (stamp, stamp, n))]
        return [r[0] for r in rows_of(conn, "SELECT id FROM tokens WHERE account = ANY(%s)"
                                      " ORDER BY id", (ids,))]
    return sorted(r[0] for r in rows_of(conn, "INSERT INTO tokens (action, account) SELECT"
                                        " 'password_recovery', 1 FROM generate_series(1, %s)"
                                        " RETURNING id", (n,)))


# ------------------------------------------------------------ upgrade path


def expected_rows() -> list[tuple[int, str, str, bytes, str]]:
    """(action, email, login, token secret, code) of the original's own output."""
    found = []
    for line in (DATA / "expected-limit3.txt").read_text().splitlines():
        fields = line.split(",")
        for i in range(0, len(fields), 5):
            action, email, login, secret, code = fields[i : i + 5]
            raw = base64.urlsafe_b64decode(secret + "==")
            found.append((int(action), email, login, raw[:32], code))
    return found


def test_upgrade_path(conn: psycopg.Connection) -> None:
    assert statuses(conn) == {t: "queued" for t in (1, 2, 3, 4, 5, 8)}  # not 6, 7
    priorities = dict(rows_of(conn, "SELECT token, priority FROM deliveries"))
    assert priorities == {1: 0, 2: 1, 3: 1, 4: 1, 5: 0, 8: 0}

    first = claim(conn, 3)
    assert tokens_of(first) == [1, 8] and (first.picked, first.skipped) == (3, 1)
    assert rows_of(conn, "SELECT last_seq FROM jobs") == [(8,)]
    second = claim(conn, 3)
    assert tokens_of(second) == [2, 3, 4] and (second.picked, second.skipped) == (3, 0)
    assert claim(conn, 3) == ledger.Claim([], 0, 0, None)

    # Same five rows as the original collector printed, recovery first.
    want = sorted(expected_rows(), key=lambda r: r[0] != 2)
    assert [row[:5] for row in first.rows + second.rows] == want
    assert statuses(conn) == {1: "claimed", 2: "claimed", 3: "claimed", 4: "claimed",
                              5: "skipped", 8: "claimed"}
    reason = rows_of(conn, "SELECT last_error, attempts FROM deliveries WHERE token = 5")
    assert reason == [("account is suspended, password recovery needs active", 0)]
    claimed = "SELECT DISTINCT attempts FROM deliveries WHERE status = 'claimed'"
    assert rows_of(conn, claimed) == [(1,)]


def test_backfill_starts_after_the_old_cursor(fresh_db: str) -> None:
    migrate.up(fresh_db, 1)
    with psycopg.connect(fresh_db, autocommit=True) as c:
        c.execute((DATA / "fixture.sql").read_text())
        c.execute("UPDATE jobs SET last_seq = 3")  # the original had sent 1..3
        migrate.up(fresh_db)
        assert statuses(c) == {4: "queued", 5: "queued", 8: "queued"}


def test_trigger_queues_new_tokens_and_still_notifies(db: str, conn: psycopg.Connection) -> None:
    with connect(db) as listener:
        listener.execute("LISTEN token_insert")
        [act] = new_tokens(conn, 1, "activation")
        [rec] = new_tokens(conn, 1)
        assert len(list(listener.notifies(timeout=5, stop_after=2))) == 2
    got = rows_of(
        conn, "SELECT token, status::text, priority, attempts FROM deliveries WHERE token >= %s"
        " ORDER BY token", (act,))
    assert got == [(act, "queued", 1, 0), (rec, "queued", 0, 0)]


def test_last_seq_only_goes_up(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE jobs SET last_seq = 100")
    assert claim(conn, 10).picked == 6
    assert rows_of(conn, "SELECT last_seq FROM jobs") == [(100,)]
    conn.execute("UPDATE jobs SET last_seq = NULL")
    new_tokens(conn, 2)
    claim(conn, 10)
    assert rows_of(conn, "SELECT last_seq FROM jobs") == [(10,)]


def test_out_of_order_commits_are_both_claimed(db: str, conn: psycopg.Connection) -> None:
    claim(conn, 10)
    with psycopg.connect(db) as a, psycopg.connect(db) as b:
        [low] = new_tokens(a, 1)
        [high] = new_tokens(b, 1)
        assert low < high
        b.commit()
        assert tokens_of(claim(conn, 10)) == [high]
        a.commit()  # commits after a higher id was handed out: the old cursor lost it
        assert tokens_of(claim(conn, 10)) == [low]


def test_concurrent_claimers_never_share_a_token(db: str, conn: psycopg.Connection) -> None:
    claim(conn, 10)
    made = set(new_tokens(conn, 1500)) | set(new_tokens(conn, 500, "activation"))
    start = threading.Barrier(6)

    def worker(hold: bool) -> list[int]:
        mine: list[int] = []
        with connect(db) as c:
            start.wait()
            while True:
                if hold:  # keep the row locks a little while, as compat mode does
                    with c.transaction():
                        batch = claim(c, 7)
                        time.sleep(0.001)
                else:
                    batch = claim(c, 7)
                mine += tokens_of(batch)
                if batch.picked < 7:
                    return mine

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(worker, [True, False] * 3))
    flat = [t for mine in got for t in mine]
    assert len(flat) == len(set(flat))
    assert set(flat) == made
    assert sum(1 for mine in got if mine) > 1
    assert rows_of(conn, "SELECT last_seq FROM jobs") == [(max(made),)]


# ------------------------------------------------------------- lifecycle


def test_lease_expiry_requeues_then_fails(conn: psycopg.Connection) -> None:
    first = claim(conn, 3)
    assert tokens_of(first) == [1, 8]
    assert ledger.requeue_expired(conn, Q, 60_000, 3) == 0
    time.sleep(0.02)
    assert ledger.requeue_expired(conn, Q, 10, 2) == 2
    got = rows_of(conn, "SELECT status::text, attempts, last_error FROM deliveries WHERE token = 1")
    assert got == [("queued", 1, "lease expired (attempt 1)")]
    assert tokens_of(claim(conn, 2)) == tokens_of(first)
    time.sleep(0.02)
    assert ledger.requeue_expired(conn, Q, 10, 2) == 2
    got = rows_of(conn, "SELECT status::text, attempts, last_error FROM deliveries WHERE token = 1")
    assert got == [("failed", 2, "lease expired, giving up after 2 attempts")]


def test_outcomes_of_each_kind(conn: psycopg.Connection) -> None:
    c = claim(conn, 10)
    assert tokens_of(c) == [1, 8, 2, 3, 4]
    changed = ledger.record_outcomes(
        conn, Q,
        [(1, "sent", "msg-1", None, None),
         (8, "failed", None, "MessageRejected: bad address", None),
         (2, "retry", None, "Throttling", 60.0),
         (3, "retry", None, "ServiceUnavailable", 0.0)],
        claimed_at=c.claimed_at,
    )
    assert changed == 4
    got = {r[0]: r[1:] for r in rows_of(
        conn, "SELECT token, status::text, message_id, last_error, sent_at IS NOT NULL,"
        " EXTRACT(EPOCH FROM next_attempt_at - now())::int FROM deliveries")}
    assert got[1][:4] == ("sent", "msg-1", None, True)
    assert got[8][:3] == ("failed", None, "MessageRejected: bad address")
    assert got[2][:2] == ("queued", None) and got[2][2] == "Throttling" and 58 <= got[2][4] <= 60
    assert got[3][:3] == ("queued", None, "ServiceUnavailable")
    assert got[4][0] == "claimed"

    # 3 is due again at once, 2 only in a minute.
    again = claim(conn, 10)
    assert tokens_of(again) == [3]
    assert 55 < (ledger.next_due_in(conn, Q, 3_600_000) or 0) <= 60
    # Out of attempts: a retry becomes a failure.
    ledger.record_outcomes(conn, Q, [(3, "retry", None, "Throttling", 1.0)], max_attempts=2)
    assert rows_of(conn, "SELECT status::text, last_error FROM deliveries WHERE token = 3") == [
        ("failed", "giving up after 2 attempts: Throttling")]
    with pytest.raises(ValueError):
        ledger.record_outcomes(conn, Q, [(4, "bounced", None, None, None)])
    assert ledger.record_outcomes(conn, Q, []) == 0


def test_stale_outcomes_do_not_clobber(conn: psycopg.Connection) -> None:
    old = claim(conn, 1)
    assert tokens_of(old) == [1]
    time.sleep(0.02)
    ledger.requeue_expired(conn, Q, 10, 5)
    new = claim(conn, 1)
    assert tokens_of(new) == [1] and new.claimed_at != old.claimed_at

    # A late failure of the first claim must not undo the second one...
    for kind in ("failed", "retry"):
        assert ledger.record_outcomes(
            conn, Q, [(1, kind, None, "late", 5.0)], claimed_at=old.claimed_at) == 0
    assert statuses(conn)[1] == "claimed"
    # ... but the current claim's outcome lands.
    assert ledger.record_outcomes(
        conn, Q, [(1, "sent", "new-msg", None, None)], claimed_at=new.claimed_at) == 1
    # Outcomes for rows already final change nothing.
    assert ledger.record_outcomes(conn, Q, [(1, "sent", "dup", None, None)]) == 0
    assert ledger.record_outcomes(conn, Q, [(1, "failed", None, "x", None)]) == 0
    assert rows_of(conn, "SELECT message_id FROM deliveries WHERE token = 1") == [("new-msg",)]

    # A late *sent* is a fact: it lands on a row re-queued meanwhile and so
    # prevents the duplicate.
    c8 = claim(conn, 2)  # 5 is skipped on the way
    assert tokens_of(c8) == [8]
    time.sleep(0.02)
    ledger.requeue_expired(conn, Q, 10, 5)
    assert ledger.record_outcomes(
        conn, Q, [(8, "sent", "late-msg", None, None)], claimed_at=c8.claimed_at) == 1
    assert statuses(conn)[8] == "sent"
    assert 8 not in tokens_of(claim(conn, 10))


def test_release_and_emitted(conn: psycopg.Connection) -> None:
    c = claim(conn, 3)
    assert ledger.release(conn, Q, tokens_of(c), claimed_at=c.claimed_at) == 2
    got = rows_of(
        conn, "SELECT DISTINCT status::text, attempts FROM deliveries WHERE token IN (1, 8)")
    assert got == [("queued", 0)]
    assert ledger.release(conn, Q, []) == 0

    c = claim(conn, 2)
    assert ledger.mark_emitted(conn, Q, tokens_of(c)) == 2
    assert ledger.mark_emitted(conn, Q, tokens_of(c)) == 0  # only claimed rows move
    e = claim(conn, 10, final_status="emitted")
    assert tokens_of(e) == [2, 3, 4]
    assert statuses(conn) == {1: "emitted", 2: "emitted", 3: "emitted", 4: "emitted",
                              5: "skipped", 8: "emitted"}
    with pytest.raises(ValueError):
        claim(conn, 1, final_status="sent")


def test_skip_reasons(conn: psycopg.Connection) -> None:
    claim(conn, 10)
    [expired, consumed, active_act] = new_tokens(conn, 3, "activation")
    conn.execute("UPDATE tokens SET expires_at = 1 WHERE id = %s", (expired,))
    conn.execute("UPDATE tokens SET consumed_at = 1 WHERE id = %s", (consumed,))
    conn.execute("UPDATE accounts SET status = 'active' WHERE id ="
                 " (SELECT account FROM tokens WHERE id = %s)", (active_act,))
    conn.execute("SET session_replication_role = replica")  # an orphan, as old data may hold
    conn.execute("INSERT INTO tokens (id, action, account) VALUES (1000, 'password_recovery', 999)")
    conn.execute("INSERT INTO deliveries (job_type, token, priority) VALUES ('mailroom', 1000, 0)")
    conn.execute("SET session_replication_role = origin")
    c = claim(conn, 10)
    assert (c.rows, c.picked, c.skipped) == ([], 4, 4)
    reasons = dict(rows_of(conn, "SELECT token, last_error FROM deliveries WHERE token > 8"))
    assert reasons == {
        expired: "token expired",
        consumed: "token consumed",
        active_act: "account is active, activation needs provisioned",
        1000: "account missing",
    }


def test_status_and_next_due_in(conn: psycopg.Connection) -> None:
    s = ledger.status(conn, Q)
    assert {k: s[k] for k in ledger.STATUSES} == {
        "queued": 6, "claimed": 0, "sent": 0, "emitted": 0, "failed": 0, "skipped": 0}
    assert s["last_seq"] == 0 and s["oldest_queued_s"] >= 0
    assert ledger.next_due_in(conn, Q, 1000) == 0.0

    c = claim(conn, 10)
    ledger.record_outcomes(conn, Q, [(1, "sent", "m", None, None), (8, "failed", None, "e", None)],
                           claimed_at=c.claimed_at)
    s = ledger.status(conn, Q)
    assert {k: s[k] for k in ledger.STATUSES} == {
        "queued": 0, "claimed": 3, "sent": 1, "emitted": 0, "failed": 1, "skipped": 1}
    assert s["oldest_queued_s"] is None and s["last_seq"] == 8
    due = ledger.next_due_in(conn, Q, 30_000)
    assert due is not None and 25 < due <= 30  # the claims' lease runs out
    ledger.record_outcomes(conn, Q, [(t, "sent", "m", None, None) for t in (2, 3, 4)])
    assert ledger.next_due_in(conn, Q, 30_000) is None


# ---------------------------------------------------------------- schema


def test_check_schema(fresh_db: str) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as c:
        with pytest.raises(ledger.SchemaError, match="mailroom migrate up"):
            ledger.check_schema(c)
        migrate.up(fresh_db, 1)
        with pytest.raises(ledger.SchemaError, match="version 0.*mailroom migrate up"):
            ledger.check_schema(c)
        migrate.up(fresh_db)
        ledger.check_schema(c)
        c.execute("UPDATE schema_migrations SET dirty = true")
        with pytest.raises(ledger.SchemaError, match="dirty.*migrate force"):
            ledger.check_schema(c)


def test_configure_session_survives_a_rollback(db: str) -> None:
    with psycopg.connect(db) as c:
        ledger.configure_session(c)
        c.rollback()
        got = rows_of(c, "SELECT current_setting('synchronous_commit'),"
                      " current_setting('enable_bitmapscan'), current_setting('jit')")
        assert got == [("off", "off", "off")]


# ------------------------------------------------------------ scaling


def plan_nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def explain(conn: psycopg.Connection, limit: int) -> list[dict]:
    """The claim's executed plan nodes (rolled back)."""
    with conn.transaction(force_rollback=True):
        out = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + ledger._CLAIM,
            {"queue": Q, "limit": limit, "final": "claimed"},
        ).fetchone()[0]  # type: ignore[index]
    if isinstance(out, str):
        out = json.loads(out)
    return list(plan_nodes(out[0]["Plan"]))


def test_claim_stays_index_bound(fresh_db: str) -> None:
    """200k sent rows: the claim scans the queued index, never the ledger."""
    migrate.up(fresh_db)
    with connect(fresh_db) as c:
        # Bulk history without the triggers (as years of sending would leave it).
        c.execute("SET session_replication_role = replica")
        c.execute("INSERT INTO accounts (id, email, login, status) SELECT g, g || '@x',"
                  " 'u' || g, 'provisioned' FROM generate_series(1, 300000) g")
        c.execute("INSERT INTO tokens (id, action, account) SELECT g, 'activation', g"
                  " FROM generate_series(1, 300000) g")
        c.execute("INSERT INTO deliveries (job_type, token, priority, status, attempts, sent_at)"
                  " SELECT 'mailroom', g, 1, 'sent', 1, now() FROM generate_series(1, 200000) g")
        c.execute("INSERT INTO deliveries (job_type, token, priority)"
                  " SELECT 'mailroom', g, 1 FROM generate_series(200001, 200005) g")
        c.execute("SET session_replication_role = origin")
        c.execute("ANALYZE deliveries")

        nodes = explain(c, 10)
        scans = [(n["Node Type"], n.get("Index Name")) for n in nodes
                 if n.get("Relation Name") == "deliveries"]
        assert ("Index Scan", "deliveries_queued_idx") in scans
        assert all(kind != "Seq Scan" for kind, _ in scans), scans

        # A burst of 100k the statistics have not seen: a claim still reads
        # only `limit` rows of the index, and 1000 rows take milliseconds.
        c.execute("SET session_replication_role = replica")
        c.execute("INSERT INTO deliveries (job_type, token, priority)"
                  " SELECT 'mailroom', g, 1 FROM generate_series(200006, 300000) g")
        c.execute("SET session_replication_role = origin")
        for limit in (10, 1000):
            nodes = explain(c, limit)
            queued = [n for n in nodes if n.get("Index Name") == "deliveries_queued_idx"]
            assert queued and queued[0]["Actual Rows"] <= limit
            # Only index probes, no scan or join that walks the history.
            walks = [n["Node Type"] for n in nodes if n["Node Type"] in (
                "Merge Join", "Hash Join", "Bitmap Heap Scan", "Seq Scan")
                and n.get("Relation Name") != "jobs"]
            assert not walks, walks
            read = sum(n["Actual Rows"] * n["Actual Loops"] for n in nodes  # one per table
                       if "Index" in n["Node Type"] and n.get("Relation Name") != "jobs")
            assert read <= 4 * limit
        started = time.perf_counter()
        big = claim(c, 1000)
        elapsed = time.perf_counter() - started
        assert len(big.rows) == 1000 and tokens_of(big) == list(range(200001, 201001))
        assert elapsed < 2.0, f"1000-row claim took {elapsed:.3f}s"
