"""The monitor tells the truth at any size (issue 19 item 8), through the pilot.

Ages count from the claim, sparklines show no data as nothing and are scaled
from zero, the supervisor has its row, a disconnected header claims no run
state, the events screen filters by type (ticks hidden until asked for), D and
L ask for their value then confirm it, 80x24 keeps every key, and a terminal
below the minimum gets one line saying what is needed.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from monitor_fakes import FakeControlServer, batch, cell, scenario, until

from mailroom.ledger import report
from mailroom.ledger.events import Health
from mailroom.monitor.app import MIN_COLUMNS, MonitorApp
from mailroom.monitor.dialogs import Confirm, Prompt
from mailroom.supervisor.guard import AccountGuard

pytestmark = pytest.mark.timeout(60)

BLOCKS = set("▁▂▃▄▅▆▇█")


def _plain(app: MonitorApp, selector: str) -> str:
    return str(app.query_one(selector).render())


def test_ages_count_from_the_claim_not_from_when_the_monitor_heard() -> None:
    now = time.time()
    snapshot_batches = [batch(1, claimed=now - 600, state="sending"), batch(2, claimed=now - 125, state="done")]

    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("batch.claimed", batch(3, claimed=time.time() - 20))
        await until(pilot, lambda: len(app.query_one("#batches").keys()) == 3, "3 rows")
        await pilot.pause(0.3)
        assert cell(app, "b-1", "age") == "10m"
        assert cell(app, "b-2", "age") == "2m"
        assert cell(app, "b-3", "age").endswith("s")

    scenario(test, snapshot={"batches": snapshot_batches})


def test_sparklines_are_empty_without_data_and_scaled_from_zero() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await pilot.pause(0.3)
        assert not BLOCKS & set(_plain(app, "#spark-sent")), "no tick yet: nothing drawn"
        await server.event("tick", {"sent_per_s": 31.0, "failed_per_s": 0.0})
        await server.event("tick", {"sent_per_s": 19.0, "failed_per_s": 0.0})
        await until(pilot, lambda: len(app.state.sent_history) == 2, "two ticks")
        await pilot.pause(0.3)
        top, bottom = _plain(app, "#spark-sent").split("\n")
        # Two samples, newest on the right, the rest of the width blank (no data there).
        assert set(top[:-2]) <= {" "} and set(bottom[:-2]) <= {" "}
        # 31 fills both lines; 19 of 31 is ~60 %: the bottom line full, a little of the top.
        assert top[-2] == "█" and bottom[-2:] == "██"
        assert top[-1] in "▁▂▃", top[-1]
        assert "31" in _plain(app, "#spark-sent-label")  # the scale is said
        # failed/s was 0 throughout: a flat line at zero, not a full-height bar.
        assert "█" not in _plain(app, "#spark-failed")
    scenario(test)


def test_the_processes_screen_has_the_supervisor_row() -> None:
    snapshot = {"pid": 4100, "started": time.time() - 7200, "rss": 20 * 1048576,
                "workers": {"collector": {"worker": "collector", "pid": 4101, "state": "running"},
                            "sender": {"worker": "sender", "pid": 4102, "state": "running"}}}

    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await pilot.press("4")
        table = app.query_one("#workers")
        await until(pilot, lambda: table.row_count == 3, "three processes")
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(3)]
        supervisor = next(r for r in rows if r[0] == "supervisor")
        assert supervisor[1] == "4100" and supervisor[2] == "running"
        assert supervisor[3] == "2h" and supervisor[6] == "20 MiB"
    scenario(test, snapshot=snapshot)


def test_a_disconnected_header_does_not_say_running() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await until(pilot, lambda: "running" in _plain(app, "#header"), "running while connected")
        await server.stop()
        await until(pilot, lambda: not app.feed.connected, "disconnected")
        await until(pilot, lambda: "disconnected" in _plain(app, "#header"), "header says so")
        assert "running" not in _plain(app, "#header")
    scenario(test)


def test_the_events_screen_hides_ticks_and_filters_by_type() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("tick", {"sent_per_s": 1.0})
        await server.event("batch.claimed", batch(1))
        await server.event("tick", {"sent_per_s": 2.0})
        await server.event("batch.done", batch(1, sent=10))
        await until(pilot, lambda: app.state.event_count == 4, "4 events")
        await pilot.press("5")
        log = app.query_one("#event-log")
        await until(pilot, lambda: len(log.lines) == 2, "two lines: the ticks hidden")
        assert not any(" tick " in line for line in log.lines)
        await pilot.press("slash")
        assert app.focused is app.query_one("#events-filter")
        await pilot.press(*"done")
        await until(pilot, lambda: len(log.lines) == 1, "only batch.done")
        assert "batch.done" in log.lines[0]
        await pilot.press(*["backspace"] * 4, *"tick")
        await until(pilot, lambda: len(log.lines) == 2 and all("tick" in line for line in log.lines),
                    "the ticks when asked for")
        await server.event("tick", {"sent_per_s": 3.0})
        await until(pilot, lambda: len(log.lines) == 3, "a new tick, shown while filtered for")
    scenario(test)


@pytest.mark.parametrize(("key", "typed", "command", "arg"), [
    ("L", "5", "set_rate", {"per_second": 5.0}),
    ("D", "90", "drain", {"timeout_s": 90.0}),
])
def test_drain_and_rate_ask_for_their_value_then_confirm_it(key: str, typed: str, command: str,
                                                             arg: dict[str, Any]) -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("tick", {"rate_limit": 14, "in_flight": 2})
        await until(pilot, lambda: app.state.tick.rate_limit == 14, "tick")
        await pilot.press(key)
        await until(pilot, lambda: isinstance(app.screen, Prompt), "the prompt")
        await pilot.press(*["backspace"] * 4, *typed, "enter")
        await until(pilot, lambda: isinstance(app.screen, Confirm), "the confirmation")
        assert typed in app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: server.commands[-1][0] == command, f"{command} sent")
        assert server.commands[-1] == (command, arg)
    scenario(test, operate=True)


def test_at_80x24_the_header_and_footer_shorten_and_keep_every_key() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("tick", {"sent_per_s": 12.5, "rate_limit": 14,
                                    "ses": {"max_24h_send": 50000, "sent_last_24h": 31200}})
        await until(pilot, lambda: app.state.tick.rate_limit == 14, "tick")
        await pilot.pause(0.5)
        header = _plain(app, "#header")
        assert len(header.rstrip()) <= 80, header
        for part in ("OPERATOR", "running", "12.5", "14", "62%"):
            assert part in header, (part, header)
        shown = {b.key for _, b, _, _ in app.screen.active_bindings.values() if b.show}
        keys = {k.key: k for k in app.query("FooterKey")}
        assert shown <= set(keys), shown - set(keys)
        for key, widget in keys.items():
            region = widget.region
            assert region.width > 0 and region.right <= 80, (key, region)
    scenario(test, operate=True, size=(80, 24))


def test_below_the_minimum_one_line_says_how_many_columns_are_needed() -> None:
    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await pilot.pause(0.3)
        notice = app.query_one("#too-small")
        assert notice.display and notice.region.height == 1
        text = _plain(app, "#too-small")
        assert f"{MIN_COLUMNS} columns" in text and "60" in text and "\n" not in text.strip()
        assert not app.query_one("#header").region.height
        await pilot.resize_terminal(200, 60)  # made larger again: the screens are back
        await until(pilot, lambda: app.query_one("#header").region.height == 1, "the header back")
        assert not app.query_one("#too-small").region.height
    scenario(test, size=(60, 24))


def test_the_events_screen_shows_why_the_supervisor_paused_the_account() -> None:
    """``account.paused`` as the supervisor publishes it (the guard's reason beside the
    whole 24-hour deliverability): the reason shows on the line, not cut off after
    the numbers."""
    deliverability = report.deliverability(Health(sent=1000, bounced=50, complained=0, last_bad_event=7,
                                                  suppressions=50))
    reason = AccountGuard(0.04, None, 100).judge(deliverability)
    assert reason is not None

    async def test(app: MonitorApp, pilot: Any, server: FakeControlServer) -> None:
        await server.event("batch.done", batch(1, sent=10))
        await server.event("account.paused", {"reason": reason, "deliverability": deliverability})
        await pilot.press("5")
        log = app.query_one("#event-log")
        await until(pilot, lambda: len(log.lines) == 2, "two lines")
        line = str(log.lines[1])
        assert "account.paused" in line
        assert ("bounce rate 5.00 % (50 of 1000 sent in 24 h) reached MAILROOM_PAUSE_BOUNCE_RATE 4 %"
                in line), line
        await pilot.press("slash", *"paused")
        await until(pilot, lambda: len(log.lines) == 1, "only account.paused")
    scenario(test)
