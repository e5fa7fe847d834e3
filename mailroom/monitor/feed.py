"""The live feed: one async task that reads the control socket and buffers what it reads.

The feed never touches widgets.  It appends ``("snapshot", dict)`` and
``("event", dict)`` items to :attr:`ControlFeed.pending`; the app drains that
buffer at most four times a second (see ``MonitorApp._apply_buffered``).  When the
connection fails or closes it reconnects with jittered, capped exponential
backoff, so a restarted supervisor is picked up again on its own (the house's one
backoff formula and one-line errors, from :mod:`mailroom._process`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from mailroom._process import backoff, one_line

log = logging.getLogger("mailroom.monitor")

__all__ = ["ClientFactory", "ControlConnection", "ControlFeed", "default_client_factory"]


class ControlConnection(Protocol):
    """What the feed uses of a control client (:class:`~mailroom.control.client.AsyncControlClient`)."""

    async def connect(self) -> dict[str, Any]: ...
    async def subscribe(self, topics: list[str] | None = None) -> dict[str, Any]: ...
    def events(self) -> AsyncIterator[dict[str, Any]]: ...
    async def request(self, cmd: str, **args: object) -> dict[str, Any]: ...
    async def close(self) -> None: ...


ClientFactory = Callable[[str], ControlConnection]

#: Reconnect delays: BASE doubling up to CAP seconds, each drawn in [delay/2, delay]
#: ("equal jitter": a fleet of monitors does not hammer a restarting supervisor in lockstep).
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0
#: Items kept in the buffer between two flushes; beyond it the oldest are dropped
#: and a resync is asked for (the events screen is the only loser).
MAX_PENDING = 20000


def default_client_factory(path: str) -> ControlConnection:
    """An ``AsyncControlClient`` for ``path`` (imported lazily: the control plane is optional)."""
    from mailroom.control.client import AsyncControlClient

    return AsyncControlClient(path)


class ControlFeed:
    """Connection state plus the buffer of what the socket delivered."""

    def __init__(self, path: str, factory: ClientFactory = default_client_factory) -> None:
        self.path = path
        self.factory = factory
        self.pending: deque[tuple[str, Any]] = deque()
        self.connected = False
        self.hello: dict[str, Any] = {}
        self.error: str | None = None
        self.attempts = 0
        self.connections = 0
        self.dropped = 0
        self._client: ControlConnection | None = None

    @property
    def role(self) -> str | None:
        """``operator`` or ``viewer`` from the hello reply; None when not connected."""
        role = self.hello.get("role") if self.connected else None
        return role if isinstance(role, str) else None

    def _push(self, kind: str, payload: Any) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append((kind, payload))

    async def run(self) -> None:
        """Connect, subscribe, read events; on any failure reconnect after a backoff. Forever."""
        while True:
            try:
                client = self.factory(self.path)
            except Exception as exc:  # noqa: BLE001 - the client module is missing or broken
                self.error = one_line(exc, named=True)
                log.warning("control client unavailable: %s", self.error)
                return
            try:
                hello = await client.connect()
                self.hello = hello if isinstance(hello, dict) else {}
                snapshot = await client.subscribe(None)
                self._client = client
                self.connected, self.error, self.attempts = True, None, 0
                self.connections += 1
                self._push("snapshot", snapshot)
                async for message in client.events():
                    self._push("event", message)
                self.error = "connection closed by the supervisor"
            except asyncio.CancelledError:
                await self._close(client)
                raise
            except Exception as exc:  # noqa: BLE001 - every failure of the peer means: reconnect
                self.error = one_line(exc, named=True)
            self.connected, self._client = False, None
            await self._close(client)
            delay = backoff(self.attempts, BACKOFF_BASE_S, BACKOFF_CAP_S)
            self.attempts += 1
            log.info("control socket %s: %s; retrying in %.1f s", self.path, self.error, delay)
            await asyncio.sleep(delay)

    @staticmethod
    async def _close(client: ControlConnection) -> None:
        try:
            await client.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail too; nothing to do
            pass

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command on the live connection; raises ConnectionError when there is none.

        ``ControlRefused`` from the client propagates (the caller shows its message).
        """
        client = self._client
        if client is None or not self.connected:
            raise ConnectionError("not connected to the supervisor")
        result = await client.request(cmd, **args)
        return result if isinstance(result, dict) else {}

    async def resync(self) -> None:
        """After a gap in ``seq``: fetch a fresh snapshot with ``status``."""
        try:
            self._push("snapshot", await self.request("status"))
        except Exception as exc:  # noqa: BLE001 - the next reconnect resyncs
            log.info("resync failed: %s", one_line(exc, named=True))
