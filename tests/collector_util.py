"""Helpers for tests that run the real ``mailroom-collector`` as a subprocess."""

from __future__ import annotations

import queue
import signal
import subprocess
import tempfile
import threading
import time

import psycopg
from pgutil import console_script


class CollectorProcess:
    """A running ``mailroom-collector`` whose stdout lines are collected by a thread."""

    def __init__(self, env: dict[str, str]) -> None:
        # Read back through a separate open(): seeking the child's own file
        # description would move its write offset and overwrite the log.
        self.stderr = tempfile.NamedTemporaryFile(prefix="mailroom-collector-", suffix=".log")
        self.proc = subprocess.Popen(console_script("mailroom-collector"), env=env,
                                     stdout=subprocess.PIPE, stderr=self.stderr)
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.all_lines: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # A quoted field may hold a newline: a batch ends at a newline outside
        # quotes, i.e. once the batch's count of '"' is even.
        assert self.proc.stdout is not None
        pending = b""
        for line in self.proc.stdout:
            pending += line
            if pending.count(b'"') % 2 == 0:
                self.lines.put(pending)
                pending = b""

    def take(self, rows: int, timeout: float = 30.0, decode=None) -> list[bytes]:
        """Wait until lines holding ``rows`` rows in all have arrived; return them."""
        from mailroom.wire import decode_line

        decode = decode or decode_line
        got: list[bytes] = []
        count = 0
        deadline = time.monotonic() + timeout
        while count < rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {count} of {rows} rows arrived; stderr:\n{self.log()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            got.append(line)
            self.all_lines.append(line)
            count += len(decode(line))
        return got

    def quiet(self, seconds: float) -> list[bytes]:
        """Lines that arrive within ``seconds`` (expected: none)."""
        extra = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                extra.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                break
        return extra

    def log(self) -> str:
        with open(self.stderr.name, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        while not self.lines.empty():
            self.all_lines.append(self.lines.get())
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def backend_pids(url: str, application: str = "mailroom-collector") -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                            " AND datname = current_database()",
                            (application,)).fetchall()
    return [r[0] for r in rows]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def insert_accounts(url: str, n: int, prefix: str, status: str = "provisioned") -> None:
    """Insert ``n`` accounts in one transaction (one folded NOTIFY)."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO accounts (email, login, status)"
            " SELECT %s || i || '@example.test', %s || i, %s::account_status"
            " FROM generate_series(1, %s) AS i",
            (prefix, prefix, status, n),
        )


def collector_env(base: dict[str, str], url: str, **extra: str) -> dict[str, str]:
    env = dict(base, MAILROOM_DATABASE_URL=url, MAILROOM_BATCH_TIMEOUT="200")
    env.update({f"MAILROOM_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")
