"""The supervisor's control socket server: non-blocking, no thread, driven by its loop.

The supervisor waits on :meth:`ControlServer.readers` (readable) and
:meth:`ControlServer.writers` (writable) beside its worker pipes, then calls
:meth:`ControlServer.service` with what became ready (and every loop turn, so
idle and half-sent connections time out). Nothing here blocks: every socket is
non-blocking, output goes through a per-client buffer, and a client whose
buffer passes :data:`MAX_OUTPUT` is dropped instead of slowing the loop.

The server answers ``hello``, ``subscribe`` and ``unsubscribe`` itself and
hands every other valid request to the supervisor's ``handler`` as a
:class:`Request`, which may be answered at once or later (``drain``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from mailroom.control import protocol
from mailroom.control.nonblocking import accept_pending, send_pending
from mailroom.control.protocol import OPERATOR, VIEWER, ControlError
from mailroom.control.sockfile import ControlSocketError, SocketInUse, bind_unix, default_socket_path, unlink_if_ours

__all__ = ["ControlServer", "ControlSocketError", "Peer", "Request", "SocketInUse",
           "default_socket_path"]

log = logging.getLogger("mailroom.control")

#: A client whose unsent output passes this is disconnected.
MAX_OUTPUT = 1024 * 1024
#: More connections than this are closed at once (each costs buffers).
MAX_CLIENTS = 1024
_READ_SIZE = 65536
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Peer:
    """Who is on the other end (``SO_PEERCRED``) and what they may do."""

    __slots__ = ("uid", "pid", "role")

    def __init__(self, uid: int, pid: int, role: str) -> None:
        self.uid, self.pid, self.role = uid, pid, role

    def __repr__(self) -> str:
        return f"Peer(uid={self.uid}, pid={self.pid}, role={self.role!r})"


class _Client:
    __slots__ = ("sock", "peer", "inbuf", "outbuf", "topics", "seq", "closed",
                 "close_after_flush", "since", "partial_since", "pending")

    def __init__(self, sock: socket.socket, peer: Peer, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.topics: frozenset[str] | None = None  # None: not subscribed
        self.seq = 0
        self.closed = False
        self.close_after_flush = False
        self.since = now                            # last complete request (or connect)
        self.partial_since: float | None = None     # when an unfinished line began
        self.pending = 0                            # requests the handler has not answered


class Request:
    """A valid request handed to the supervisor's handler; answer it once with
    :meth:`reply` or :meth:`fail`, now or later. Answering a request whose client
    has gone does nothing."""

    __slots__ = ("peer", "cmd", "args", "id", "_client", "_server", "_answered")

    def __init__(self, server: ControlServer, client: _Client, ident: int, cmd: str,
                 args: dict[str, Any]) -> None:
        self.peer = client.peer
        self.cmd = cmd
        self.args = args
        self.id = ident
        self._client = client
        self._server = server
        self._answered = False
        client.pending += 1

    @property
    def answered(self) -> bool:
        """True once :meth:`reply` or :meth:`fail` was called."""
        return self._answered

    def reply(self, result: dict[str, Any]) -> None:
        """Answer with success and ``result`` (a JSON-serialisable dict)."""
        if self._answer("ok"):
            try:
                line = protocol.encode_reply(self.id, result)
            except (TypeError, ValueError):
                log.exception("control: %s produced a result that is not JSON", self.cmd)
                line = protocol.encode_error(self.id, protocol.INTERNAL, "internal error")
            self._server._send(self._client, line)

    def fail(self, code: str, message: str) -> None:
        """Answer with error ``code`` (one of :data:`protocol.ERROR_CODES`) and a message."""
        if code not in protocol.ERROR_CODES:
            log.error("control: unknown error code %r for %s; sending internal", code, self.cmd)
            code, message = protocol.INTERNAL, "internal error"
        if self._answer(code, message):
            self._server._send(self._client, protocol.encode_error(self.id, code, message))

    def _answer(self, result: str, detail: str = "") -> bool:
        if self._answered:
            log.warning("control: %s (id %d) answered twice; second answer dropped", self.cmd, self.id)
            return False
        self._answered = True
        self._client.pending -= 1
        self._server._completed(self.peer, self.cmd, self.args, result, detail)
        return not self._client.closed


class ControlServer:
    """The control socket, served from the caller's loop.

    ``handler(request)`` gets every valid request but ``hello``/``subscribe``/
    ``unsubscribe``; ``snapshot()`` is the result of ``subscribe`` (the state the
    events then update); ``hello`` is merged into the ``hello`` result (put
    ``version`` and ``pid`` there). ``on_command(cmd, result)`` (optional) is
    called once per answered request, ``result`` being ``"ok"`` or an error code:
    feed it to :meth:`Metrics.command`.
    """

    def __init__(self, path: str, group: str | None, handler: Callable[[Request], None],
                 snapshot: Callable[[], dict[str, Any]], hello: dict[str, Any], *,
                 on_command: Callable[[str, str], None] | None = None,
                 idle_timeout: float = 300.0, line_timeout: float = 10.0) -> None:
        self.path = path
        self.group = group
        self.handler = handler
        self.snapshot = snapshot
        self.hello = dict(hello)
        self.on_command = on_command
        self.idle_timeout = idle_timeout
        self.line_timeout = line_timeout
        self._listener: socket.socket | None = None
        self._identity = (0, 0)
        self._clients: dict[socket.socket, _Client] = {}
        self._uid = os.getuid()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Create the socket file and listen. Raises :class:`SocketInUse` or
        :class:`ControlSocketError` (one printable line: exit 2 with it)."""
        self._listener, self._identity = bind_unix(self.path, self.group)
        log.info("control socket %s", self.path)

    def close(self) -> None:
        """Disconnect every client, stop listening and remove the socket file."""
        if self._listener is not None:
            unlink_if_ours(self.path, self._identity)
        self.detach()

    def detach(self) -> None:
        """Close every socket without touching the file: call this in a forked child,
        so the connections and the listener live in the supervisor only."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @property
    def clients(self) -> int:
        """How many connections are open."""
        return len(self._clients)

    # -- the loop's view -----------------------------------------------------------
    def readers(self) -> list[socket.socket]:
        """Sockets to wait on for reading: the listener and clients still reading."""
        found = [c.sock for c in self._clients.values() if not c.close_after_flush]
        if self._listener is not None:
            found.append(self._listener)
        return found

    def writers(self) -> list[socket.socket]:
        """Sockets with output pending: wait on them for writing."""
        return [c.sock for c in self._clients.values() if c.outbuf]

    def service(self, readable: Iterable[Any] = (), writable: Iterable[Any] = ()) -> None:
        """Accept, read, answer and flush what is ready; time out stale connections.

        Call it every loop turn, with the subsets of :meth:`readers` and
        :meth:`writers` that the wait reported (anything else in them is ignored;
        pending output is tried every call, so ``writable`` only makes the loop
        wake up sooner when a slow reader's buffer drains).
        """
        readable = set(readable)
        if self._listener is not None and self._listener in readable:
            self._accept()
        # Every pending output is tried, reported writable or not: a failed send
        # costs one EAGAIN, and a loop that can only wait for readability
        # (multiprocessing.connection.wait) still gets its output out each turn.
        del writable
        for client in [c for c in self._clients.values() if c.outbuf]:
            self._flush(client)
        for sock in [s for s in readable if s in self._clients]:
            self._read(self._clients[sock])
        self._expire(time.monotonic())

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Send an event to every subscriber whose topics match, each with its own ``seq``."""
        topic = event.split(".")[0]
        targets = [c for c in self._clients.values()
                   if c.topics is not None and not c.close_after_flush
                   and (event in c.topics or topic in c.topics or "*" in c.topics)]
        if not targets:
            return
        try:
            data_json = protocol.dumps(data)
        except (TypeError, ValueError):
            log.exception("control: event %s has data that is not JSON; not sent", event)
            return
        ts = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        for client in targets:
            client.seq += 1
            # Queued, not written: flush() sends a turn's events together.
            self._send(client, protocol.encode_event(event, client.seq, ts, data_json), flush=False)

    # -- connections -----------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        for sock in accept_pending(self._listener, lambda: len(self._clients) < MAX_CLIENTS, "control"):
            try:
                pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              _CRED.size))
            except OSError:
                sock.close()
                continue
            role = OPERATOR if uid in (0, self._uid) else VIEWER
            self._clients[sock] = _Client(sock, Peer(uid, pid, role), time.monotonic())

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self._clients.pop(client.sock, None)
        try:
            client.sock.close()
        except OSError:
            pass

    def _send(self, client: _Client, data: bytes, flush: bool = True) -> None:
        if client.closed:
            return
        if len(client.outbuf) + len(data) > MAX_OUTPUT:
            log.warning("control: dropping client uid %d pid %d: not reading (%d bytes pending)",
                           client.peer.uid, client.peer.pid, len(client.outbuf))
            self._drop(client)
            return
        client.outbuf += data
        if flush:
            self._flush(client)

    def flush(self) -> None:
        """Write out what :meth:`publish` queued: call it once per loop turn, so the
        events of one turn leave in one write per client (and wake it once)."""
        for client in [c for c in self._clients.values() if c.outbuf]:
            self._flush(client)

    def _flush(self, client: _Client) -> None:
        if client.closed:
            return
        if not send_pending(client.sock, client.outbuf):
            self._drop(client)
            return
        if client.close_after_flush and not client.outbuf and not client.pending:
            self._drop(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            # EOF. An unfinished line goes with it; answers still owed are sent
            # first: `echo REQUEST | nc -U` shuts its side down after the request.
            if client.pending or client.outbuf:
                client.close_after_flush = True
                client.inbuf.clear()
            else:
                self._drop(client)
            return
        client.inbuf += data
        now = time.monotonic()
        start = 0
        while not client.closed and not client.close_after_flush:
            end = client.inbuf.find(b"\n", start)
            if end < 0:
                break
            if end - start > protocol.MAX_LINE:
                break
            client.since = now
            self._line(client, bytes(client.inbuf[start:end]).rstrip(b"\r"))
            start = end + 1
        del client.inbuf[:start]
        if client.closed or client.close_after_flush:
            return
        newline = client.inbuf.find(b"\n")
        if (newline if newline >= 0 else len(client.inbuf)) > protocol.MAX_LINE:
            client.inbuf.clear()
            client.close_after_flush = True
            self._send(client, protocol.encode_error(
                None, protocol.TOO_LARGE, f"a line is at most {protocol.MAX_LINE} bytes"))
            self._flush(client)
            return
        if not client.inbuf:
            client.partial_since = None
        elif start > 0 or client.partial_since is None:
            client.partial_since = now

    def _expire(self, now: float) -> None:
        for client in list(self._clients.values()):
            if client.partial_since is not None and now - client.partial_since > self.line_timeout:
                self._drop(client)  # a line begun and never finished (slowloris)
            elif (client.topics is None and not client.outbuf and not client.pending
                  and now - client.since > self.idle_timeout):
                self._drop(client)  # connected, not subscribed, silent

    # -- requests --------------------------------------------------------------------
    def _line(self, client: _Client, line: bytes) -> None:
        ident: int | None = None
        command: protocol.Command | None = None
        args: dict[str, Any] = {}
        try:
            obj = protocol.parse_line(line)
            ident = protocol.request_id(obj)
            parsed = protocol.validate(obj)
            command, args = parsed.command, parsed.args
            if command.operator_only and client.peer.role != OPERATOR:
                raise ControlError(protocol.FORBIDDEN, f"{command.name} needs an operator "
                                   f"(uid 0 or {self._uid}); you are a viewer (uid {client.peer.uid})")
            args = protocol.check_args(command, args)
        except ControlError as exc:
            if command is not None:
                # Known command, refused: counted, and audited if it changes state.
                self._completed(client.peer, command.name, args, exc.code, exc.message,
                                audit=command.operator_only)
            self._send(client, protocol.encode_error(ident, exc.code, exc.message))
            return
        request = Request(self, client, parsed.id, command.name, args)
        try:
            if command.name == "hello":
                request.reply({"version": self.hello.get("version", ""), **self.hello,
                               "protocol": protocol.VERSION, "role": client.peer.role,
                               "commands": protocol.commands_for(client.peer.role),
                               "uid": client.peer.uid})
            elif command.name == "subscribe":
                topics = args.get("topics")
                client.topics = frozenset(topics) if topics is not None else frozenset({"*"})
                request.reply({**self.snapshot(), "seq": client.seq})
            elif command.name == "unsubscribe":
                client.topics = None
                request.reply({"subscribed": False})
            else:
                self.handler(request)
        except Exception:
            log.exception("control: %s failed", command.name)
            if not request.answered:
                request.fail(protocol.INTERNAL, "internal error (see the supervisor's log)")

    def _completed(self, peer: Peer, cmd: str, args: dict[str, Any], result: str, detail: str = "",
                   *, audit: bool | None = None) -> None:
        if self.on_command is not None:
            try:
                self.on_command(cmd, result)
            except Exception:
                log.exception("control: on_command failed")
        if audit is None:
            audit = protocol.COMMANDS[cmd].operator_only
        if not audit:
            return
        shown = protocol.dumps(args)
        log.info("control: uid %d pid %d %s %s -> %s%s", peer.uid, peer.pid, cmd, shown,
                    result, f" ({detail})" if detail else "")
        self.publish("audit", {"uid": peer.uid, "pid": peer.pid, "role": peer.role, "cmd": cmd,
                               "args": args, "result": result, "message": detail})
