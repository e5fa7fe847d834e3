"""Seeing what became of each email (issue 21 item 4) on a real PostgreSQL: the story of a
delivery (mailroom deliveries), the 24-hour bounce and complaint rates (ledger.events.health,
mailroom status)."""

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
from mailroom.ledger import events as ledger_events
from mailroom.vocabulary import SES_BOUNCE, SES_COMPLAINT, DeliveryEvent, Feedback, Outcome, OutcomeKind

Q = "mailroom"


def send_all(conn: psycopg.Connection, emails: list[str]) -> dict[str, tuple[int, str]]:
    """Accounts for ``emails`` whose activation SES accepted, through the ledger's own
    claim and outcome: {email: (token, MessageId)}."""
    for n, email in enumerate(emails):
        conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)", (email, f"login{n}"))
    claim = ledger.claim(conn, Q, len(emails) + 1, lease_ms=60_000)
    sent = {row[1]: (row[5], f"0100018c-{row[5]:08d}-msg") for row in claim.rows}
    ledger.record_outcomes(conn, Q, [(t, Outcome(OutcomeKind.SENT, message_id=m)) for t, m in sent.values()],
                           claimed_at=claim.claimed_at)
    return sent


def now_minus(minutes: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)


def test_the_story_of_a_delivery(conn: psycopg.Connection, db: str) -> None:
    sent = send_all(conn, ["jane@example.com", "joe@example.com"])
    token, mid = sent["jane@example.com"]
    ledger_events.record_events(conn, [
        DeliveryEvent(mid, "jane@example.com", Feedback.BOUNCED, now_minus(1), "Permanent", "5.1.1 user unknown"),
        DeliveryEvent(mid, "jane@example.com", Feedback.DELAYED, now_minus(2), "MailboxFull", None),
    ])
    [row] = admin.deliveries(conn, Q, "jane@example.com")
    assert row["feedback"] == "bounced"
    assert [(e["type"], e["subtype"], e["diagnostic"]) for e in row["events"]] == [
        ("delayed", "MailboxFull", None), ("bounced", "Permanent", "5.1.1 user unknown")]
    [quiet] = admin.deliveries(conn, Q, "joe@example.com")
    assert quiet["feedback"] is None and quiet["events"] == []

    env = dict(os.environ, MAILROOM_DATABASE_URL=db, MAILROOM_IMPL="python")
    run = [sys.executable, "-m", "mailroom.cli", "deliveries"]
    as_json = json.loads(subprocess.run([*run, "--json", "jane@example.com"], env=env, capture_output=True,
                                        text=True, timeout=60, check=True).stdout)
    assert as_json[0]["feedback"] == "bounced" and as_json[0]["message_id"] == mid
    assert [e["type"] for e in as_json[0]["events"]] == ["delayed", "bounced"]
    assert dt.datetime.fromisoformat(as_json[0]["events"][1]["event_at"]) <= dt.datetime.now(dt.UTC)
    assert as_json[0]["events"][1]["diagnostic"] == "5.1.1 user unknown"

    shown = subprocess.run([*run, "jane@example.com"], env=env, capture_output=True, text=True, timeout=60,
                           check=True).stdout.splitlines()
    steps = [line.strip().split("  ", 1)[1] for line in shown[1:]]  # after the time
    assert steps == ["queued", "claimed (attempt 1)", f"sent, MessageId {mid}", "delayed (MailboxFull)",
                     "bounced (Permanent 5.1.1 user unknown)"]
    assert "feedback bounced" in shown[0]


def test_rates_over_the_last_24_hours(conn: psycopg.Connection, db: str) -> None:
    assert ledger_events.health(conn, Q) == ledger_events.Health(0, 0, 0, 0, 0)
    assert ledger_events.health(conn, Q).bounce_rate is None
    emails = [f"u{i}@example.com" for i in range(20)]
    sent = send_all(conn, emails)
    bounce = [DeliveryEvent(sent[e][1], e, Feedback.BOUNCED, now_minus(5), "Permanent", "5.1.1 user unknown")
              for e in emails[:2]]
    complaint = DeliveryEvent(sent[emails[2]][1], emails[2], Feedback.COMPLAINED, now_minus(3), "abuse")
    old = DeliveryEvent(sent[emails[3]][1], emails[3], Feedback.BOUNCED, now_minus(25 * 60), "Permanent")
    soft = DeliveryEvent(sent[emails[4]][1], emails[4], Feedback.SOFT_BOUNCED, now_minus(1), "Transient")
    ledger_events.record_events(conn, [*bounce, complaint, old, soft])
    health = ledger_events.health(conn, Q)
    assert (health.sent, health.bounced, health.complained) == (20, 2, 1)  # the 25-hour-old bounce is out
    assert health.suppressions == 4  # three permanent bounces and a complaint, the old one too
    assert health.bounce_rate == pytest.approx(0.1) and health.complaint_rate == pytest.approx(0.05)
    newest = conn.execute("SELECT max(id) FROM delivery_events WHERE type = 'complained'").fetchone()
    assert newest is not None and health.last_bad_event == newest[0]
    assert SES_BOUNCE.verdict(health.bounce_rate) == "pause" and SES_COMPLAINT.verdict(0.002) == "review"
    assert SES_BOUNCE.verdict(None) == "ok"

    env = dict(os.environ, MAILROOM_DATABASE_URL=db, MAILROOM_IMPL="python")
    run = [sys.executable, "-m", "mailroom.cli", "status"]
    report = json.loads(subprocess.run([*run, "--json"], env=env, capture_output=True, text=True, timeout=60,
                                       check=True).stdout)
    d = report["deliverability"]
    assert (d["sent"], d["bounced"], d["complained"], d["window_s"]) == (20, 2, 1, 86400)
    assert d["bounce_rate"] == pytest.approx(0.1) and d["bounce_thresholds"] == {"review": 0.05, "pause": 0.1}
    assert d["complaint_thresholds"] == {"review": 0.001, "pause": 0.005}
    shown = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "last 24 h: 20 sent" in shown
    assert ("bounce rate      10.00 %  (2 of 20 sent; SES reviews at 5 %, may pause at 10 %)"
            "  PAST SES'S PAUSE THRESHOLD") in shown
    assert "complaint rate    5.00 %  (1 of 20 sent; SES reviews at 0.1 %, may pause at 0.5 %)" in shown
