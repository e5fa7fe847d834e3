"""The watchdog says where a worker hung, and a failing supervisor leaves no orphans.

Real ``mailroom-supervisor`` processes and real signals: a collector that hangs in
its database connection (a server that accepts and never answers) is silent, so the
watchdog asks for its stack (SIGUSR1, faulthandler), kills it and starts another.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
from collector_util import insert_accounts, pid_alive, wait_for
from supervisor_util import gone, ledger, supervisor_env


@pytest.fixture
def unanswering_database():
    """A PostgreSQL URL whose server completes the TCP handshake and then says nothing:
    a connection attempt hangs there until its own timeout (10 s for the collector)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # never accepted: the kernel answers the handshake
        yield f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/none"


def test_a_hung_worker_leaves_its_stack_in_the_log_then_is_killed_and_restarted(
        unanswering_database, base_env, supervisors, stub):
    sup = supervisors(supervisor_env(base_env, unanswering_database, stub.url, worker_timeout=3000))
    first = sup.worker("collector")
    wait_for(lambda: len(sup.started("collector")) >= 2, timeout=30, what="a second collector")
    log = sup.log()
    silent = log.index(f"collector worker (pid {first}) silent for")
    # faulthandler's dump: a header per thread, then the frames, innermost first.
    dump = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$", re.M)
    header = dump.search(log, silent)
    assert header is not None, log
    frames = log[header.end():log.index("killing the silent collector", silent)]
    # The line it hung on: inside psycopg's connection attempt, called by the collector.
    assert re.search(r'File ".*/psycopg/[^"]+", line \d+ in', frames), frames
    assert re.search(r'File ".*/mailroom/collector/engine\.py", line \d+ in', frames), frames
    exited = log.index(f"collector worker (pid {first}) exited: killed by SIGKILL; restarting")
    assert silent < header.start() < exited
    assert not pid_alive(first)
    assert sup.stop() == 0


# The supervisor's loop with a bug planted where a real signal reaches it: SIGHUP.
# Everything else is the installed supervisor (console script entry point).
_FAULTY_SUPERVISOR = """
import sys
from mailroom.cli import supervisor_main
from mailroom.supervisor.arbiter import Supervisor

def handle_hup(self):
    raise RuntimeError("a bug in the supervisor's loop")

Supervisor.handle_hup = handle_hup
sys.argv = ["mailroom-supervisor"]
supervisor_main()
"""


def test_an_error_in_the_supervisors_loop_stops_the_workers_in_order_and_exits_1(
        db, base_env, stub):
    env = supervisor_env(base_env, db, stub.url, batch_limit=20)
    logfile = tempfile.NamedTemporaryFile(prefix="mailroom-faulty-", suffix=".log")
    proc = subprocess.Popen([sys.executable, "-c", _FAULTY_SUPERVISOR], env=env,
                            stdout=subprocess.DEVNULL, stderr=logfile)

    def log() -> str:
        with open(logfile.name, "rb") as f:
            return f.read().decode(errors="replace")

    def started(role: str) -> list[int]:
        return [int(pid) for pid in re.findall(rf"{role} worker started \(pid (\d+)\)", log())]

    try:
        wait_for(lambda: started("collector") and started("sender"), what="both workers")
        insert_accounts(db, 20, "before_")
        wait_for(lambda: ledger(db).get("sent") == 20, timeout=30, what="20 sent")
        workers = started("collector") + started("sender")
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log()
    assert "unexpected error in the supervisor; stopping the workers" in text
    assert "RuntimeError: a bug in the supervisor's loop" in text
    sender_stopped = text.index(f"sender worker (pid {started('sender')[-1]}) stopped")
    collector_stopped = text.index(f"collector worker (pid {started('collector')[-1]}) stopped")
    assert sender_stopped < collector_stopped  # the staged stop's order
    assert gone(workers)
    assert not os.path.exists(env["MAILROOM_CONTROL_SOCKET"])
