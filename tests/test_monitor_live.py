"""The monitor against a real supervisor: the installed ``mailroom-supervisor``, a real
PostgreSQL ledger and the scripted SES stub over HTTP, driven with the pilot."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from collector_util import insert_accounts, wait_for
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
