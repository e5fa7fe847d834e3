"""Test plumbing for the control plane: a ControlServer driven by a small loop in a
background thread (the supervisor drives it from its own main loop; a test needs
its own), a scripted handler, and raw socket clients."""

from __future__ import annotations

import functools
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from mailroom.control import protocol
from mailroom.control.server import ControlServer, Request

#: The uid and gid the viewer tests run a client as (``nobody`` / ``nogroup``).
NOBODY = 65534


@functools.cache
def nobody_cannot_run(python: str = sys.executable, code: str = "import mailroom") -> str | None:
    """Why uid ``nobody`` cannot run ``code`` with ``python``, or None when it can.

    The viewer tests start a client as ``nobody``.  Where the interpreter or the
    checkout lives under a directory other users cannot traverse (a virtualenv in a
    0700 home, say), that client cannot even start: the test would fail for a reason
    that is the machine's, not the code's.  One quick run as ``nobody`` tells.
    """
    if os.geteuid() != 0:
        return "running a client as user nobody needs root"

    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    try:
        done = subprocess.run([python, "-c", code], preexec_fn=drop, capture_output=True, text=True,
                              timeout=30, cwd="/", env={"PATH": os.environ.get("PATH", "")})
    except OSError as exc:
        return f"user nobody cannot execute {python}: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return f"user nobody cannot run {python} -c {code!r}: {last}"
    return None


def require_nobody(code: str = "import mailroom") -> None:
    """Skip the test, with the reason, when uid ``nobody`` cannot run ``code`` here."""
    reason = nobody_cannot_run(sys.executable, code)
    if reason:
        pytest.skip(reason)


class Handler:
    """What a supervisor's handler does, scripted: a few commands answer at once,
    ``drain`` is kept for the test to answer, ``batches`` raises (-> internal)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.kept: queue.Queue[Request] = queue.Queue()
        self.paused: set[str] = set()

    def __call__(self, request: Request) -> None:
        self.requests.append(request)
        if request.cmd == "status":
            request.reply({"state": "paused" if self.paused else "running", "in_flight": 0})
        elif request.cmd in ("pause", "resume"):
            what = request.args["what"]
            changed = (what not in self.paused) == (request.cmd == "pause")
            (self.paused.add if request.cmd == "pause" else self.paused.discard)(what)
            request.reply({"what": what, "changed": changed})
        elif request.cmd == "drain":
            self.kept.put(request)
        elif request.cmd == "batch":
            request.fail(protocol.NOT_FOUND, f"no batch {request.args['id']}")
        elif request.cmd == "batches":
            raise RuntimeError("secret internal detail")
        elif request.cmd == "shutdown":
            request.fail(protocol.INVALID_STATE, "already stopping")
        else:
            request.reply({"ok": True, "args": request.args})


class LoopThread:
    """Runs ``select`` + ``service`` like the supervisor's loop; :meth:`call` runs a
    function inside the loop (the server is not thread-safe, as in the supervisor)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._calls: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoopThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self.thread.join(10)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def call(self, fn: Callable[[], Any]) -> Any:
        done: queue.Queue[Any] = queue.Queue()
        self._calls.put((fn, done))
        os.write(self._wake_w, b"x")
        ok, value = done.get(timeout=10)
        if not ok:
            raise value
        return value

    def _run(self) -> None:
        while not self._stop:
            readable, writable, _ = select.select([*self.server.readers(), self._wake_r],
                                                  self.server.writers(), [], 0.1)
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            while not self._calls.empty():
                fn, done = self._calls.get()
                try:
                    done.put((True, fn()))
                except Exception as exc:  # noqa: BLE001 - handed back to the test
                    done.put((False, exc))
            self.server.service(set(readable), set(writable))


def make_server(path: str, handler: Handler | None = None, **kw: Any) -> ControlServer:
    return ControlServer(path, kw.pop("group", None), handler or Handler(),
                         kw.pop("snapshot", lambda: {"state": "running", "batches": []}),
                         {"version": "test", "pid": os.getpid()}, **kw)


class Raw:
    """A raw client: send bytes, read reply lines."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: waits for room in a full backlog
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, obj: Any) -> dict[str, Any]:
        self.send(json.dumps(obj).encode() + b"\n")
        return self.line()

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def closed(self) -> bool:
        """True when the server closed the connection (EOF, after any pending lines)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
