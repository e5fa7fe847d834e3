"""Screenshots: each screen in a fixed state, saved as SVG with Textual's
``save_screenshot`` and checked for the labels it must show.

``MAILROOM_MONITOR_SCREENSHOTS=docs`` also writes them where the README links
them (``docs/monitor-*.svg``): that is how the checked-in ones were made.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from monitor_fakes import FakeControlServer, add_accounts, batch, fail_deliveries, until

from mailroom.ledger import fleet
from mailroom.monitor.app import MonitorApp

pytestmark = pytest.mark.timeout(90)

SNAPSHOT = {
    "state": "running", "queue": "mailroom", "version": "0.1.0",
    "paused": {"claims": False, "sending": False},
    "workers": [
        {"worker": "supervisor", "pid": 4100, "state": "running", "restarts": 0, "rss": 20971520,
         "started": time.time() - 7200, "last_heartbeat": time.time()},
        {"worker": "collector", "pid": 4101, "state": "running", "restarts": 0, "rss": 36700160,
         "started": time.time() - 7190, "last_heartbeat": time.time() - 1},
        {"worker": "sender", "pid": 4102, "state": "running", "restarts": 1, "rss": 57671680,
         "started": (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=50)).isoformat(),
         "last_heartbeat": time.time() - 2},
    ],
}
TICK = {"sent_per_s": 11.0, "failed_per_s": 0.2, "in_flight": 2, "queue_depth": 1480,
        "oldest_queued_s": 3.2, "rate_limit": 14,
        "ses": {"max_send_rate": 14, "max_24h_send": 50000, "sent_last_24h": 31200,
                "paused": False}}

EXPECTED = {
    "live": ["queued", "in flight", "sent/min", "failed, 15 min", "sent/s, 5 min", "b-12",
             "partial", "MessageRejected", "OPERATOR", "SES 24h"],
    "ledger": ["password_recovery", "queued", "failed", "jane@example.com", "ses-0001"],
    "failures": ["failure groups", "MessageRejected", "Throttling"],
    "processes": ["collector", "sender", "4101", "fleet", "vm-a", "stale"],
    "events": ["batch.claimed", "batch.done", "tick", "worker.started"],
}


def _svg_text(svg: str) -> str:
    return html.unescape(svg).replace("\xa0", " ")


def test_screenshot_of_each_screen(db: str, tmp_path: Path) -> None:
    add_accounts(db, ["jane@example.com", "bob@invalid.test", "carol@example.com"])
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE deliveries SET status = 'sent', message_id = 'ses-0001', sent_at = now()"
                     " WHERE token = (SELECT t.id FROM tokens t JOIN accounts a ON a.id = t.account"
                     " WHERE a.email = 'jane@example.com')")
        fleet.heartbeat(conn, fleet.register(conn, "mailroom", "vm-a", 4101), 120, 1180)
        dead = fleet.register(conn, "mailroom", "vm-b", 977)
        conn.execute("UPDATE consumers SET last_seen_at = now() - interval '10 minutes'"
                     " WHERE id = %s", (dead,))
    fail_deliveries(db, "bob@invalid.test", "MessageRejected: Email address is not verified")
    fail_deliveries(db, "carol@example.com", "Throttling: Maximum sending rate exceeded")
    out = Path(os.environ.get("MAILROOM_MONITOR_SCREENSHOTS") or tmp_path)

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="mrmon") as tmp:
            server = FakeControlServer(os.path.join(tmp, "control.sock"))
            server.snapshot = SNAPSHOT
            await server.start()
            app = MonitorApp(server.path, db)
            try:
                async with app.run_test(size=(150, 42)) as pilot:
                    await until(pilot, lambda: app.feed.connected, "connected")
                    await _script(server)
                    await until(pilot, lambda: "b-12" in app.state.batches, "events applied")
                    await pilot.pause(0.3)
                    await _shoot(app, pilot, out)
            finally:
                await server.stop()
    asyncio.run(main())


async def _script(server: FakeControlServer) -> None:
    await server.event("worker.started", {"worker": "collector", "pid": 4101})
    for i in range(60):  # five minutes would be 300 ticks; a minute shows the shape
        wave = (i % 12) - 6 if (i % 12) < 6 else 6 - (i % 12)
        await server.event("tick", {**TICK, "sent_per_s": 11.0 + wave, "failed_per_s": i % 5 / 10})
    for n in range(1, 13):
        await server.event("batch.claimed", batch(n))
        if n <= 10:
            await server.event("batch.dispatched", batch(n))
            failed = 1 if n % 4 == 0 else 0
            await server.event("batch.done", batch(
                n, sent=10 - failed, failed=failed, retry=0, skipped=0, ms=38.0 + n,
                error="MessageRejected: Email address is not verified" if failed else None))
    await server.event("worker.started", {"worker": "sender", "pid": 4102, "restarts": 1})


async def _shoot(app: MonitorApp, pilot: Any, out: Path) -> None:
    ready = {
        "live": lambda: app.query_one("#batches").row_count == 12,
        "ledger": lambda: app.query_one("#deliveries").row_count == 1,
        "failures": lambda: app.query_one("#failure-groups").row_count == 2,
        "processes": lambda: app.query_one("#fleet").row_count == 2,
        "events": lambda: len(app.query_one("#event-log").lines) > 10,
    }
    for key, pane in zip("12345", EXPECTED, strict=True):
        await pilot.press(key)
        if pane == "ledger":
            await pilot.press("slash", *"jane@example.com", "enter")
        await until(pilot, ready[pane], f"{pane} ready")
        # A DataTable sizes its columns when the app is idle after rows arrive: on a
        # loaded machine that can come after any fixed pause, with the cells still
        # clipped to the header's width.  Shoot again until the labels are there.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            await pilot.pause(0.2)
            path = app.save_screenshot(f"monitor-{pane}.svg", str(out))
            text = _svg_text(Path(path).read_text(encoding="utf-8"))
            missing = [label for label in EXPECTED[pane] if label not in text]
            if not missing or asyncio.get_running_loop().time() > deadline:
                break
        assert not missing, f"{pane}: {missing} not in {path}"
