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

from mailroom import ledger
from mailroom.ledger import migrate
from mailroom.ledger import operations as ledger_ops
from mailroom.ledger import sql as ledger_sql
from mailroom.vocabulary import Outcome

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


def assert_queue_matches(conn: psycopg.Connection) -> None:
    """delivery_queue holds exactly the open deliveries: queued ones unclaimed,
    claimed ones with their claim's lease."""
    queue = rows_of(conn, "SELECT token, claimed_at FROM delivery_queue ORDER BY token")
    open_ = rows_of(conn, "SELECT token, CASE WHEN status = 'claimed' THEN claimed_at END"
                    " FROM deliveries WHERE status IN ('queued', 'claimed') ORDER BY token")
    assert queue == open_


@pytest.fixture(autouse=True, params=["probes", "ranges"])
def lookups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test twice: small claims probe row by row, large ones read key
    ranges where the rows are dense (ledger_ops._RANGES_FROM)."""
    if request.param == "ranges":
        monkeypatch.setattr(ledger_ops, "_RANGES_FROM", 1)


@pytest.fixture
def db(fresh_db: str) -> str:
    """Version 0, the fixture loaded as an old deployment left it, then migrated up."""
    migrate.up(fresh_db, 1)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute((DATA / "fixture.sql").read_text())
    assert migrate.up(fresh_db) == [1, 2, 3]
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
    assert_queue_matches(conn)
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
    assert_queue_matches(conn)


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


def test_concurrent_claimers_never_share_a_token_while_vacuum_runs(db: str, conn: psycopg.Connection) -> None:
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

    done = threading.Event()
    vacuums = 0

    def vacuum() -> None:
        # What autovacuum does in production (it is off on some test servers):
        # dead queue rows and their index entries vanish under the claims.
        nonlocal vacuums
        with psycopg.connect(db, autocommit=True) as c:
            while not done.is_set():
                c.execute("VACUUM delivery_queue")
                c.execute("VACUUM deliveries")
                vacuums += 1

    vacuuming = threading.Thread(target=vacuum)
    vacuuming.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(worker, [True, False] * 3))
    finally:
        done.set()
        vacuuming.join()
    flat = [t for mine in got for t in mine]
    assert len(flat) == len(set(flat))
    assert set(flat) == made
    assert sum(1 for mine in got if mine) > 1
    assert vacuums > 0
    assert rows_of(conn, "SELECT last_seq FROM jobs") == [(max(made),)]
    assert_queue_matches(conn)


# ------------------------------------------------------------- lifecycle


def expire_leases(conn: psycopg.Connection) -> None:
    """Make every current lease look an hour old, instead of waiting for it.

    Only the queue row (the lease) is backdated: the delivery keeps its
    ``claimed_at``, which is what identifies the claim to its outcomes.
    """
    conn.execute("UPDATE delivery_queue SET claimed_at = claimed_at - interval '1 hour'"
                 " WHERE claimed_at IS NOT NULL")




def test_lease_expiry_requeues_then_fails(conn: psycopg.Connection) -> None:
    first = claim(conn, 3)
    assert tokens_of(first) == [1, 8]
    assert ledger.requeue_expired(conn, Q, 60_000, 3) == 0
    expire_leases(conn)
    assert ledger.requeue_expired(conn, Q, 60_000, 2) == 2
    got = rows_of(conn, "SELECT status::text, attempts, last_error FROM deliveries WHERE token = 1")
    assert got == [("queued", 1, "lease expired (attempt 1)")]
    assert tokens_of(claim(conn, 2)) == tokens_of(first)
    expire_leases(conn)
    assert ledger.requeue_expired(conn, Q, 60_000, 2) == 2
    got = rows_of(conn, "SELECT status::text, attempts, last_error FROM deliveries WHERE token = 1")
    assert got == [("failed", 2, "lease expired, giving up after 2 attempts")]
    assert_queue_matches(conn)


def test_outcomes_of_each_kind(conn: psycopg.Connection) -> None:
    c = claim(conn, 10)
    assert tokens_of(c) == [1, 8, 2, 3, 4]
    changed = ledger.record_outcomes(
        conn, Q,
        [(1, Outcome("sent", "msg-1", None, None)),
         (8, Outcome("failed", None, "MessageRejected: bad address", None)),
         (2, Outcome("retry", None, "Throttling", 60.0)),
         (3, Outcome("retry", None, "ServiceUnavailable", 0.0))],
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
    ledger.record_outcomes(conn, Q, [(3, Outcome("retry", None, "Throttling", 1.0))], max_attempts=2)
    assert rows_of(conn, "SELECT status::text, last_error FROM deliveries WHERE token = 3") == [
        ("failed", "giving up after 2 attempts (MAILROOM_SEND_MAX_ATTEMPTS): Throttling")]
    with pytest.raises(ValueError):
        ledger.record_outcomes(conn, Q, [(4, Outcome("bounced", None, None, None))])
    assert ledger.record_outcomes(conn, Q, []) == 0
    assert_queue_matches(conn)


def test_stale_outcomes_do_not_clobber(conn: psycopg.Connection) -> None:
    old = claim(conn, 1)
    assert tokens_of(old) == [1]
    expire_leases(conn)
    ledger.requeue_expired(conn, Q, 60_000, 5)
    new = claim(conn, 1)
    assert tokens_of(new) == [1] and new.claimed_at != old.claimed_at

    # A late failure of the first claim must not undo the second one...
    for kind in ("failed", "retry"):
        assert ledger.record_outcomes(
            conn, Q, [(1, Outcome(kind, None, "late", 5.0))], claimed_at=old.claimed_at) == 0
    assert statuses(conn)[1] == "claimed"
    # ... but the current claim's outcome lands.
    assert ledger.record_outcomes(
        conn, Q, [(1, Outcome("sent", "new-msg", None, None))], claimed_at=new.claimed_at) == 1
    # Outcomes for rows already final change nothing.
    assert ledger.record_outcomes(conn, Q, [(1, Outcome("sent", "dup", None, None))]) == 0
    assert ledger.record_outcomes(conn, Q, [(1, Outcome("failed", None, "x", None))]) == 0
    assert rows_of(conn, "SELECT message_id FROM deliveries WHERE token = 1") == [("new-msg",)]

    # A late *sent* is a fact: it lands on a row re-queued meanwhile and so
    # prevents the duplicate.
    c8 = claim(conn, 2)  # 5 is skipped on the way
    assert tokens_of(c8) == [8]
    expire_leases(conn)
    ledger.requeue_expired(conn, Q, 60_000, 5)
    assert ledger.record_outcomes(
        conn, Q, [(8, Outcome("sent", "late-msg", None, None))], claimed_at=c8.claimed_at) == 1
    assert statuses(conn)[8] == "sent"
    assert 8 not in tokens_of(claim(conn, 10))
    assert_queue_matches(conn)


def test_outcomes_of_several_claims_at_once(conn: psycopg.Connection) -> None:
    """record_claims writes several claims' outcomes as if one after the other."""
    old = claim(conn, 1)
    assert tokens_of(old) == [1]
    expire_leases(conn)
    ledger.requeue_expired(conn, Q, 60_000, 5)
    new = claim(conn, 3)  # 5 is skipped on the way
    assert tokens_of(new) == [1, 8] and new.claimed_at != old.claimed_at
    other = claim(conn, 1)
    assert tokens_of(other) == [2]
    # The old claim's late 'sent' first (a fact: it lands), then the new claim
    # of the same token fails: in turn, that failure finds the row sent and
    # changes nothing; 8 and 2 land in the same statement.
    changed = ledger.record_claims(conn, Q, [
        ([(1, Outcome("sent", "old-msg", None, None))], old.claimed_at),
        ([(1, Outcome("failed", None, "late", None)), (8, Outcome("failed", None, "bad", None))],
         new.claimed_at),
        ([(2, Outcome("sent", "msg-2", None, None))], other.claimed_at),
    ], max_attempts=5)
    assert changed == 3
    got = {r[0]: r[1:] for r in rows_of(conn, "SELECT token, status::text, message_id, last_error"
                                              " FROM deliveries WHERE token IN (1, 2, 8)")}
    assert got == {1: ("sent", "old-msg", "lease expired (attempt 1)"), 8: ("failed", None, "bad"),
                   2: ("sent", "msg-2", None)}
    assert ledger.record_claims(conn, Q, []) == 0
    assert_queue_matches(conn)


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
    assert_queue_matches(conn)


def test_skip_reasons(conn: psycopg.Connection) -> None:
    claim(conn, 10)
    [expired, consumed, active_act] = new_tokens(conn, 3, "activation")
    conn.execute("UPDATE tokens SET expires_at = 1 WHERE id = %s", (expired,))
    conn.execute("UPDATE tokens SET consumed_at = 1 WHERE id = %s", (consumed,))
    conn.execute("UPDATE accounts SET status = 'active' WHERE id ="
                 " (SELECT account FROM tokens WHERE id = %s)", (active_act,))
    conn.execute("SET session_replication_role = replica")  # an orphan, as old data may hold
    conn.execute("INSERT INTO tokens (id, action, account) VALUES (1000, 'password_recovery', 999)")
    conn.execute("SET session_replication_role = origin")
    conn.execute("INSERT INTO deliveries (job_type, token, priority) VALUES ('mailroom', 1000, 0)")
    conn.execute("INSERT INTO delivery_queue (job_type, token, priority, next_attempt_at)"
                 " VALUES ('mailroom', 1000, 0, now())")
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
    ledger.record_outcomes(conn, Q, [(1, Outcome("sent", "m", None, None)), (8, Outcome("failed", None, "e", None))],
                           claimed_at=c.claimed_at)
    s = ledger.status(conn, Q)
    assert {k: s[k] for k in ledger.STATUSES} == {
        "queued": 0, "claimed": 3, "sent": 1, "emitted": 0, "failed": 1, "skipped": 1}
    assert s["oldest_queued_s"] is None and s["last_seq"] == 8
    due = ledger.next_due_in(conn, Q, 30_000)
    assert due is not None and 25 < due <= 30  # the claims' lease runs out
    ledger.record_outcomes(conn, Q, [(t, Outcome("sent", "m", None, None)) for t in (2, 3, 4)])
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
                      " current_setting('enable_seqscan'), current_setting('enable_bitmapscan'),"
                      " current_setting('jit')")
        assert got == [("off", "off", "off", "off")]


# ------------------------------------------------------- open work, hint


def test_rows_that_moved_on_are_dropped_not_sent(conn: psycopg.Connection) -> None:
    # An operator fails a queued row by hand, a token is deleted: their queue
    # rows are pointers to nothing left to do.
    conn.execute("UPDATE deliveries SET status = 'failed' WHERE token = 1")
    conn.execute("DELETE FROM tokens WHERE id = 2")
    c = claim(conn, 10)
    assert tokens_of(c) == [8, 3, 4] and (c.picked, c.skipped) == (6, 3)
    assert statuses(conn) == {1: "failed", 3: "claimed", 4: "claimed", 5: "skipped", 8: "claimed"}
    assert_queue_matches(conn)


def test_begin_opens_the_transaction_and_a_rollback_undoes_everything(
        conn: psycopg.Connection) -> None:
    c = claim(conn, 3, begin=True)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    conn.rollback()
    assert set(statuses(conn).values()) == {"queued"}
    assert_queue_matches(conn)
    assert claim(conn, 3) == c._replace(claimed_at=claim_time(conn))  # same rows, from the start


def claim_time(conn: psycopg.Connection) -> Any:
    return rows_of(conn, "SELECT max(claimed_at) FROM deliveries")[0][0]


def test_claims_survive_discard_all(conn: psycopg.Connection) -> None:
    assert tokens_of(claim(conn, 2)) == [1]  # and 5, skipped
    conn.execute("DISCARD ALL")  # drops the prepared claim (and the hint)
    assert tokens_of(claim(conn, 2, begin=True)) == [8, 2]
    conn.commit()
    conn.execute("DEALLOCATE ALL")
    assert tokens_of(claim(conn, 2)) == [3, 4]


def test_rows_queued_behind_the_hint_come_first(db: str, conn: psycopg.Connection) -> None:
    claim(conn, 10)
    new_tokens(conn, 30, "activation")
    with psycopg.connect(db) as running, connect(db) as other:
        [inflight] = new_tokens(running, 1)  # uncommitted while the hint is set
        first = claim(conn, 10)
        assert first.picked == 10  # full: the next claim follows the hint
        running.commit()
        [arrived] = new_tokens(other, 1)  # committed after the hint was set
        second = claim(conn, 10)
    assert tokens_of(second)[:2] == [inflight, arrived]
    assert tokens_of(second)[2:] == [t + 10 for t in tokens_of(first)[:8]]


def test_rows_the_hint_cannot_see_wait_at_most_its_ttl(
        db: str, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_ops, "_HINT_TTL_S", 1.0)
    claim(conn, 10)
    made = new_tokens(conn, 30, "activation")
    with connect(db) as aborting:
        held = claim(aborting, 5, begin=True)  # locks the first five
        hinted = claim(conn, 5)  # skips them, leaves its hint after them
        aborting.rollback()  # they are queued again, behind that hint
    assert tokens_of(held) == made[:5] and tokens_of(hinted) == made[5:10]
    assert tokens_of(claim(conn, 5)) == made[10:15]  # follows the hint
    time.sleep(1.1)
    assert tokens_of(claim(conn, 5)) == made[:5]  # the hint expired: from the start
    rest = claim(conn, 100)  # short claims read everything, hint or not
    assert tokens_of(rest) == made[15:]


def test_hinted_claims_do_not_walk_the_rows_claimed_before(
        fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DELETE leaves its index entry until VACUUM: a drain must not read
    every entry it already took at each claim."""
    monkeypatch.setattr(ledger_ops, "_HINT_TTL_S", 600.0)
    migrate.up(fresh_db)
    with connect(fresh_db) as c:
        bulk_backlog(c, 1, 60_000)
        for _ in range(50):
            assert claim(c, 1000).picked == 1000  # 50,000 dead entries at the start
        hinted = blocks(explain(c, 10), "delivery_queue_queued_idx")
    with connect(fresh_db) as c:  # a new session has no hint
        fresh = blocks(explain(c, 10), "delivery_queue_queued_idx")
    assert hinted <= 5 < 100 < fresh, (hinted, fresh)


# ------------------------------------------------------------ scaling


def plan_nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def explain(conn: psycopg.Connection, limit: int) -> list[dict]:
    """The claim's executed plan nodes (rolled back, hint included)."""
    sql = ledger_sql.claim_sql(Q, limit, "claimed", ledger_ops._HINT_TTL_S, ledger_ops._RANGES_FROM)
    with conn.transaction(force_rollback=True):
        out = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql).fetchone()[0]
    if isinstance(out, str):
        out = json.loads(out)
    return list(plan_nodes(out[0]["Plan"]))


def blocks(nodes: list[dict], index: str) -> int:
    return sum(n["Shared Hit Blocks"] + n["Shared Read Blocks"] for n in nodes
               if n.get("Index Name") == index)


def bulk_backlog(conn: psycopg.Connection, first: int, last: int, **deliveries: str) -> None:
    """Accounts, tokens and deliveries without the triggers (as years of sending
    would leave them), and the queue rows for those still queued."""
    conn.execute("SET session_replication_role = replica")
    conn.execute("INSERT INTO accounts (id, email, login) SELECT g, g || '@x', 'u' || g"
                 " FROM generate_series(%s, %s) g", (first, last))
    conn.execute("INSERT INTO tokens (id, action, account) SELECT g, 'activation', g"
                 " FROM generate_series(%s, %s) g", (first, last))
    cols = "".join(", " + k for k in deliveries)
    conn.execute(f"INSERT INTO deliveries (job_type, token, priority{cols}) SELECT 'mailroom', g,"
                 f" 1{''.join(', ' + v for v in deliveries.values())}"
                 " FROM generate_series(%s, %s) g", (first, last))
    conn.execute("INSERT INTO delivery_queue (job_type, token, priority, next_attempt_at)"
                 " SELECT job_type, token, priority, next_attempt_at FROM deliveries"
                 " WHERE status = 'queued' AND token BETWEEN %s AND %s", (first, last))
    conn.execute("SET session_replication_role = origin")


@pytest.mark.timing
def test_claim_stays_index_bound(fresh_db: str) -> None:
    """200k sent rows: a claim reads about `limit` rows of each table, whatever
    the history and the statistics."""
    migrate.up(fresh_db)
    with connect(fresh_db) as c:
        bulk_backlog(c, 1, 200_000, status="'sent'", attempts="1", sent_at="now()")
        bulk_backlog(c, 200_001, 200_005)
        c.execute("ANALYZE deliveries")
        c.execute("ANALYZE delivery_queue")
        nodes = explain(c, 10)
        assert blocks(nodes, "delivery_queue_queued_idx") > 0
        # A burst of 100k the statistics have not seen (ids in a run), then
        # recovery tokens scattered over the history (probed one by one).
        bulk_backlog(c, 200_006, 300_000)
        c.execute("INSERT INTO tokens (id, action, account) SELECT 300000 + g,"
                  " 'password_recovery', g * 199 FROM generate_series(1, 1000) g")
        c.execute("UPDATE accounts SET status = 'active' WHERE id % 199 = 0")
        for limit in (10, 1000, 1000, 1000):
            nodes = explain(c, limit)
            walks = [n["Node Type"] for n in nodes
                     if n["Node Type"] in ("Seq Scan", "Bitmap Heap Scan")]
            assert not walks, walks
            read = sum((n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
                       for n in nodes if n.get("Relation Name") not in (None, "jobs"))
            assert read <= 8 * limit, read
            claim(c, limit)
        started = time.perf_counter()
        big = claim(c, 1000)
        elapsed = time.perf_counter() - started
        assert big.picked == 1000 and tokens_of(big)[0] > 200_000
        assert elapsed < 2.0, f"1000-row claim took {elapsed:.3f}s"


# ------------------------------------------------------------ held actions (templates)


def test_claims_leave_a_held_action_queued_and_not_due(conn: psycopg.Connection) -> None:
    recovery = new_tokens(conn, 3)
    activation = new_tokens(conn, 3, "activation")
    # Recovery held: only activations are claimed, whatever the limit and the order.
    only = claim(conn, 100, actions={1})
    assert set(activation) <= set(tokens_of(only)) and not set(recovery) & set(tokens_of(only))
    assert all(row[0] == 1 for row in only.rows)
    assert all(statuses(conn)[t] == "queued" for t in recovery)
    assert ledger.next_due_in(conn, Q, 3_600_000, actions={1}) != 0  # the held rows are not due
    assert ledger.next_due_in(conn, Q, 3_600_000) == 0  # unfiltered, the recoveries are due
    assert claim(conn, 100, actions=()).rows == []  # everything held: nothing claimed
    # Released: a claim takes them at once (the hint of the filtered claims is not theirs).
    released = claim(conn, 100)
    assert set(recovery) <= set(tokens_of(released))
    assert "queued" not in statuses(conn).values()
    assert_queue_matches(conn)


def test_a_held_outcome_queues_the_row_again_with_its_attempt_given_back(conn: psycopg.Connection) -> None:
    tokens = new_tokens(conn, 2)
    c = claim(conn, 100)
    assert set(tokens) <= set(tokens_of(c))
    attempts = dict(rows_of(conn, "SELECT token, attempts FROM deliveries WHERE token = ANY(%s)", (tokens,)))
    assert set(attempts.values()) == {1}
    ledger.record_outcomes(conn, Q, [(t, Outcome("held", None, "held: template x does not exist in SES", 0.0))
                                     for t in tokens], claimed_at=c.claimed_at, max_attempts=1)
    # max_attempts=1 would fail a retry; a held row is not the row's fault and stays queued.
    assert rows_of(conn, "SELECT status::text, attempts, last_error FROM deliveries WHERE token = ANY(%s)",
                   (tokens,)) == [("queued", 0, "held: template x does not exist in SES")] * 2
    assert set(tokens) <= set(tokens_of(claim(conn, 100)))
    assert_queue_matches(conn)
