"""A test double for the monitor: a scripted control server over a real Unix socket.

It speaks the protocol of OPERATIONS.md section 2 (JSON lines, ``{"v":1,"id":N,
"cmd":..}`` requests, replies with ``ok``, events with ``seq``), and the monitor talks
to it with the real ``AsyncControlClient``: what it adds over a real supervisor is
events a test scripts exactly, malformed ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from mailroom.monitor.app import MonitorApp

# ----------------------------------------------------------- fake server


class FakeControlServer:
    """A scripted supervisor: answers commands, pushes the events a test asks for."""

    def __init__(self, path: str, role: str = "operator") -> None:
        self.path = path
        self.role = role
        self.snapshot: dict[str, Any] = {"state": "running", "queue": "mailroom",
                                         "paused": {"claims": False, "sending": False}}
        self.batches: dict[str, list[dict[str, Any]]] = {}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.subscribed = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._subscribers: list[tuple[asyncio.StreamWriter, itertools.count]] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.subscribed = asyncio.Event()
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def stop(self) -> None:
        """Close the listener and every connection (a supervisor that exits)."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        self._subscribers.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                except ValueError:
                    continue
                await self._answer(writer, req)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass

    async def _answer(self, writer: asyncio.StreamWriter, req: dict[str, Any]) -> None:
        rid, cmd, args = req.get("id"), req.get("cmd"), req.get("args") or {}
        self.commands.append((cmd, args))
        changing = cmd in ("pause", "resume", "drain", "set_rate", "restart", "shutdown")
        if changing and self.role != "operator":
            reply = {"ok": False, "error": {"code": "forbidden", "message": "viewer"}}
        elif cmd == "hello":
            reply = {"ok": True, "result": {"version": "test", "protocol": 1, "role": self.role,
                                            "commands": []}}
        elif cmd in ("subscribe", "status"):
            reply = {"ok": True, "result": self.snapshot}
        elif cmd == "batch":
            found = self.batches.get(str(args.get("id")))
            reply = ({"ok": True, "result": {"id": args.get("id"), "destinations": found}}
                     if found is not None else
                     {"ok": False, "error": {"code": "not_found", "message": "no such batch"}})
        else:
            reply = {"ok": True, "result": {"changed": True}}
        writer.write(json.dumps({"v": 1, "id": rid, **reply}).encode() + b"\n")
        await writer.drain()
        if cmd == "subscribe":
            self._subscribers.append((writer, itertools.count(1)))
            self.subscribed.set()

    async def event(self, name: Any, data: Any) -> None:
        """Push one well-formed event line to every subscriber."""
        for writer, seq in list(self._subscribers):
            msg = {"v": 1, "event": name, "seq": next(seq),
                   "ts": dt.datetime.now(dt.UTC).isoformat(), "data": data}
            await self._write(writer, json.dumps(msg).encode() + b"\n")

    async def raw(self, data: bytes) -> None:
        """Push bytes as they are (malformed lines, half lines)."""
        for writer, _ in list(self._subscribers):
            await self._write(writer, data)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.is_closing():
            self._subscribers = [s for s in self._subscribers if s[0] is not writer]
            return
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError:  # that client went away: forget it
            self._subscribers = [s for s in self._subscribers if s[0] is not writer]


# ----------------------------------------------------------- test helpers
# Shared by the monitor's test modules (which do not import each other).


async def until(pilot: Any, condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Let the app run until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await pilot.pause(0.05)


def scenario(test: Callable[..., Awaitable[None]], *, role: str = "operator", operate: bool = False,
             database_url: str | None = None, size: tuple[int, int] = (140, 40),
             snapshot: dict[str, Any] | None = None) -> None:
    """Run ``test(app, pilot, server)`` with a fake server and the app connected to it
    (``snapshot``: fields added to the fake's ``subscribe`` answer)."""
    async def main() -> None:
        # A short directory: Unix socket paths are limited to about 100 bytes.
        with tempfile.TemporaryDirectory(prefix="mrmon") as tmp:
            path = os.path.join(tmp, "control.sock")
            server = FakeControlServer(path, role=role)
            server.snapshot.update(snapshot or {})
            await server.start()
            app = MonitorApp(path, database_url, operate=operate)
            try:
                async with app.run_test(size=size) as pilot:
                    await until(pilot, lambda: app.feed.connected and server.subscribed.is_set(),
                                "connected")
                    # ...and shown: a flush since (else a banner test may read the
                    # DISCONNECTED of the first paint, from before the connection).
                    await until(pilot, lambda: not app.query_one("#banner").display, "connected, shown")
                    await test(app, pilot, server)
            finally:
                await server.stop()
    asyncio.run(main())


def batch(n: int, **extra: Any) -> dict[str, Any]:
    return {"batch": f"b-{n}", "rows": 10, "activation": 8, "recovery": 2, **extra}


def cell(app: MonitorApp, key: str, column: str) -> str:
    return str(app.query_one("#batches").get_cell(key, column))


def add_accounts(url: str, emails: list[str]) -> None:
    """Insert accounts (the trigger makes activation tokens and queued deliveries)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for email in emails:
            conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)",
                         (email, email.split("@")[0]))


def fail_deliveries(url: str, email: str, error: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE deliveries SET status = 'failed', attempts = 5, last_error = %s WHERE token IN"
            " (SELECT t.id FROM tokens t JOIN accounts a ON a.id = t.account WHERE a.email = %s)",
            (error, email))
