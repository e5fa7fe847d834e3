"""Helpers for tests that run the real ``mailroom-supervisor`` as a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import psycopg
import pytest
from collector_util import pid_alive, wait_for
from pgutil import SECRET_KEY_HEX, console_script
from ses_emulator import AWS_ENV, SOURCE

from mailroom.control.client import ControlClient

_STARTED = re.compile(r"(collector|sender|events) worker started \(pid (\d+)\)")


class SupervisorProcess:
    """A running ``mailroom-supervisor`` with its log in a file."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env  # for clients that need its socket or database
        self.logfile = tempfile.NamedTemporaryFile(prefix="mailroom-supervisor-", suffix=".log")
        self.proc = subprocess.Popen(console_script("mailroom-supervisor"), env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.logfile)

    def log(self) -> str:
        with open(self.logfile.name, "rb") as f:
            return f.read().decode(errors="replace")

    def started(self, role: str) -> list[int]:
        """Pids of every ``role`` worker started so far, oldest first."""
        return [int(pid) for r, pid in _STARTED.findall(self.log()) if r == role]

    def worker(self, role: str) -> int:
        """Pid of the current ``role`` worker, once it is up."""
        return wait_for(lambda: self.started(role) and pid_alive(self.started(role)[-1])
                        and self.started(role)[-1], what=f"{role} worker")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for role in ("collector", "sender", "events"):
            for pid in self.started(role):
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)


def supervisor_env(base: dict[str, str], url: str, ses_url: str, **extra) -> dict[str, str]:
    env = dict(base, **AWS_ENV, MAILROOM_DATABASE_URL=url, MAILROOM_SES_ENDPOINT_URL=ses_url,
               MAILROOM_SES_SOURCE=SOURCE, MAILROOM_BATCH_TIMEOUT="100",
               # moto's GetSendQuota says 1 recipient/s: the tests are not about the rate.
               MAILROOM_SES_MAX_SEND_RATE="100000",
               MAILROOM_SES_OUTPUT_PATH=tempfile.mkdtemp(prefix="mailroom-output-"),
               # Each supervisor its own socket: tests run side by side (xdist).
               MAILROOM_CONTROL_SOCKET=os.path.join(tempfile.mkdtemp(prefix="mr-"), "c.sock"))
    env.update({f"MAILROOM_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def control_answers(path: str) -> bool:
    """Whether a supervisor's control socket at ``path`` takes a connection yet."""
    try:
        with ControlClient(path, timeout=2) as client:
            client.connect()
            return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def start_operated(env: dict[str, str], started: list[SupervisorProcess]) -> tuple[SupervisorProcess, ControlClient]:
    """Start ``mailroom-supervisor`` with ``env`` (added to ``started`` at once, so a
    fixture kills it even when its socket never answers) and a client connected to its
    control socket (``MAILROOM_CONTROL_SOCKET``)."""
    path = env["MAILROOM_CONTROL_SOCKET"]
    sup = SupervisorProcess(env)
    started.append(sup)
    wait_for(lambda: control_answers(path), timeout=30, what="the control socket")
    client = ControlClient(path, timeout=30)
    client.connect()
    return sup, client


def ledger(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT status::text, count(*) FROM deliveries GROUP BY 1").fetchall())


def gone(pids: list[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


# --- fixtures (a plugin for tests/: tests/conftest.py lists this module) -----------

@pytest.fixture
def base_env() -> Iterator[dict[str, str]]:
    """Environment for a mailroom subprocess: the caller's, minus MAILROOM_* settings.

    Each test gets a control socket of its own: supervisors of parallel tests
    serve the same queue, and the default path is one per queue and user (a
    second supervisor there exits 2, as it should on a real host).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_") or k == "MAILROOM_IMPL"}
    env["MAILROOM_SECRET_KEY"] = SECRET_KEY_HEX
    env["PYTHONUNBUFFERED"] = "1"
    where = tempfile.mkdtemp(prefix="mailroom-ctl-")
    env["MAILROOM_CONTROL_SOCKET"] = os.path.join(where, "control.sock")
    yield env
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def supervisors() -> Iterator[Callable[[dict[str, str]], SupervisorProcess]]:
    """Start ``mailroom-supervisor`` processes (``supervisors(env)``); all killed at the end."""
    started: list[SupervisorProcess] = []

    def start(env: dict[str, str]) -> SupervisorProcess:
        sup = SupervisorProcess(env)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.kill()
