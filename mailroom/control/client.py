"""Clients of the control socket: :class:`ControlClient` (blocking, for ``mailroom ctl``
and scripts) and :class:`AsyncControlClient` (asyncio, for the monitor).

Replies and events share one connection: replies are matched to their request
by ``id``, events are queued for :meth:`events` in arrival order.

Before a word is sent, both check who serves the socket (``SO_PEERCRED``: the
listening process's uid, whatever the file says): root, the client's own user, or
the user named by ``MAILROOM_CONTROL_OWNER``. Anyone else may have put an impostor
where the supervisor's socket should be, and would otherwise be told "pause" and
answer "done" while the real supervisor runs uncontrolled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any

from mailroom import config
from mailroom.control import protocol

__all__ = ["AsyncControlClient", "ControlClient", "ControlRefused", "ControlUnavailable",
           "UntrustedSocket", "trusted_uids"]

#: The longest line a client accepts from the server (a ``batches`` reply is big).
MAX_REPLY = 16 * 1024 * 1024
#: Events kept for a consumer that is not reading; past it they are dropped
#: (the consumer sees the ``seq`` gap and subscribes again for a snapshot).
MAX_QUEUED_EVENTS = 10_000


class ControlRefused(Exception):
    """The supervisor answered with an error: ``code`` (OPERATIONS.md 2) and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlUnavailable(Exception):
    """No usable connection: nothing listens, permission denied, closed, timed out."""


class UntrustedSocket(ControlUnavailable):
    """The socket is served by a user the client does not trust; nothing was sent."""


_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def trusted_uids(environ: Mapping[str, str] | None = None) -> frozenset[int]:
    """Root, our own uid, and ``MAILROOM_CONTROL_OWNER`` when set (a user name or uid:
    root running ``mailroom ctl`` against a supervisor that runs as ``mailroom``).
    Raises :class:`ControlUnavailable` (one line) for an unknown user."""
    environ = os.environ if environ is None else environ
    uids = {0, os.getuid()}
    raw = environ.get("MAILROOM_CONTROL_OWNER")
    if raw is not None:
        try:
            uids.add(config.user_id(raw))
        except ValueError as exc:
            raise ControlUnavailable(f"MAILROOM_CONTROL_OWNER: {exc}") from None
    return frozenset(uids)


def check_peer(sock: socket.socket, path: str, trusted: frozenset[int]) -> None:
    """Raise :class:`UntrustedSocket` unless the process serving ``sock`` runs as a
    ``trusted`` uid (read with ``SO_PEERCRED``: a file's owner can be faked by a
    rename, the listener's credentials cannot)."""
    try:
        pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    except OSError as exc:
        raise UntrustedSocket(f"cannot tell who serves the control socket {path}:"
                              f" {exc.strerror or exc}; not sending anything") from None
    if uid not in trusted:
        users = " or ".join(f"uid {u}" for u in sorted(trusted))
        raise UntrustedSocket(f"refusing the control socket {path}: it is served by uid {uid} (pid {pid}),"
                              f" not {users}; another user may have replaced it (if uid {uid} runs the"
                              f" supervisor, set MAILROOM_CONTROL_OWNER={uid})")


def _decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        raise ControlUnavailable("the supervisor sent something that is not JSON") from None
    if not isinstance(message, dict):
        raise ControlUnavailable("the supervisor sent something that is not a JSON object")
    return message


def _result(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("ok"):
        result = message.get("result")
        return result if isinstance(result, dict) else {}
    error = message.get("error") or {}
    raise ControlRefused(str(error.get("code", protocol.INTERNAL)), str(error.get("message", "")))


def _unavailable(path: str, exc: OSError) -> ControlUnavailable:
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        # No file, or a file nobody listens on (a supervisor that was killed): the
        # usual cause is that no supervisor runs with this socket; say what to check.
        return ControlUnavailable(f"cannot connect to the control socket ({reason}):"
                                  f" is mailroom-supervisor running? socket: {path}")
    return ControlUnavailable(f"cannot connect to the control socket {path}: {reason}")


class ControlClient:
    """A blocking client. ``timeout`` (seconds, ``None`` = forever) bounds each wait
    for a reply; :meth:`events` waits without a bound."""

    def __init__(self, path: str, timeout: float | None = 10.0,
                 trusted: frozenset[int] | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.trusted = trusted_uids() if trusted is None else trusted
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 1
        self._events: collections.deque[dict[str, Any]] = collections.deque()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        """Connect now (otherwise the first request does)."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                break
            except BlockingIOError as exc:
                # A Unix socket with a timeout says EAGAIN instead of waiting
                # while the server's backlog is full: wait a little and retry.
                if deadline is not None and time.monotonic() + delay > deadline:
                    sock.close()
                    raise _unavailable(self.path, exc) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
            except OSError as exc:
                sock.close()
                raise _unavailable(self.path, exc) from None
        try:
            check_peer(sock, self.path, self.trusted)
        except UntrustedSocket:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        """Close the connection (a later request connects again)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf.clear()

    def _readline(self, timeout: float | None) -> dict[str, Any]:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_REPLY:
                self.close()
                raise ControlUnavailable("the supervisor sent a line that is too long")
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise ControlUnavailable(f"no answer from the supervisor within {timeout:g}s") from None
            except OSError as exc:
                self.close()
                raise ControlUnavailable(f"connection lost: {exc.strerror or exc}") from None
            if not chunk:
                self.close()
                raise ControlUnavailable("the supervisor closed the connection")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        return _decode(line)

    def request(self, cmd: str, **args: object) -> dict[str, Any]:
        """Send one request and wait (up to :attr:`timeout`) for its result; events
        read meanwhile are kept for :meth:`events`. Raises :class:`ControlRefused`
        or :class:`ControlUnavailable`.
        """
        self.connect()
        assert self._sock is not None
        ident, self._next_id = self._next_id, self._next_id + 1
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(protocol.encode_request(ident, cmd, args))
        except OSError as exc:
            self.close()
            raise ControlUnavailable(f"connection lost: {exc.strerror or exc}") from None
        while True:
            message = self._readline(self.timeout)
            if "event" in message:
                self._events.append(message)
            elif message.get("id") == ident or message.get("id") is None:
                return _result(message)

    def hello(self) -> dict[str, Any]:
        """The ``hello`` result: version, protocol, role, commands."""
        return self.request("hello")

    def subscribe(self, topics: list[str] | None = None) -> dict[str, Any]:
        """Subscribe (all events, or those of ``topics``); returns the snapshot."""
        return self.request("subscribe", **({} if topics is None else {"topics": topics}))

    def events(self) -> Iterator[dict[str, Any]]:
        """Events in arrival order, until the connection closes (then it just ends)."""
        while True:
            while self._events:
                yield self._events.popleft()
            if self._sock is None:
                return
            try:
                message = self._readline(None)
            except ControlUnavailable:
                return
            if "event" in message:
                yield message


class AsyncControlClient:
    """An asyncio client: one connection, requests may overlap, events queue up."""

    def __init__(self, path: str, trusted: frozenset[int] | None = None) -> None:
        self.path = path
        self.trusted = trusted_uids() if trusted is None else trusted
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._next_id = 1
        self._lost: str | None = None

    async def connect(self) -> dict[str, Any]:
        """Connect and say ``hello``; returns its result ({version, protocol, role, commands, ...})."""
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=MAX_REPLY)
        except OSError as exc:
            raise _unavailable(self.path, exc) from None
        try:
            check_peer(self._writer.get_extra_info("socket"), self.path, self.trusted)
        except UntrustedSocket:
            self._writer.close()
            self._writer = self._reader = None
            raise
        self._lost = None
        self._events = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return await self.request("hello")

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "the supervisor closed the connection"
        try:
            while True:
                line = await self._reader.readline()
                if not line.endswith(b"\n"):
                    break
                message = _decode(line)
                if "event" in message:
                    with contextlib.suppress(asyncio.QueueFull):
                        if self._events.qsize() < MAX_QUEUED_EVENTS:
                            self._events.put_nowait(message)
                    continue
                future = self._pending.pop(message.get("id", -1), None)
                if future is None or future.done():
                    continue
                try:
                    future.set_result(_result(message))
                except ControlRefused as exc:
                    future.set_exception(exc)
        except (OSError, ValueError, ControlUnavailable) as exc:  # ValueError: line over the limit
            reason = f"connection lost: {exc}"
        finally:
            self._lost = reason
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ControlUnavailable(reason))
            self._pending.clear()
            self._events.put_nowait(None)

    async def request(self, cmd: str, **args: object) -> dict[str, Any]:
        """Send a request, wait for its result; raises ControlRefused / ControlUnavailable."""
        if self._writer is None or self._lost is not None:
            raise ControlUnavailable(self._lost or "not connected")
        ident, self._next_id = self._next_id, self._next_id + 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            self._writer.write(protocol.encode_request(ident, cmd, args))
            await self._writer.drain()
        except OSError as exc:
            self._pending.pop(ident, None)
            raise ControlUnavailable(f"connection lost: {exc}") from None
        return await future

    async def subscribe(self, topics: list[str] | None = None) -> dict[str, Any]:
        """Subscribe (all events, or those of ``topics``); returns the snapshot."""
        return await self.request("subscribe", **({} if topics is None else {"topics": topics}))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """``{"v","event","seq","ts","data"}`` in arrival order; ends when the socket closes."""
        while True:
            message = await self._events.get()
            if message is None:
                self._events.put_nowait(None)  # later iterators end too
                return
            yield message

    async def close(self) -> None:
        """Close the connection; pending requests fail with ControlUnavailable."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await self._writer.wait_closed()
            self._writer = None
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
