"""What cleans up after ``mailroom demo`` when it cannot (``kill -9``, an OOM kill).

A killed demo runs no ``finally``: its supervisor, the embedded PostgreSQL (a daemon
``pg_ctl`` already detached) and its temp directory would live on for good.  Two
things make it leave nothing:

* the supervisor is started with ``PR_SET_PDEATHSIG`` = SIGTERM
  (:func:`mailroom._process.die_with_parent` as its ``preexec_fn``): the kernel stops
  it, and its workers follow it, when the demo dies;
* :func:`spawn` starts this module as a small process of its own session (Ctrl-C in the
  terminal does not reach it) that blocks on a pipe only the demo holds.  EOF on that
  pipe means the demo is gone, however it went; the watchdog then stops what is left:
  the supervisor's process group (SIGTERM, then SIGKILL after the shutdown time), the
  embedded server in the data directory, then the temp directory.  After a clean stop
  there is nothing left and it exits at once.

The demo tells it the supervisor's pid on the pipe (``supervisor PID``), so a
supervisor started later than the watchdog is known to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["spawn"]

#: How long the supervisor gets to stop on SIGTERM before its group is killed.
_SUPERVISOR_GRACE_S = 15.0

def spawn(workdir: Path, data_dir: Path) -> subprocess.Popen[bytes]:
    """Start the watchdog for a demo in ``workdir`` whose server keeps ``data_dir``;
    the demo keeps the returned process's ``stdin`` open until it is done."""
    return subprocess.Popen(
        [sys.executable, "-m", "mailroom.demo.watchdog", str(workdir), str(data_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, cwd="/")


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that may never reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop_supervisor(pid: int) -> None:
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)      # PR_SET_PDEATHSIG has usually sent it already
    deadline = time.monotonic() + _SUPERVISOR_GRACE_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Its own session: the group is the supervisor and its workers.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def clean_up(workdir: Path, data_dir: Path, supervisor: int | None) -> None:
    """Stop whatever of the demo still runs, then remove its temp directory."""
    if supervisor is not None:
        _stop_supervisor(supervisor)
    from mailroom.demo.embedded import EmbeddedPostgres, EmbeddedPostgresError

    if (data_dir / "postmaster.pid").exists():
        server = EmbeddedPostgres(data_dir)
        try:
            server.stop("fast")
        except EmbeddedPostgresError as exc:
            print(f"demo watchdog: {exc}; stopping PostgreSQL at once", file=sys.stderr)
            with contextlib.suppress(EmbeddedPostgresError):
                server.stop("immediate")
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str]) -> int:
    workdir, data_dir = Path(argv[0]), Path(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor = None
    for line in sys.stdin.buffer:         # until EOF: the demo exited or was killed
        words = line.split()
        if len(words) == 2 and words[0] == b"supervisor" and words[1].isdigit():
            supervisor = int(words[1])
    clean_up(workdir, data_dir, supervisor)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
