"""The monitor against a scripted fake supervisor over a real Unix socket.

Each test runs the app headless with ``App.run_test()`` and drives it with the
pilot.  No fixed sleeps: :func:`until` polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from monitor_fakes import FakeControlServer, batch, cell, scenario, until

from mailroom.monitor.app import MonitorApp
from mailroom.monitor.dialogs import BatchDetail, Confirm
from mailroom.monitor.model import MAX_BATCHES
from mailroom.monitor.panes.failures import FailuresPane
from mailroom.monitor.panes.ledger import LedgerCountsPane
from mailroom.monitor.panes.processes import ProcessesPane

pytestmark = pytest.mark.timeout(60)


def row_keys(app: MonitorApp) -> list[str]:
    return app.query_one("#batches").keys()


# ------------------------------------------------------------------ live


def test_batches_are_keyed_and_updated_in_place_cursor_stays() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        for n in range(1, 6):
            await server.event("batch.claimed", batch(n))
        await until(pilot, lambda: len(row_keys(app)) == 5, "5 rows")
        assert row_keys(app) == [f"b-{n}" for n in range(1, 6)]
        await pilot.press("k", "k", "k")  # from the tail (b-5) up to b-2
        assert app.query_one("#live").selected_batch() == "b-2"

        await server.event("batch.dispatched", batch(2))
        await server.event("batch.done", batch(2, sent=9, failed=1, retry=0, skipped=0, ms=41.5,
                                               error="MessageRejected: bad address"))
        for n in range(6, 9):
            await server.event("batch.claimed", batch(n))
        await until(pilot, lambda: len(row_keys(app)) == 8, "8 rows")
        await until(pilot, lambda: cell(app, "b-2", "state") == "partial", "b-2 partial")
        assert cell(app, "b-2", "sent") == "9" and "MessageRejected" in cell(app, "b-2", "error")
        assert app.query_one("#live").selected_batch() == "b-2"
        assert row_keys(app).count("b-2") == 1
    scenario(test)


def test_live_table_keeps_the_latest_500_and_the_cursor_follows_its_batch() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        for n in range(1, 11):
            await server.event("batch.claimed", batch(n))
        await until(pilot, lambda: len(row_keys(app)) == 10, "10 rows")
        await pilot.press("k")  # b-9
        for n in range(11, MAX_BATCHES + 6):
            await server.event("batch.claimed", batch(n))
        await until(pilot, lambda: row_keys(app)[-1] == f"b-{MAX_BATCHES + 5}", "all rows")
        keys = row_keys(app)
        assert len(keys) == MAX_BATCHES and keys[0] == "b-6"
        # b-1..b-5 were evicted above it; the cursor is still on b-9.
        assert app.query_one("#live").selected_batch() == "b-9"
    scenario(test)


def test_tick_fills_big_numbers_header_and_ses_paused_banner() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        tick = {"sent_per_s": 12.5, "failed_per_s": 0.5, "in_flight": 3, "queue_depth": 1234,
                "oldest_queued_s": 4, "rate_limit": 14,
                "ses": {"max_send_rate": 14, "max_24h_send": 50000, "sent_last_24h": 40000,
                        "paused": False}}
        await server.event("tick", tick)
        await until(pilot, lambda: app.state.tick.queue_depth == 1234, "tick applied")
        await pilot.pause(0.3)
        assert "1,234" in str(app.query_one("#big-queued").render())
        header = str(app.query_one("#header").render())
        assert "OPERATOR" in header and "12.5/s of 14.0/s" in header and "80%" in header
        assert not app.query_one("#banner").display

        await server.event("tick", {**tick, "ses": {**tick["ses"], "paused": True}})
        await until(pilot, lambda: app.query_one("#banner").display, "SES banner")
        assert "SES PAUSED" in str(app.query_one("#banner").render())
    scenario(test)


def test_a_held_template_shows_in_the_banner_until_it_renders() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        ok = {"template": "activationv1", "action": "activation", "ok": True, "reason": None}
        held = {"template": "passwordrecoveryv1", "action": "password_recovery", "ok": False,
                "reason": "template passwordrecoveryv1 does not exist in SES"}
        await server.event("templates.changed", {"templates": [ok, held]})
        banner = app.query_one("#banner")
        await until(pilot, lambda: banner.display, "template banner")
        text = str(banner.render())
        assert "TEMPLATE HELD" in text and "passwordrecoveryv1: template passwordrecoveryv1 does not exist" in text
        await server.event("templates.changed", {"templates": [ok, {**held, "ok": True, "reason": None}]})
        await until(pilot, lambda: not banner.display, "banner gone")
    scenario(test)


def test_enter_opens_the_batch_detail_and_esc_closes_it() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        server.batches["b-1"] = [
            {"address": "jane@example.com", "action": "activation", "status": "sent",
             "message_id": "0100-abc", "attempts": 1, "error": None},
            {"address": "bob@invalid", "action": "password_recovery", "status": "failed",
             "message_id": None, "attempts": 5, "error": "MessageRejected"},
        ]
        await server.event("batch.done", batch(1, sent=1, failed=1))
        await until(pilot, lambda: row_keys(app) == ["b-1"], "row")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, BatchDetail), "detail open")
        table = app.screen.query_one("#destinations")
        await until(pilot, lambda: table.row_count == 2, "destinations")
        assert [str(c) for c in table.get_row_at(0)][:5] == [
            "jane@example.com", "activation", "sent", "0100-abc", "1"]
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, BatchDetail), "detail closed")
    scenario(test)


def test_unknown_batch_detail_says_not_found() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("batch.claimed", batch(1))
        await until(pilot, lambda: row_keys(app) == ["b-1"], "row")
        await pilot.press("enter")
        await until(pilot, lambda: "not_found" in str(app.screen.query_one("#detail-info").render()),
                    "not found shown")
    scenario(test)


# ------------------------------------------------------------------ bad input


def test_malformed_and_unexpected_events_never_crash_the_monitor() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("no.such.event", {"x": 1})
        await server.event(None, {})
        await server.event(42, [1, 2])
        await server.event("batch.claimed", "not an object")
        await server.event("batch.claimed", {"batch": {"nested": 1}, "rows": "many"})
        await server.event("batch.done", {"batch": "b-x", "rows": "12", "sent": [], "failed": None,
                                          "ms": "NaN", "error": {"a": 1}, "state": 7})
        await server.event("tick", {"sent_per_s": "fast", "queue_depth": -1.5e300, "ses": "none",
                                    "in_flight": True})
        await server.event("worker.started", {"worker": ["collector"], "pid": "12"})
        await server.event("state.changed", {"state": None, "paused": "yes"})
        await server.raw(b'{"v":1,"event":"tick","seq":"x","data":{"sent_per_s":"\\u0000\\u001b[31m"}}\n')
        await server.event("batch.claimed", batch(1))
        await until(pilot, lambda: "b-1" in row_keys(app), "the good batch after the bad ones")
        assert "b-x" in row_keys(app) and cell(app, "b-x", "rows") == "12"
        assert app.is_running and app.feed.connected
        await pilot.press("5")
        await until(pilot, lambda: "no.such.event" in "\n".join(app.query_one("#event-log").lines),
                    "events screen lists the unknown event")
    scenario(test)


@pytest.mark.parametrize("line", [b"this is not json\n", b'["an", "array"]\n', b"\xff\xfe\n"])
def test_a_line_that_is_not_a_json_object_reconnects_and_resumes(line: bytes) -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.raw(line)
        await until(pilot, lambda: app.feed.connections >= 2 or not app.feed.connected,
                    "dropped the broken connection")
        await until(pilot, lambda: app.feed.connected and app.feed.connections >= 2, "reconnected")
        await server.event("batch.claimed", batch(1))
        await until(pilot, lambda: row_keys(app) == ["b-1"], "events flow again")
    scenario(test)


def test_socket_closing_mid_line_shows_banner_and_a_restarted_supervisor_is_picked_up() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("batch.claimed", batch(1))
        await until(pilot, lambda: row_keys(app) == ["b-1"], "first batch")
        await server.raw(b'{"v":1,"event":"batch.claimed","seq":2,"data":{"batch":"b-')
        await server.stop()
        os.unlink(server.path)
        banner = app.query_one("#banner")
        await until(pilot, lambda: banner.display and "DISCONNECTED" in str(banner.render()),
                    "disconnected banner")
        assert "NOT CONNECTED" in str(app.query_one("#header").render())
        await pilot.pause(0.6)  # a few failed reconnects while nothing listens
        assert app.is_running and app.feed.attempts >= 1
        await server.start()  # the supervisor is back
        await until(pilot, lambda: app.feed.connected and not banner.display, "reconnected", 15)
        await server.event("batch.claimed", batch(2))
        await until(pilot, lambda: "b-2" in row_keys(app), "events after the restart")
        assert row_keys(app) == ["b-1", "b-2"]
    scenario(test)


def test_seq_gap_asks_for_a_new_snapshot() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.raw(b'{"v":1,"event":"tick","seq":1,"data":{}}\n')
        await server.raw(b'{"v":1,"event":"tick","seq":5,"data":{}}\n')
        await until(pilot, lambda: ("status", {}) in server.commands, "status after the gap")
    scenario(test)


# ------------------------------------------------------------------ keys and gating


def test_screens_switch_with_1_to_5_and_help_opens() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        for key, pane in zip("23451", ("ledger", "failures", "processes", "events", "live"), strict=True):
            await pilot.press(key)
            assert app.current == pane and app.query_one("ContentSwitcher").current == pane
        await pilot.press("question_mark")
        await until(pilot, lambda: type(app.screen).__name__ == "HelpScreen", "help")
        await pilot.press("escape")
        await pilot.press("f")
        assert app.frozen and "FROZEN" in str(app.query_one("#header").render())
        await server.event("batch.claimed", batch(1))
        await until(pilot, lambda: "b-1" in app.state.batches, "state keeps up while frozen")
        await pilot.pause(0.3)
        assert row_keys(app) == []
        await pilot.press("f")
        await until(pilot, lambda: row_keys(app) == ["b-1"], "unfrozen")
    scenario(test)


def _notices(app: MonitorApp) -> str:
    return "\n".join(str(n.message) for n in app._notifications)


@pytest.mark.parametrize("operate,role", [(False, "operator"), (True, "viewer")])
def test_state_changing_keys_are_refused_read_only_or_as_viewer(operate: bool, role: str) -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        for key in "PDLRX":
            await pilot.press(key)
        await pilot.pause(0.1)
        assert not isinstance(app.screen, Confirm)
        text = _notices(app)
        for action in ("pause", "drain", "set_rate", "retry", "skip"):
            assert f"{action} refused" in text, text
        assert ("--operate" in text) if not operate else ("viewer" in text)
        assert [c for c, _ in server.commands] == ["hello", "subscribe"]
        footer = {b.binding.key: b.enabled for b in app.screen.active_bindings.values()}
        assert footer["P"] is False and footer["R"] is False
    scenario(test, operate=operate, role=role)


def test_operator_pause_asks_then_pauses() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("tick", {"queue_depth": 77, "in_flight": 2})
        await until(pilot, lambda: app.state.tick.queue_depth == 77, "tick")
        await pilot.press("P")
        await until(pilot, lambda: isinstance(app.screen, Confirm), "confirmation")
        assert "queued now: 77" in app.screen.question
        await pilot.press("n")
        await pilot.pause(0.1)
        assert not any(c == "pause" for c, _ in server.commands)
        await pilot.press("P", "y")
        await until(pilot, lambda: ("pause", {"what": "claims"}) in server.commands, "pause sent")
        await server.event("state.changed", {"state": "paused", "paused": {"claims": True}})
        await until(pilot, lambda: app.state.paused_claims, "paused state")
        await pilot.press("P")
        await until(pilot, lambda: isinstance(app.screen, Confirm), "confirmation")
        assert app.screen.question.startswith("Resume")
        await pilot.press("y")
        await until(pilot, lambda: ("resume", {"what": "claims"}) in server.commands, "resume sent")
        await pilot.press("L")
        await until(pilot, lambda: type(app.screen).__name__ == "Prompt", "rate prompt")
        app.screen.query_one("Input").value = "5"
        await pilot.press("enter", "y")
        await until(pilot, lambda: ("set_rate", {"per_second": 5.0}) in server.commands, "set_rate")
    scenario(test, operate=True)


def test_a_refusal_from_the_supervisor_is_a_notice() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        server.role = "viewer"  # the server changed its mind after hello
        await pilot.press("P", "y")
        await until(pilot, lambda: "forbidden" in _notices(app), "refusal shown")
        assert app.is_running
    scenario(test, operate=True)


def test_a_flush_or_a_ledger_result_that_arrives_while_the_app_closes_is_harmless() -> None:
    # Under load the flush timer can fire once more while run_test (or a quit) tears the
    # screen down; that raised NoMatches out of the app (seen as a flaky test).
    async def main() -> None:
        app = MonitorApp(None, None)
        async with app.run_test():
            panes = {name: app.query_one(f"#{name}") for name in ("ledger", "failures", "processes")}
        app._render(force=True)
        app.reload_ledger()
        # The same for a ledger query's result that a thread worker hands back late
        # (through LedgerPane._shown, as LedgerPane.fetch does), and a late timer's load.
        ledger, failures, processes = panes["ledger"], panes["failures"], panes["processes"]
        assert isinstance(ledger, LedgerCountsPane)
        assert isinstance(failures, FailuresPane) and isinstance(processes, ProcessesPane)
        ledger._shown(ledger._show_counts, {})
        ledger._shown(lambda rows: ledger._show_deliveries("jane@example.com", rows), [])
        failures._shown(failures._show, [])
        processes._shown(processes._show, [])
        for pane in (ledger, failures, processes):
            pane.load()
    asyncio.run(main())


def test_a_frozen_live_table_scrolls_over_batches_the_state_has_evicted() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        for n in range(1, 41):
            await server.event("batch.claimed", batch(n))
        await until(pilot, lambda: len(row_keys(app)) == 40, "40 rows")
        await pilot.press("f")
        for n in range(41, MAX_BATCHES + 41):  # evicts b-1 .. b-40 from the state
            await server.event("batch.claimed", batch(n))
        await until(pilot, lambda: f"b-{MAX_BATCHES + 40}" in app.state.batches, "state moved on")
        assert "b-1" not in app.state.batches and row_keys(app)[0] == "b-1"
        await pilot.press("home", "pagedown", "end")  # draws rows gone from the state
        await pilot.pause(0.1)
        assert app.is_running and app.query_one("#live").selected_batch() == "b-40"
        await pilot.press("f")
        await until(pilot, lambda: row_keys(app)[0] == "b-41", "caught up")
    scenario(test)


def test_esc_closes_the_search_box_without_shadowing_textuals_back() -> None:
    # Esc was bound to an "action_back" of the app's own, which silently replaced
    # Textual's App.action_back (pop a screen); it is "close_search" now.
    assert "action_back" not in vars(MonitorApp)

    async def main() -> None:
        app = MonitorApp(None, None)
        async with app.run_test() as pilot:
            box = app.query_one("#search")
            await pilot.press("slash")
            assert app.current == "ledger" and box.has_class("shown") and box.has_focus
            await pilot.press("escape")
            assert not box.has_class("shown")
            assert app.focused is app.query_one("#deliveries")
    asyncio.run(main())


def test_the_account_guard_pause_shows_its_reason_in_the_banner_until_resumed() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        reason = "bounce rate 4.10 % (41 of 1000 sent in 24 h) reached MAILROOM_PAUSE_BOUNCE_RATE 4 %"
        await server.event("account.paused", {"reason": reason})
        await server.event("state.changed", {"state": "paused", "paused": {"claims": True, "sending": False},
                                             "paused_reason": reason})
        banner = app.query_one("#banner")
        await until(pilot, lambda: banner.display and "PROTECT" in str(banner.render()), "guard banner")
        text = str(banner.render())
        assert "CLAIMS PAUSED TO PROTECT THE SES ACCOUNT" in text and reason in text
        await server.event("state.changed", {"state": "running", "paused": {"claims": False, "sending": False},
                                             "paused_reason": None})
        await until(pilot, lambda: not banner.display, "banner gone")
    scenario(test)
