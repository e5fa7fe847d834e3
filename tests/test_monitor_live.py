"""The monitor against a real supervisor: the installed ``mailroom-supervisor``, a real
PostgreSQL ledger and the scripted SES stub over HTTP, driven with the pilot."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from collector_util import insert_accounts, wait_for
from ses_emulator import per_destination, success
from supervisor_util import SupervisorProcess, ledger, supervisor_env

from mailroom.monitor.app import MonitorApp
from mailroom.monitor.dialogs import BatchDetail, Confirm


async def until(pilot: Any, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await pilot.pause(0.05)


@pytest.fixture
def live(db: str, base_env: dict[str, str], stub: Any) -> Any:
    """A running supervisor; yields ``run(test, operate=...)`` for a monitor on its socket."""
    where = tempfile.mkdtemp(prefix="mrlive")  # short: Unix socket paths are limited
    path = os.path.join(where, "control.sock")
    sup = SupervisorProcess(supervisor_env(base_env, db, stub.url, control_socket=path))

    def run(test: Callable[[MonitorApp, Any], Awaitable[None]], operate: bool = False) -> None:
        async def main() -> None:
            app = MonitorApp(path, db, operate=operate)
            async with app.run_test(size=(160, 45)) as pilot:
                await until(pilot, lambda: app.feed.connected, "connected")
                await test(app, pilot)
        asyncio.run(main())

    yield run, sup
    sup.kill()
    shutil.rmtree(where, ignore_errors=True)


def test_batches_appear_and_enter_shows_addresses_and_message_ids(live, db, stub) -> None:
    run, sup = live

    async def test(app: MonitorApp, pilot: Any) -> None:
        insert_accounts(db, 10, "live")
        table = app.query_one("#batches")
        await until(pilot, lambda: table.row_count >= 1, "a batch on screen 1")
        await until(pilot, lambda: ledger(db).get("sent") == 10, "10 sent")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, BatchDetail), "batch detail")
        rows = app.screen.query_one("#destinations")
        await until(pilot, lambda: rows.row_count >= 1, "destinations")
        first = [str(cell) for cell in rows.get_row_at(0)]
        assert first[0].endswith("@example.test") and first[2] == "sent" and len(first[3]) > 8
        assert first[4] == "1"  # attempts, from the ledger
        assert not any(len(cell) >= 86 for cell in first)  # no signed token on screen
    run(test)


def test_P_pauses_the_ledger_and_P_again_resumes_it(live, db, stub) -> None:
    run, sup = live

    async def test(app: MonitorApp, pilot: Any) -> None:
        await until(pilot, lambda: app.feed.role == "operator", "operator role")
        await pilot.press("P")
        await until(pilot, lambda: isinstance(app.screen, Confirm), "confirmation")
        await pilot.press("y")
        await until(pilot, lambda: app.state.paused_claims, "paused")
        insert_accounts(db, 5, "pp")
        await pilot.pause(1.0)  # ten batch timeouts: nothing may move
        assert ledger(db) == {"queued": 5}
        await pilot.press("P")
        await until(pilot, lambda: isinstance(app.screen, Confirm), "confirmation")
        await pilot.press("y")
        await until(pilot, lambda: ledger(db).get("sent") == 5, "5 sent after resume")
    run(test, operate=True)


def test_R_on_a_failure_group_requeues_exactly_its_rows_and_they_are_sent(live, db, stub) -> None:
    run, sup = live
    # SES refuses the "bad" addresses for good (a permanent status: failed at once)
    # until the operator has fixed it; then it accepts everything.
    stub.default = per_destination(lambda a: "MessageRejected" if a.startswith("bad") else None)

    async def test(app: MonitorApp, pilot: Any) -> None:
        insert_accounts(db, 3, "bad")
        insert_accounts(db, 4, "good")
        await until(pilot, lambda: ledger(db) == {"failed": 3, "sent": 4}, "3 failed, 4 sent")
        first_calls = len(stub.bulk)
        await pilot.press("3")
        table = app.query_one("#failure-groups")
        await until(pilot, lambda: table.row_count == 1, "one failure group")
        assert str(table.get_row_at(0)[0]).startswith("MessageRejected")
        stub.default = success()
        await pilot.press("R")
        await until(pilot, lambda: isinstance(app.screen, Confirm), "confirmation")
        assert "Dry run: 3 failed rows requeued" in app.screen.question
        await pilot.press("y")
        await until(pilot, lambda: ledger(db) == {"sent": 7}, "the 3 requeued rows sent")
        # Exactly those rows went out again, each once; nothing already sent did.
        again = [a for r in stub.bulk[first_calls:] for a in r.addresses]
        assert sorted(again) == ["bad1@example.test", "bad2@example.test", "bad3@example.test"]
        await until(pilot, lambda: table.row_count == 0, "the group gone")
        with psycopg.connect(db) as conn:
            assert conn.execute("SELECT count(DISTINCT message_id) FROM deliveries").fetchone()[0] == 7
    run(test, operate=True)


def test_slash_shows_the_deliveries_of_an_address_from_a_running_system(live, db, stub) -> None:
    run, sup = live

    async def test(app: MonitorApp, pilot: Any) -> None:
        insert_accounts(db, 2, "who")
        await until(pilot, lambda: ledger(db).get("sent") == 2, "2 sent")
        await pilot.press("slash", *"who2@example.test", "enter")
        table = app.query_one("#deliveries")
        await until(pilot, lambda: table.row_count == 1, "one delivery")
        cells = [str(cell) for cell in table.get_row_at(0)]
        with psycopg.connect(db) as conn:
            token, message_id = conn.execute(
                "SELECT t.id, d.message_id FROM tokens t JOIN accounts a ON a.id = t.account"
                " JOIN deliveries d ON d.token = t.id WHERE a.email = 'who2@example.test'").fetchone()
        assert cells[:3] == [str(token), "activation", "sent"] and message_id in cells
    run(test)


def test_without_operate_P_changes_nothing(live, db, stub) -> None:
    run, sup = live

    async def test(app: MonitorApp, pilot: Any) -> None:
        await pilot.press("P")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, Confirm)
        insert_accounts(db, 3, "ro")
        await until(pilot, lambda: ledger(db).get("sent") == 3, "3 sent: claims never paused")
    run(test)
    wait_for(lambda: sup.proc.poll() is None, what="supervisor still running")
