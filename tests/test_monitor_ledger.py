"""The monitor's ledger side against a real PostgreSQL: fleet functions, the
address search, failure groups with retry, a database that goes away."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
from typing import Any

import psycopg
import pytest
from monitor_fakes import FakeControlServer, add_accounts, batch, fail_deliveries, scenario, until

from mailroom.ledger import events as ledger_events
from mailroom.ledger import fleet, suppressions
from mailroom.monitor.app import MonitorApp
from mailroom.monitor.dialogs import BatchDetail, Confirm, Prompt
from mailroom.vocabulary import DeliveryEvent, Feedback

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------ fleet


def test_fleet_register_heartbeat_stale_unregister(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        a = fleet.register(conn, "mailroom", "vm-a", 100)
        b = fleet.register(conn, "mailroom", "vm-b", 200)
        assert fleet.heartbeat(conn, a, batches=3, rows=27)
        rows = {r["host"]: r for r in fleet.consumers(conn, "mailroom")}
        assert set(rows) == {"vm-a", "vm-b"}
        assert (rows["vm-a"]["pid"], rows["vm-a"]["batches"], rows["vm-a"]["rows"]) == (100, 3, 27)
        assert not rows["vm-a"]["stale"] and rows["vm-a"]["seen_s_ago"] < 5

        # b stops refreshing: stale after the timeout (backdated rather than waited for).
        conn.execute("UPDATE consumers SET last_seen_at = now() - interval '1 minute' WHERE id = %s",
                     (b,))
        rows = fleet.consumers(conn, "mailroom", stale_after_s=30)
        assert [(r["host"], r["stale"]) for r in rows] == [("vm-a", False), ("vm-b", True)]

        # A restarted process with b's host and pid replaces the dead one's row.
        b2 = fleet.register(conn, "mailroom", "vm-b", 200)
        assert b2 != b and not fleet.heartbeat(conn, b, 0, 0)
        assert len(fleet.consumers(conn, "mailroom")) == 2

        fleet.unregister(conn, a)
        fleet.unregister(conn, b2)
        assert fleet.consumers(conn, "mailroom") == []


# ------------------------------------------------------------------ screens


def ledger_scenario(url: str, test: Any, operate: bool = False) -> None:

    async def main() -> None:
        app = MonitorApp(None, url, operate=operate)
        async with app.run_test(size=(140, 40)) as pilot:
            await test(app, pilot)
    asyncio.run(main())


def test_slash_shows_every_delivery_of_an_address(db: str) -> None:
    add_accounts(db, ["jane@example.com", "bob@example.com"])
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("INSERT INTO tokens (action, account) SELECT 'password_recovery', id"
                     " FROM accounts WHERE email = 'jane@example.com'")
        conn.execute("UPDATE deliveries SET status = 'sent', message_id = 'ses-0001', sent_at = now()"
                     " WHERE token = (SELECT min(t.id) FROM tokens t JOIN accounts a"
                     " ON a.id = t.account WHERE a.email = 'jane@example.com')")

    async def test(app: MonitorApp, pilot: Any) -> None:
        assert app.current == "ledger"  # no supervisor: opens on the ledger
        counts = app.query_one("#counts")
        await until(pilot, lambda: counts.row_count == 6, "counts")
        await pilot.press("slash")
        await pilot.press(*"jane@example.com", "enter")
        table = app.query_one("#deliveries")
        await until(pilot, lambda: table.row_count == 2, "jane's deliveries")
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(2)]
        assert {r[1] for r in rows} == {"activation", "password_recovery"}
        assert any(r[2] == "sent" and r[8] == "ses-0001" for r in rows)
        assert "2 deliveries, 1 sent" in str(app.query_one("#search-info").render())
    ledger_scenario(db, test)


def test_slash_finds_an_address_as_typed(db: str) -> None:
    add_accounts(db, ["jane@example.com", "bob@example.com"])

    async def test(app: MonitorApp, pilot: Any) -> None:
        await until(pilot, lambda: app.query_one("#counts").row_count == 6, "counts")
        await pilot.press("slash")
        await pilot.press(*"JANE@Example.COM", "enter")
        table = app.query_one("#deliveries")
        await until(pilot, lambda: table.row_count == 1, "jane's delivery, typed in capitals")
    ledger_scenario(db, test)


def test_failure_group_retry_with_dry_run_count(db: str) -> None:
    add_accounts(db, ["a@x.test", "b@x.test", "c@x.test"])
    fail_deliveries(db, "a@x.test", "MessageRejected: Email address is not verified")
    fail_deliveries(db, "b@x.test", "MessageRejected: Email address is not verified")
    fail_deliveries(db, "c@x.test", "Throttling")

    async def test(app: MonitorApp, pilot: Any) -> None:
        await pilot.press("3")
        table = app.query_one("#failure-groups")
        await until(pilot, lambda: table.row_count == 2, "two groups")
        assert str(table.get_row_at(0)[1]) == "2"
        await pilot.press("R")
        await until(pilot, lambda: isinstance(app.screen, Confirm), "confirmation")
        assert "Dry run: 2 failed rows requeued" in app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: table.row_count == 1, "group gone after the retry")
        with psycopg.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM deliveries WHERE status = 'failed'"
                                ).fetchone()[0] == 1
    ledger_scenario(db, test, operate=True)


def test_processes_screen_lists_the_fleet(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        fleet.register(conn, "mailroom", "vm-a", 4242)
        stale = fleet.register(conn, "mailroom", "vm-b", 77)
        conn.execute("UPDATE consumers SET last_seen_at = now() - interval '5 minutes' WHERE id = %s",
                     (stale,))

    async def test(app: MonitorApp, pilot: Any) -> None:
        await pilot.press("4")
        table = app.query_one("#fleet")
        await until(pilot, lambda: table.row_count == 2, "fleet rows")
        cells = [[str(c) for c in table.get_row_at(i)] for i in range(2)]
        assert cells[0][:2] == ["vm-a", "4242"] and cells[0][-1] == "live"
        assert cells[1][:2] == ["vm-b", "77"] and cells[1][-1] == "stale"
    ledger_scenario(db, test)


def test_a_database_that_goes_away_is_a_message_not_a_crash(db: str) -> None:
    from pgutil import drop_database

    async def test(app: MonitorApp, pilot: Any) -> None:
        counts = app.query_one("#counts")
        await until(pilot, lambda: counts.row_count == 6, "counts")
        drop_database(db)  # terminates the monitor's session too
        app.query_one("#ledger").load()
        info = app.query_one("#ledger-info")
        await until(pilot, lambda: "ledger unavailable" in str(info.render()), "error shown")
        await pilot.press("slash", *"x@y.z", "enter", "3", "4")
        await until(pilot, lambda: "unavailable" in str(app.query_one("#fleet-info").render()),
                    "fleet error shown")
        assert app.is_running
    ledger_scenario(db, test)


def test_no_database_and_no_socket_still_runs() -> None:
    async def main() -> None:
        app = MonitorApp(None, None)
        async with app.run_test() as pilot:
            await pilot.press("2", "3", "4", "5", "1", "R")
            assert "MAILROOM_DATABASE_URL" in str(app.query_one("#fleet-info").render())
            assert app.is_running
    asyncio.run(main())


def test_a_slow_ledger_query_does_not_freeze_the_screen(db: str) -> None:
    """Ledger queries run in thread workers: the UI answers keys while one is stuck."""
    import threading

    release = threading.Event()

    async def test(app: MonitorApp, pilot: Any) -> None:
        def stuck() -> dict[str, Any]:
            release.wait(30)
            return {}
        app.ledger.counts = stuck  # type: ignore[method-assign]
        app.query_one("#ledger").load()
        await pilot.press("3", "4", "5", "1", "2")
        assert app.current == "ledger"
        release.set()
    try:
        ledger_scenario(db, test)
    finally:
        release.set()


def test_screen_6_shows_rates_latest_bounces_and_the_suppression_list(db: str) -> None:
    import datetime as dt

    from mailroom import ledger
    from mailroom.ledger import events as ledger_events
    from mailroom.vocabulary import DeliveryEvent, Feedback, Outcome, OutcomeKind

    emails = [f"u{i}@example.com" for i in range(10)]
    with psycopg.connect(db, autocommit=True) as conn:
        for e in emails:
            conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)", (e, e))
        claim = ledger.claim(conn, "mailroom", 20, lease_ms=60_000)
        mids = {row[1]: f"msg-{row[5]}" for row in claim.rows}
        ledger.record_outcomes(conn, "mailroom", [(row[5], Outcome(OutcomeKind.SENT, message_id=mids[row[1]]))
                                                  for row in claim.rows], claimed_at=claim.claimed_at)
        now = dt.datetime.now(dt.UTC)
        ledger_events.record_events(conn, [
            DeliveryEvent(mids["u0@example.com"], "u0@example.com", Feedback.BOUNCED, now, "Permanent",
                          "5.1.1 user unknown"),
            DeliveryEvent(mids["u1@example.com"], "u1@example.com", Feedback.DELIVERED, now),
            DeliveryEvent(mids["u2@example.com"], "u2@example.com", Feedback.DELIVERED, now)])

    async def test(app: MonitorApp, pilot: Any) -> None:
        await pilot.press("6")
        assert app.current == "deliverability"
        table = app.query_one("#suppressions")
        await until(pilot, lambda: table.row_count == 1, "the suppression list")
        assert [str(c) for c in table.get_row_at(0)][:3] == ["u0@example.com", "bounced", "5.1.1 user unknown"]
        latest = app.query_one("#latest-bad")
        assert latest.row_count == 1
        assert [str(c) for c in latest.get_row_at(0)][1:] == ["bounced", "u0@example.com", "Permanent",
                                                              "5.1.1 user unknown"]
        bounce = app.query_one("#bounce-rate").render()
        assert "10.00 %" in str(bounce)
        assert "(1 of 10 sent in 24 h; SES reviews at 5 %, may pause at 10 %)" in str(bounce)
        red = [span for span in bounce.spans if "red" in str(span.style)]  # at SES's pause threshold
        assert red, bounce.spans
        complaint = app.query_one("#complaint-rate").render()
        assert "0.00 %" in str(complaint) and any("green" in str(s.style) for s in complaint.spans)
        assert "2 delivered" in str(app.query_one("#feedback-counts").render())
        assert "1 bounced" in str(app.query_one("#feedback-counts").render())
    ledger_scenario(db, test)


# ------------------------------------------------------------------ batch detail


def test_batch_detail_shows_what_ses_said_of_each_address(db: str) -> None:
    """Jane delivered, bob bounced with his diagnostic, ann sent and not heard of yet,
    a row known only by MessageId complained: read from the ledger, not the supervisor."""
    add_accounts(db, ["jane@example.com", "bob@example.com", "ann@example.com"])
    tokens: dict[str, int] = {}
    with psycopg.connect(db, autocommit=True) as conn:
        for n, email in enumerate(("jane@example.com", "bob@example.com", "ann@example.com")):
            row = conn.execute("SELECT t.id FROM tokens t JOIN accounts a ON a.id = t.account"
                               " WHERE a.email = %s", (email,)).fetchone()
            assert row is not None
            tokens[email] = int(row[0])
            conn.execute("UPDATE deliveries SET status = 'sent', message_id = %s, sent_at = now()"
                         " WHERE token = %s", (f"ses-{n}", row[0]))
        now = dt.datetime.now(dt.UTC)
        ledger_events.record_events(conn, [
            DeliveryEvent("ses-0", "jane@example.com", Feedback.DELIVERED, now),
            DeliveryEvent("ses-1", "bob@example.com", Feedback.BOUNCED, now, "Permanent",
                          "5.1.1 user unknown"),
            DeliveryEvent("ses-9", "old@example.com", Feedback.COMPLAINED, now, "abuse")])

    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        server.batches["b-1"] = [
            {"address": email, "action": "activation", "status": "sent", "token": token,
             "message_id": f"ses-{n}", "error": None}
            for n, (email, token) in enumerate(tokens.items())
        ] + [{"address": "old@example.com", "action": "activation", "status": "sent",
              "message_id": "ses-9", "error": None},
             {"address": "nobody@invalid", "action": "activation", "status": "failed",
              "message_id": None, "error": "MessageRejected"}]
        await server.event("batch.done", batch(1, sent=4, failed=1))
        await until(pilot, lambda: app.query_one("#batches").row_count == 1, "row")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, BatchDetail), "detail open")
        table = app.screen.query_one("#destinations")
        await until(pilot, lambda: table.row_count == 5, "destinations")
        said = {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[5]) for i in range(5)}
        assert said == {"jane@example.com": "delivered", "bob@example.com": "bounced: 5.1.1 user unknown",
                        "ann@example.com": "awaiting", "old@example.com": "complained: abuse",
                        "nobody@invalid": "-"}
    scenario(test, database_url=db)


def test_batch_detail_without_a_ledger_says_so() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        server.batches["b-1"] = [{"address": "jane@example.com", "action": "activation", "status": "sent",
                                  "token": 7, "message_id": "ses-0", "error": None}]
        await server.event("batch.done", batch(1, sent=1))
        await until(pilot, lambda: app.query_one("#batches").row_count == 1, "row")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, BatchDetail), "detail open")
        table = app.screen.query_one("#destinations")
        await until(pilot, lambda: table.row_count == 1, "destination")
        assert str(table.get_row_at(0)[5]) == "no ledger (MAILROOM_DATABASE_URL)"
    scenario(test)


# ------------------------------------------------------------------ suppression list (screen 6)


def test_deliverability_searches_the_suppression_list_and_u_unsuppresses(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        assert suppressions.add(conn, "jane@example.com", actor="seed")
        assert suppressions.add(conn, "bob@example.com", actor="seed")

    async def test(app: MonitorApp, pilot: Any) -> None:
        await pilot.press("6")
        table = app.query_one("#suppressions")
        await until(pilot, lambda: table.row_count == 2, "both suppressed addresses")
        await pilot.press("slash", *"bob", "enter")
        await until(pilot, lambda: table.row_count == 1, "the search's one address")
        assert str(table.get_row_at(0)[0]) == "bob@example.com"
        await pilot.press("U")
        await until(pilot, lambda: isinstance(app.screen, Prompt), "the address prompt")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, Confirm), "the confirmation")
        assert "bob@example.com" in str(app.screen.query_one("#question").render())
        await pilot.press("y")
        await until(pilot, lambda: table.row_count == 0, "bob gone from the list")
    ledger_scenario(db, test, operate=True)
    with psycopg.connect(db, autocommit=True) as conn:
        assert [e["address"] for e in suppressions.entries(conn)] == ["jane@example.com"]
        audit = conn.execute("SELECT action, address, actor FROM suppression_audit"
                             " WHERE action = 'remove'").fetchall()
        assert audit == [("remove", "bob@example.com", getpass.getuser())]


def test_u_is_refused_without_operate(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        assert suppressions.add(conn, "jane@example.com", actor="seed")

    async def test(app: MonitorApp, pilot: Any) -> None:
        await pilot.press("6")
        table = app.query_one("#suppressions")
        await until(pilot, lambda: table.row_count == 1, "the suppressed address")
        await pilot.press("U")
        await until(pilot, lambda: any("unsuppress refused: read-only" in str(n.message)
                                       for n in app._notifications), "the refusal")
        assert not isinstance(app.screen, Prompt)
    ledger_scenario(db, test)
    with psycopg.connect(db, autocommit=True) as conn:
        assert [e["address"] for e in suppressions.entries(conn)] == ["jane@example.com"]
