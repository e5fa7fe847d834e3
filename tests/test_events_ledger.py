"""Delivery events and suppressions in the ledger (migration 3, mailroom.ledger.events,
mailroom.ledger.suppressions) on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import itertools

import psycopg
import pytest

from mailroom import ledger
from mailroom.ledger import events as ledger_events
from mailroom.ledger import suppressions
from mailroom.vocabulary import DeliveryEvent, Feedback, Outcome, OutcomeKind

Q = "mailroom"
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


_ids = itertools.count(1)


def sent_to(conn: psycopg.Connection, email: str) -> tuple[int, str]:
    """A provisioned account for ``email`` whose activation email SES accepted, through
    the ledger's own claim and outcome: (token, MessageId)."""
    conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)", (email, f"login{next(_ids)}-{email}"))
    claim = ledger.claim(conn, Q, 10, lease_ms=60_000)
    [row] = [r for r in claim.rows if r[1] == email]
    message_id = f"0100018c-{row[5]:08d}-msg"
    ledger.record_outcomes(conn, Q, [(row[5], Outcome(OutcomeKind.SENT, message_id=message_id))],
                           claimed_at=claim.claimed_at)
    return row[5], message_id


def event(message_id: str, recipient: str, type_: Feedback, minute: int = 0, **kw: str) -> DeliveryEvent:
    return DeliveryEvent(message_id, recipient, type_, T0 + dt.timedelta(minutes=minute), **kw)


def feedback(conn: psycopg.Connection, token: int) -> str | None:
    row = conn.execute("SELECT feedback::text FROM deliveries WHERE token = %s", (token,)).fetchone()
    assert row is not None
    return row[0]


def event_rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT token, message_id, recipient, type::text, subtype, diagnostic"
                        " FROM delivery_events ORDER BY id").fetchall()


def test_events_match_their_delivery_and_raise_its_feedback(conn: psycopg.Connection) -> None:
    token, mid = sent_to(conn, "jane@example.com")
    got = ledger_events.record_events(conn, [event(mid, "jane@example.com", Feedback.DELIVERED, raw="{}")])
    assert got == ledger_events.Recorded({"delivered": 1}, 0, 0, 1)
    assert feedback(conn, token) == "delivered"
    assert event_rows(conn) == [(token, mid, "jane@example.com", "delivered", None, None)]


ORDERS = list(itertools.permutations([Feedback.DELAYED, Feedback.DELIVERED, Feedback.COMPLAINED]))


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_precedence_whatever_the_arrival_order(conn: psycopg.Connection, order: tuple[Feedback, ...]) -> None:
    token, mid = sent_to(conn, "jane@example.com")
    for minute, kind in enumerate(order):  # one batch each: the order is the arrival order
        ledger_events.record_events(conn, [event(mid, "jane@example.com", kind, minute)])
    assert feedback(conn, token) == "complained"


def test_the_precedence_rule_in_full(conn: psycopg.Connection) -> None:
    """complained > bounced > rejected > render_failed > soft_bounced > delivered > delayed,
    arriving weakest last."""
    token, mid = sent_to(conn, "jane@example.com")
    ranked = ["complained", "bounced", "rejected", "render_failed", "soft_bounced", "delivered", "delayed"]
    assert [f.value for f in reversed(list(Feedback))] == ranked  # the enum lists them so
    for minute, kind in enumerate(reversed(ranked)):
        ledger_events.record_events(conn, [event(mid, "jane@example.com", Feedback(kind), minute)])
        assert feedback(conn, token) == kind  # each stronger word wins
    for minute, kind in enumerate(ranked[1:], start=10):
        ledger_events.record_events(conn, [event(mid, "jane@example.com", Feedback(kind), minute)])
    assert feedback(conn, token) == "complained"  # no weaker word takes it back


def test_a_redelivered_event_changes_nothing(conn: psycopg.Connection) -> None:
    token, mid = sent_to(conn, "jane@example.com")
    bounce = event(mid, "jane@example.com", Feedback.BOUNCED, subtype="Permanent", diagnostic="5.1.1 user unknown")
    first = ledger_events.record_events(conn, [bounce, bounce])  # twice in one batch, too
    assert first == ledger_events.Recorded({"bounced": 1}, 0, 1, 1)
    before = (event_rows(conn), suppressions.entries(conn), feedback(conn, token))
    assert ledger_events.record_events(conn, [bounce]) == ledger_events.Recorded({}, 0, 0, 0)
    assert (event_rows(conn), suppressions.entries(conn), feedback(conn, token)) == before
    assert len(before[0]) == 1


def test_one_event_for_several_recipients_of_one_call(conn: psycopg.Connection) -> None:
    """A bulk call returns one MessageId per destination; events name the address too."""
    a, mid_a = sent_to(conn, "a@example.com")
    b, mid_b = sent_to(conn, "b@example.com")
    got = ledger_events.record_events(conn, [event(mid_a, "a@example.com", Feedback.DELIVERED),
                                             event(mid_b, "b@example.com", Feedback.SOFT_BOUNCED),
                                             # the wrong MessageId for this address: no delivery
                                             event(mid_a, "b@example.com", Feedback.BOUNCED)])
    assert got.by_type == {"delivered": 1, "soft_bounced": 1, "bounced": 1}
    assert got.unmatched == 1
    assert (feedback(conn, a), feedback(conn, b)) == ("delivered", "soft_bounced")


def test_unknown_message_ids_are_kept_unmatched_and_still_suppress(conn: psycopg.Connection) -> None:
    got = ledger_events.record_events(conn, [
        event("someone-else", "x@Example.ORG", Feedback.COMPLAINED, subtype="abuse"),
        event("someone-else-2", "y@example.org", Feedback.DELIVERED)])
    assert got == ledger_events.Recorded({"complained": 1, "delivered": 1}, 2, 1, 0)
    assert [r[0] for r in event_rows(conn)] == [None, None]
    assert suppressions.check(conn, "X@example.org") is None  # the local part is as is
    entry = suppressions.check(conn, "x@example.org")
    assert entry is not None and (entry["reason"], entry["created_by"]) == ("complained", "ses")


def test_an_event_before_its_outcome_is_matched_later(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO accounts (email, login) VALUES ('late@example.com', 'late')")
    claim = ledger.claim(conn, Q, 10, lease_ms=60_000)
    [row] = claim.rows
    got = ledger_events.record_events(conn, [event("mid-late", "late@example.com", Feedback.DELIVERED)])
    assert got.unmatched == 1
    assert ledger_events.rematch_events(conn) == 0  # still no MessageId in the ledger
    ledger.record_outcomes(conn, Q, [(row[5], Outcome(OutcomeKind.SENT, message_id="mid-late"))],
                           claimed_at=claim.claimed_at)
    assert ledger_events.rematch_events(conn) == 1
    assert feedback(conn, row[5]) == "delivered"
    assert event_rows(conn)[0][0] == row[5]
    assert ledger_events.rematch_events(conn) == 0


def test_permanent_bounces_and_complaints_suppress_soft_ones_do_not(conn: psycopg.Connection) -> None:
    ledger_events.record_events(conn, [
        event("m1", "hard@Example.com", Feedback.BOUNCED, subtype="Permanent", diagnostic="5.1.1 user unknown"),
        event("m2", "soft@example.com", Feedback.SOFT_BOUNCED, subtype="Transient"),
        event("m3", "spam@bücher.de", Feedback.COMPLAINED, subtype="abuse"),
        event("m4", "rej@example.com", Feedback.REJECTED)])
    listed = {e["address"]: e for e in suppressions.entries(conn)}
    assert set(listed) == {"hard@example.com", "spam@xn--bcher-kva.de"}
    assert listed["hard@example.com"]["detail"] == "5.1.1 user unknown"
    assert suppressions.count(conn) == 2
    assert suppressions.check(conn, " spam@BÜCHER.de ") is not None


def test_raw_json_is_capped(conn: psycopg.Connection) -> None:
    ledger_events.record_events(conn, [event("m", "a@example.com", Feedback.DELIVERED, raw="x" * 100_000)])
    row = conn.execute("SELECT length(raw) FROM delivery_events").fetchone()
    assert row == (ledger_events.RAW_CAP,)


def test_operator_add_and_remove_are_audited(conn: psycopg.Connection) -> None:
    assert suppressions.add(conn, "Jane@Example.com", actor="alice", note="asked us to stop") is True
    assert suppressions.add(conn, "Jane@example.COM", actor="bob") is False  # already there
    entry = suppressions.check(conn, "Jane@example.com")
    assert entry is not None and (entry["reason"], entry["created_by"]) == ("operator", "alice")
    assert suppressions.remove(conn, "jane@example.com", actor="bob") is False  # local part as is
    assert suppressions.remove(conn, "Jane@EXAMPLE.com", actor="bob") is True
    assert suppressions.check(conn, "Jane@example.com") is None
    audit = conn.execute("SELECT action, address, reason, actor FROM suppression_audit ORDER BY id").fetchall()
    assert audit == [("add", "Jane@example.com", "asked us to stop", "alice"),
                     ("remove", "Jane@example.com", "was operator", "bob")]


# ------------------------------------------------------------------ the claim


@pytest.mark.parametrize("ranges", [False, True], ids=["probes", "ranges"])
def test_a_claim_skips_suppressed_addresses(conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
                                            ranges: bool) -> None:
    if ranges:  # large claims read key ranges: the same rule there
        from mailroom.ledger import operations

        monkeypatch.setattr(operations, "_RANGES_FROM", 1)
    ledger_events.record_events(conn, [
        event("m1", "hard@example.com", Feedback.BOUNCED, subtype="Permanent", diagnostic="5.1.1 user unknown")])
    suppressions.add(conn, "spam@xn--bcher-kva.de", actor="alice")
    emails = ["ok@example.com", "HARD@example.com", "hard@EXAMPLE.com", "spam@bücher.de", "fine@bücher.de"]
    for n, email in enumerate(emails):
        conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)", (email, f"l{n}"))
    claim = ledger.claim(conn, Q, 10, lease_ms=60_000)
    assert sorted(r[1] for r in claim.rows) == ["HARD@example.com", "fine@bücher.de", "ok@example.com"]
    assert (claim.picked, claim.skipped) == (5, 2)
    rows = dict(conn.execute(
        "SELECT a.email, d.status::text || ' ' || COALESCE(d.last_error, '') FROM deliveries AS d"
        " JOIN tokens AS t ON t.id = d.token JOIN accounts AS a ON a.id = t.account").fetchall())
    assert rows["hard@EXAMPLE.com"] == "skipped suppressed: bounced (5.1.1 user unknown)"
    assert rows["spam@bücher.de"] == "skipped suppressed: operator"
    assert rows["ok@example.com"] == "claimed "
    assert conn.execute("SELECT count(*) FROM delivery_queue WHERE claimed_at IS NULL").fetchone() == (0,)
    # Unsuppressed, the next token of the address is sent again.
    suppressions.remove(conn, "hard@example.com", actor="alice")
    conn.execute("INSERT INTO tokens (action, account) SELECT 'activation', id FROM accounts"
                 " WHERE email = 'hard@EXAMPLE.com'")
    again = ledger.claim(conn, Q, 10, lease_ms=60_000)
    assert [r[1] for r in again.rows] == ["hard@EXAMPLE.com"]


def test_an_event_with_text_postgresql_refuses_is_recorded_with_the_rest() -> None:
    """JSON's \\u0000 and a lone \\ud800 decode into text PostgreSQL refuses; one such event
    held back its whole batch (every receive failed, the good events went to the DLQ), or
    crashed the worker (an encoding error is not a psycopg.Error).  Parsing makes it storable."""
    import json as json_

    from ses_events import bounce, sns

    from mailroom.events.parse import parse_message

    message = bounce("0100-nul", "jane@example.com")
    message["bounce"]["bouncedRecipients"][0]["diagnosticCode"] = "smtp; 550\u0000 user\ud800 unknown"
    body = json_.dumps(message)                         # ASCII: the escapes, as SES could send them
    assert "\\u0000" in body and "\\ud800" in body
    for text in (body, sns(message)):
        [parsed] = parse_message(text)
        assert parsed.diagnostic is not None and "\x00" not in parsed.diagnostic
        parsed.diagnostic.encode("utf-8")               # no lone surrogate left either


def test_a_cleaned_event_goes_into_the_ledger(conn: psycopg.Connection) -> None:
    import json as json_

    from ses_events import bounce

    from mailroom.events.parse import parse_message

    token, mid = sent_to(conn, "nul@example.com")
    message = bounce(mid, "nul@example.com")
    message["bounce"]["bouncedRecipients"][0]["diagnosticCode"] = "smtp; 550\u0000 user\ud800 unknown"
    got = ledger_events.record_events(conn, parse_message(json_.dumps(message)))
    assert got.by_type == {"bounced": 1}
    assert feedback(conn, token) == "bounced"


def test_an_event_for_an_internationalised_domain_matches_its_delivery(conn: psycopg.Connection) -> None:
    """The sender gives SES the ASCII (IDNA) form of jane@bücher.de and SES reports that
    form: the event stayed unmatched, the delivery's feedback empty, and its bounce out of
    the 24-hour rates the automatic pause reads."""
    token, mid = sent_to(conn, "jane@bücher.de")
    got = ledger_events.record_events(conn, [event(mid, "jane@xn--bcher-kva.de", Feedback.BOUNCED, raw="{}")])
    assert (got.by_type, got.unmatched) == ({"bounced": 1}, 0)
    assert feedback(conn, token) == "bounced"
