"""``mailroom monitor --web``: the monitor in a browser (textual-serve), one process per tab.

textual-serve starts the monitor for each websocket and forgets it once its stdout reader
ends. A browser that vanishes without closing the websocket (a crashed tab, a dropped ssh
tunnel, ``chromium --headless --screenshot``) ends that reader first; the monitor, its quit
message unread behind a full stdout pipe, then spun at 100 % of a core, and outlived the
server as an orphan of init. Here each session's monitor is a process group of its own
that the server ends itself, whatever way its browser left:

- the websocket pings every :data:`HEARTBEAT` seconds, so a peer gone silent is noticed;
- when a session ends, its monitor is asked to quit, then SIGTERM'd, then SIGKILL'd
  (:meth:`Session.end`), and always reaped;
- stopping the server ends every session it started (``on_shutdown``), and a monitor
  whose server died anyway gets SIGTERM from the kernel (:func:`mailroom.monitor.bind_to_server`).

The page is served without the Google Fonts stylesheet textual-serve's template links: the
font (Roboto Mono) comes from textual-serve's own static files, never the internet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from textual_serve.app_service import AppService
from textual_serve.server import Server

from mailroom.monitor import SERVER_PID_VARIABLE

__all__ = ["HEARTBEAT", "MonitorServer", "Session"]

log = logging.getLogger("mailroom.monitor.web")

#: Seconds between websocket pings; a browser that misses a pong for half of it is gone.
HEARTBEAT = 5.0
#: Seconds a monitor gets to quit when asked, then again after SIGTERM.
GRACE = 1.5
_TEMPLATES = Path(__file__).with_name("web_page")


class Session(AppService):
    """One browser tab's monitor: its own process group, ended by :meth:`end`."""

    async def _open_app_process(self, width: int = 80, height: int = 24) -> asyncio.subprocess.Process:
        environment = self._build_environment(width=width, height=height)
        environment[SERVER_PID_VARIABLE] = str(os.getpid())
        # exec, not a shell (the pid is the monitor's), in a session of its own so that
        # ending it reaches anything it started and a ^C at the server's terminal
        # reaches only the server (which then ends its sessions in order).
        self._process = process = await asyncio.create_subprocess_exec(
            *shlex.split(self.command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
            start_new_session=True,
        )
        assert process.stdin is not None
        self._stdin = process.stdin
        return process

    @property
    def pid(self) -> int | None:
        """The monitor's pid (None before it started)."""
        return self._process.pid if self._process is not None else None

    async def stop(self) -> None:
        """Ask the monitor to quit, then make sure it has (called on every way out)."""
        try:
            # textual-serve's stop: a quit message, then wait for the stdout reader. The
            # reader can wait forever on a monitor stuck writing to a dead browser.
            await asyncio.wait_for(super().stop(), GRACE)
        except (TimeoutError, OSError):
            pass
        finally:  # whatever the relay raised, the process is ended
            await self.end()

    async def end(self) -> None:
        """Quit, SIGTERM, SIGKILL, as far as it takes; reap the process."""
        process = self._process
        if process is None:
            return
        for signum in (None, signal.SIGTERM, signal.SIGKILL):
            if signum is not None:
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:
                    pass
            try:
                await asyncio.wait_for(process.wait(), GRACE)
                break
            except TimeoutError:
                continue
        if self._task is not None:
            # The stdout reader ends at EOF now that the process is gone.
            self._task.cancel()
            self._task = None
        # Anything the monitor left in its group (it starts nothing today).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class MonitorServer(Server):
    """textual-serve's server with session lifetimes this module's docstring describes."""

    def __init__(self, command: Sequence[str], *, host: str, port: int, title: str) -> None:
        super().__init__(shlex.join(command), host=host, port=port, title=title,
                         templates_path=_TEMPLATES)
        self.sessions: set[Session] = set()
        self._sockets: set[web.WebSocketResponse] = set()

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """One tab: start its monitor, relay, and end the monitor however the tab left."""
        websocket = web.WebSocketResponse(heartbeat=HEARTBEAT)
        width = _int(request.query.get("width"), 80)
        height = _int(request.query.get("height"), 24)
        session = Session(self.command, write_bytes=websocket.send_bytes, write_str=websocket.send_str,
                          close=lambda: _close(websocket), download_manager=self.download_manager, debug=self.debug)
        self._sockets.add(websocket)
        try:
            await websocket.prepare(request)
            self.sessions.add(session)
            await session.start(width, height)
            log.info("session %s started (monitor pid %s)", session.app_service_id[:8], session.pid)
            # Ends on a close frame, a transport error or a missed heartbeat alike.
            await self._process_messages(websocket, session)
        except asyncio.CancelledError:
            pass
        except Exception as error:  # noqa: BLE001 - one tab's failure must not take the server down
            log.warning("session %s: %s", session.app_service_id[:8], error)
        finally:
            # Shielded: aiohttp cancels the handler of a connection that drops, and the
            # monitor must still be ended.
            await asyncio.shield(self._end(session, websocket))
        return websocket

    async def _end(self, session: Session, websocket: web.WebSocketResponse) -> None:
        try:
            await session.stop()
        finally:
            self.sessions.discard(session)
            self._sockets.discard(websocket)
            if not websocket.closed:
                try:
                    await websocket.close()
                except (OSError, RuntimeError):
                    pass
            log.info("session %s ended", session.app_service_id[:8])

    async def on_shutdown(self, app: web.Application) -> None:
        """End every session (their websockets would otherwise hold the shutdown open)."""
        await asyncio.gather(*(session.end() for session in list(self.sessions)), return_exceptions=True)
        for websocket in list(self._sockets):
            await websocket.close(code=1001, message=b"server stopped")

    def serve(self, debug: bool = False) -> None:
        """Serve until SIGINT or SIGTERM, then end every session."""
        self.debug = debug
        self.initialize_logging()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.request_exit)
        web.run_app(self._make_app(), host=self.host, port=self.port, handle_signals=False,
                    loop=loop, print=lambda *args: None, shutdown_timeout=2 * GRACE)


async def _close(websocket: web.WebSocketResponse) -> None:
    # The monitor quit (an "exit" message): close the tab's websocket.
    await websocket.close()


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default
