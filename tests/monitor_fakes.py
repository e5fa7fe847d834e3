"""Test doubles for the monitor: a scripted control server over a real Unix socket,
a throw-away stand-in of the async control client (until issue 10's is merged), and
a stand-in of ``mailroom.ledger.admin`` for the same reason.

The fake server speaks the protocol of OPERATIONS.md section 2 (JSON lines,
``{"v":1,"id":N,"cmd":..}`` requests, replies with ``ok``, events with ``seq``),
so the real client can be tested against it too once it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import itertools
import json
import sys
import types
from collections.abc import AsyncIterator
from typing import Any

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


# ----------------------------------------------------------- stand-in client


class ControlRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class ControlUnavailable(Exception):
    pass


class StandinClient:
    """The AsyncControlClient contract, minimally, for tests only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._reader_task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> dict[str, Any]:
        try:
            reader, self._writer = await asyncio.open_unix_connection(self.path, limit=1 << 17)
        except OSError as exc:
            raise ControlUnavailable(str(exc)) from exc
        self._reader_task = asyncio.create_task(self._read(reader))
        return await self.request("hello")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    break  # EOF, possibly mid-line: the half line is dropped
                # Like issue 10's client: a line that is not JSON ends the connection.
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    break
                if "id" in msg and "ok" in msg:
                    fut = self._waiting.pop(msg.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    await self._events.put(msg)
        except (OSError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ControlUnavailable("connection closed"))
            await self._events.put(None)

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        if self._writer is None or self._reader_task is None or self._reader_task.done():
            raise ControlUnavailable("not connected")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._writer.write(json.dumps({"v": 1, "id": rid, "cmd": cmd, "args": args}).encode() + b"\n")
        msg = await fut
        if not msg.get("ok"):
            err = msg.get("error") or {}
            raise ControlRefused(str(err.get("code")), str(err.get("message")))
        return msg.get("result") or {}

    async def subscribe(self, topics: list[str] | None = None) -> dict[str, Any]:
        return await self.request("subscribe", topics=topics)

    async def events(self) -> AsyncIterator[Any]:
        while (msg := await self._events.get()) is not None:
            yield msg

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()


def client_factory():
    """The real client when issue 10's module is there, else the stand-in."""
    try:
        from mailroom.control.client import AsyncControlClient
        return AsyncControlClient
    except ImportError:
        return StandinClient


# ----------------------------------------------------------- stand-in admin

_ADMIN_SQL = {
    "deliveries": """
        SELECT d.token, t.action::text, d.status::text, d.attempts, d.created_at, d.claimed_at,
               d.next_attempt_at, d.sent_at, d.message_id, d.last_error
          FROM accounts a JOIN tokens t ON t.account = a.id
          JOIN deliveries d ON d.token = t.id AND d.job_type = %s
         WHERE a.email = %s ORDER BY d.token DESC LIMIT %s""",
}


def _standin_admin() -> types.ModuleType:
    from psycopg.rows import dict_row

    mod = types.ModuleType("mailroom.ledger.admin")

    def deliveries(conn, queue, email, limit=100):
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(_ADMIN_SQL["deliveries"], (queue, email, limit)).fetchall()

    def counts(conn, queue):
        by: dict[str, dict[str, int]] = {}
        for status, action, n in conn.execute(
                "SELECT d.status::text, t.action::text, count(*) FROM deliveries d"
                " JOIN tokens t ON t.id = d.token WHERE d.job_type = %s GROUP BY 1, 2", (queue,)):
            by.setdefault(status, {})[action] = n
        return {"by_status_action": by, "oldest_queued_s": None, "expired_leases": 0}

    def failure_groups(conn, queue, limit=50):
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                "SELECT d.last_error AS error, count(*) AS count, min(d.created_at) AS first_seen,"
                " max(d.created_at) AS last_seen, min(a.email) AS sample FROM deliveries d"
                " JOIN tokens t ON t.id = d.token JOIN accounts a ON a.id = t.account"
                " WHERE d.job_type = %s AND d.status = 'failed' GROUP BY 1 ORDER BY 2 DESC LIMIT %s",
                (queue, limit)).fetchall()

    def _change(conn, queue, status, new, error, email, dry_run):
        where = "d.job_type = %s AND d.status = %s"
        params: list[Any] = [queue, status]
        if error is not None:
            where += " AND d.last_error = %s"
            params.append(error)
        if email is not None:
            where += (" AND d.token IN (SELECT t.id FROM tokens t JOIN accounts a ON a.id = t.account"
                      " WHERE a.email = %s)")
            params.append(email)
        if dry_run:
            return conn.execute(f"SELECT count(*) FROM deliveries d WHERE {where}", params).fetchone()[0]
        return conn.execute(f"UPDATE deliveries d SET status = %s WHERE {where}",
                            [new, *params]).rowcount

    def retry(conn, queue, *, since=None, error=None, email=None, tokens=None, dry_run=False):
        return _change(conn, queue, "failed", "queued", error, email, dry_run)

    def skip(conn, queue, *, since=None, error=None, email=None, tokens=None, dry_run=False):
        return _change(conn, queue, "queued", "skipped", error, email, dry_run)

    mod.deliveries, mod.counts, mod.failure_groups = deliveries, counts, failure_groups
    mod.retry, mod.skip = retry, skip
    return mod


def ensure_admin() -> None:
    """Make ``mailroom.ledger.admin`` importable: the real one, else the stand-in."""
    try:
        importlib.import_module("mailroom.ledger.admin")
    except ImportError:
        sys.modules["mailroom.ledger.admin"] = _standin_admin()
        import mailroom.ledger
        mailroom.ledger.admin = sys.modules["mailroom.ledger.admin"]  # type: ignore[attr-defined]
