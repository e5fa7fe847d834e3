"""Ledger commands for operators (mailroom.ledger.admin, mailroom deliveries|retry|skip)
on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import psycopg
import pytest

from mailroom import ledger
from mailroom.ledger import admin
from mailroom.ledger.commands import parse_since
from mailroom.vocabulary import Outcome, OutcomeKind

Q = "mailroom"
NOT_VERIFIED = "MessageRejected: Email address is not verified. The following identities failed: {}"


def make_accounts(conn: psycopg.Connection, n: int, prefix: str = "u") -> list[int]:
    """n accounts (one queued activation each); their token ids in order."""
    conn.execute("INSERT INTO accounts (email, login) SELECT %s || i || '@example.test', %s || i"
                 " FROM generate_series(1, %s) AS i", (prefix, prefix, n))
    return [r[0] for r in conn.execute(
        "SELECT t.id FROM tokens t JOIN accounts a ON a.id = t.account WHERE a.login LIKE %s ORDER BY t.id",
        (prefix + "%",))]


def settle(conn: psycopg.Connection, outcomes: dict[int, tuple[str, str | None]]) -> None:
    """Claim everything queued and record the given outcomes (token -> (kind, error))."""
    claim = ledger.claim(conn, Q, 1000, lease_ms=60_000)
    claimed = {row[5] for row in claim.rows}
    assert set(outcomes) <= claimed
    ledger.record_outcomes(conn, Q, [
        (t, Outcome(OutcomeKind(kind), f"msg-{t}" if kind == "sent" else None, error, 0.0))
        for t, (kind, error) in outcomes.items()], claimed_at=claim.claimed_at, max_attempts=5)


def snapshot(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT d.*, q.claimed_at FROM deliveries d LEFT JOIN delivery_queue q"
                        " USING (job_type, token) ORDER BY token").fetchall()


def status_of(conn: psycopg.Connection, token: int) -> tuple:
    return conn.execute("SELECT status::text, attempts FROM deliveries WHERE token = %s", (token,)).fetchone()


def queued_tokens(conn: psycopg.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT token FROM delivery_queue WHERE claimed_at IS NULL")}


@pytest.fixture
def settled(conn: psycopg.Connection) -> dict[str, int]:
    """Six deliveries: sent, two not-verified failures, a throttling failure, one
    still claimed, one queued (created after the claim)."""
    t = make_accounts(conn, 5)
    settle(conn, {t[0]: ("sent", None), t[1]: ("failed", NOT_VERIFIED.format("u2@example.test")),
                  t[2]: ("failed", NOT_VERIFIED.format("u3@example.test")),
                  t[3]: ("failed", "Throttling: Maximum sending rate exceeded")})
    queued = make_accounts(conn, 1, prefix="late")[0]
    return {"sent": t[0], "nv1": t[1], "nv2": t[2], "throttled": t[3], "claimed": t[4], "queued": queued}


def test_deliveries_of_an_address_newest_first(conn, settled):
    assert admin.deliveries(conn, Q, "nobody@example.test") == []
    conn.execute("INSERT INTO tokens (action, account) SELECT 'password_recovery', id FROM accounts"
                 " WHERE email = 'u1@example.test'")
    rows = admin.deliveries(conn, Q, "u1@example.test")
    assert [(r["action"], r["status"]) for r in rows] == [("password_recovery", "queued"), ("activation", "sent")]
    sent = rows[1]
    assert sent["token"] == settled["sent"] and sent["message_id"] == f"msg-{settled['sent']}"
    assert sent["attempts"] == 1 and sent["sent_at"] is not None and sent["last_error"] is None
    assert set(sent) == {"token", "action", "status", "attempts", "created_at", "claimed_at",
                         "next_attempt_at", "sent_at", "message_id", "last_error", "feedback", "events"}
    assert len(admin.deliveries(conn, Q, "u1@example.test", limit=1)) == 1


def test_retry_dry_run_changes_nothing(conn, settled):
    before = snapshot(conn)
    assert admin.retry(conn, Q, dry_run=True) == 3
    assert admin.retry(conn, Q, error="not verified", dry_run=True) == 2
    assert snapshot(conn) == before


def test_retry_by_error_substring_requeues_with_a_fresh_budget(conn, settled):
    assert admin.retry(conn, Q, error="not verified", channel="token_insert") == 2
    for token in (settled["nv1"], settled["nv2"]):
        assert status_of(conn, token) == ("queued", 0)
    assert status_of(conn, settled["throttled"]) == ("failed", 1)
    assert queued_tokens(conn) == {settled["nv1"], settled["nv2"], settled["queued"]}
    # The error stays as the record; the rows are claimable again.
    assert "not verified" in admin.deliveries(conn, Q, "u2@example.test")[0]["last_error"]
    claim = ledger.claim(conn, Q, 10, lease_ms=60_000)
    assert {row[5] for row in claim.rows} == {settled["nv1"], settled["nv2"], settled["queued"]}
    assert admin.retry(conn, Q, error="not verified") == 0  # claimed now, not failed


def test_retry_never_touches_sent_claimed_or_queued_rows(conn, settled):
    everything = [settled[k] for k in ("sent", "claimed", "queued")]
    before = snapshot(conn)
    assert admin.retry(conn, Q, tokens=everything) == 0
    assert admin.retry(conn, Q, email="u1@example.test") == 0
    assert snapshot(conn) == before
    assert admin.retry(conn, Q) == 3
    assert status_of(conn, settled["sent"]) == ("sent", 1)
    assert status_of(conn, settled["claimed"]) == ("claimed", 1)


def test_retry_filters_combine(conn, settled):
    assert admin.retry(conn, Q, email="u2@example.test", error="Throttling") == 0
    assert admin.retry(conn, Q, email="u2@example.test") == 1
    assert admin.retry(conn, Q, tokens=[settled["throttled"]], error="Throttling") == 1
    assert status_of(conn, settled["nv2"]) == ("failed", 1)


def test_since_is_bounded_by_the_key_and_exact(conn):
    tokens = make_accounts(conn, 40)
    # One token an hour, the newest now; all failed.
    conn.execute("UPDATE deliveries SET created_at = statement_timestamp() - (%s - token) * interval '1 hour'",
                 (tokens[-1],))
    settle(conn, {t: ("failed", "boom") for t in tokens})
    now = conn.execute("SELECT statement_timestamp()").fetchone()[0]
    since = now - dt.timedelta(hours=9, minutes=30)
    floor = admin.token_floor(conn, Q, since)
    assert tokens[-10] - 1 <= floor <= tokens[-10]  # within the 10-minute slack
    assert admin.retry(conn, Q, since=since, dry_run=True) == 10
    assert admin.retry(conn, Q, since=now + dt.timedelta(hours=1)) == 0
    assert admin.retry(conn, Q, since=now - dt.timedelta(days=30)) == 40


def test_skip_takes_queued_rows_off_the_queue(conn, settled):
    assert admin.skip(conn, Q, dry_run=True) == 1
    more = make_accounts(conn, 3, prefix="extra")
    before = snapshot(conn)
    assert admin.skip(conn, Q, email="extra2@example.test", dry_run=True) == 1
    assert snapshot(conn) == before
    assert admin.skip(conn, Q, email="extra2@example.test") == 1
    assert status_of(conn, more[1]) == ("skipped", 0)
    assert more[1] not in queued_tokens(conn)
    assert admin.skip(conn, Q) == 3  # the rest of the queued ones; claimed, sent, failed stay
    assert queued_tokens(conn) == set()
    assert status_of(conn, settled["claimed"])[0] == "claimed"
    assert status_of(conn, settled["sent"])[0] == "sent"
    assert status_of(conn, settled["nv1"])[0] == "failed"
    assert ledger.claim(conn, Q, 10, lease_ms=60_000).rows == []


def test_counts_and_failure_groups(conn, settled):
    c = admin.counts(conn, Q, lease_ms=60_000)
    by = c["by_status_action"]
    assert by["sent"]["activation"] == 1 and by["failed"]["activation"] == 3
    assert by["claimed"]["activation"] == 1 and by["queued"]["activation"] == 1
    assert by["skipped"] == {"activation": 0, "password_recovery": 0}
    assert c["oldest_queued_s"] is not None and c["oldest_queued_s"] >= 0
    assert c["expired_leases"] == 0
    assert admin.counts(conn, Q, lease_ms=1)["expired_leases"] == 1
    groups = admin.failure_groups(conn, Q)
    assert [(g["count"], g["error"]) for g in groups] == [
        (2, NOT_VERIFIED.format("<address>")), (1, "Throttling: Maximum sending rate exceeded")]
    assert groups[0]["sample"] in ("u2@example.test", "u3@example.test")
    assert groups[0]["first_seen"] <= groups[0]["last_seen"]
    assert admin.failure_groups(conn, Q, limit=1)[0]["count"] == 2
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert admin.failure_groups(conn, Q, since=future) == []


def test_parse_since():
    now = dt.datetime(2024, 4, 20, 12, 0, tzinfo=dt.UTC)
    assert parse_since("2h", now) == now - dt.timedelta(hours=2)
    assert parse_since("1h30m", now) == now - dt.timedelta(minutes=90)
    assert parse_since("2024-04-20T10:00", now) == dt.datetime(2024, 4, 20, 10, tzinfo=dt.UTC)
    assert parse_since("2024-04-20T10:00+02:00", now).utcoffset() == dt.timedelta(hours=2)
    for bad in ("yesterday", "2x", ""):
        with pytest.raises(ValueError):
            parse_since(bad, now)


def mailroom(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MAILROOM_DATABASE_URL=db, MAILROOM_IMPL="python")  # no wire warning line
    return subprocess.run([sys.executable, "-m", "mailroom.cli", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_console_commands(db, conn, settled):
    shown = mailroom(db, "deliveries", "u2@example.test")
    assert shown.returncode == 0 and "failed" in shown.stdout and "not verified" in shown.stdout
    rows = json.loads(mailroom(db, "deliveries", "--json", "u1@example.test").stdout)
    assert rows[0]["status"] == "sent" and rows[0]["message_id"].startswith("msg-")
    dry = mailroom(db, "retry", "--error", "not verified", "--dry-run")
    assert (dry.returncode, dry.stdout.strip()) == (0, "would queue again 2 failed deliveries of queue mailroom")
    assert status_of(conn, settled["nv1"])[0] == "failed"
    done = mailroom(db, "retry", "--since", "1h", "--error", "not verified")
    assert done.stdout.strip() == "queued again 2 failed deliveries of queue mailroom"
    assert status_of(conn, settled["nv1"])[0] == "queued"
    skipped = mailroom(db, "skip", "--json", "--email", "late1@example.test")
    assert json.loads(skipped.stdout) == {"command": "skip", "dry_run": False, "rows": 1}
    bad = mailroom(db, "retry", "--since", "soon")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
