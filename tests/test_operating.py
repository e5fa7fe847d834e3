"""The control plane against a real supervisor: pause, drain, rate, restart, events,
metrics, and a socket hammered with bad input while a backlog drains.

Everything is real: the installed ``mailroom-supervisor`` process, PostgreSQL, the
scripted SES stub over HTTP, the Unix control socket and the /metrics listener.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
import time
import urllib.request

import pytest
from collector_util import insert_accounts, wait_for
from control_util import NOBODY, require_nobody
from prometheus_client.parser import text_string_to_metric_families
from ses_emulator import free_port
from supervisor_util import SupervisorProcess, ledger, start_operated, supervisor_env

from mailroom.control.client import ControlClient, ControlRefused


@pytest.fixture
def operated(db, base_env, stub, tmp_path):
    """Start a supervisor with a control socket (and more settings); yield a client."""
    started: list[SupervisorProcess] = []

    def start(socket_dir: str | None = None, **extra: str) -> tuple[SupervisorProcess, ControlClient]:
        path = os.path.join(socket_dir or str(tmp_path), f"ctl{len(started)}.sock")
        return start_operated(supervisor_env(base_env, db, stub.url, control_socket=path, **extra), started)

    yield start
    for sup in started:
        sup.kill()


def addresses(stub) -> collections.Counter[str]:
    return collections.Counter(a for request in stub.bulk for a in request.addresses)


def stays(predicate, seconds: float) -> bool:
    """``predicate`` holds for the whole window (a "nothing happens" observation)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.05)
    return True


def test_pause_claims_stops_the_ledger_and_resume_restarts_it(operated, db, stub):
    sup, ctl = operated()
    assert ctl.request("pause", what="claims") == {"what": "claims", "changed": True, "state": "paused"}
    assert ctl.request("pause", what="claims")["changed"] is False  # idempotent
    insert_accounts(db, 20, "p")
    # Ten batch timeouts: with claims running these would have been sent long since.
    assert stays(lambda: ledger(db).get("queued") == 20, 1.0)
    assert stub.bulk == []
    assert ctl.request("resume", what="claims")["changed"] is True
    wait_for(lambda: ledger(db).get("sent") == 20, timeout=30, what="20 sent")
    assert sup.stop() == 0


def test_shutdown_now_stops_at_once_and_exits_0_so_systemd_leaves_it_down(operated, db, stub):
    """The README's unit restarts on failure (RestartPreventExitStatus=2 3): an operator's
    `ctl shutdown --now` exited 1, and the service came back 5 s later."""
    from pgutil import console_script
    from supervisor_util import gone, run

    stub.gate.clear()                                   # a batch stays in flight
    sup, ctl = operated()
    insert_accounts(db, 3, "now")
    stub.wait_for(1, timeout=20)
    workers = [sup.worker("collector"), sup.worker("sender")]
    socket_path = sup.env["MAILROOM_CONTROL_SOCKET"]
    done = run([*console_script("mailroom"), "ctl", "--socket", socket_path, "shutdown", "--now"])
    assert (done.returncode, done.stdout.strip()) == (0, "mode: now"), done
    assert sup.proc.wait(30) == 0, sup.log()
    assert "shutdown --now: stopping at once" in sup.log()
    wait_for(lambda: gone(workers), timeout=10, what="the workers gone")
    stub.gate.set()
    assert ledger(db) == {"claimed": 3}                 # queued again when the lease expires


def test_no_claim_arrives_after_a_drain_said_drained(operated, db, stub):
    """Tokens keep coming while an operator drains: a claim the collector committed just
    before it read the pause reached the supervisor after "drained" (8 drains in 40)."""
    sup, ctl = operated()
    stop = threading.Event()

    def feed() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            insert_accounts(db, 1, f"feed{n}_")
            time.sleep(0.003)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    ctl.subscribe(["batch"])
    late: list[str] = []
    try:
        for _ in range(25):
            assert ctl.request("drain", timeout_s=30)["drained"] is True
            # The events read up to the drain's answer; those read while asking to
            # resume came between "drained" and the resume.
            ctl._events.clear()
            time.sleep(0.1)
            ctl.request("resume", what="claims")
            late += [e["data"]["batch"] for e in ctl._events if e["event"] == "batch.claimed"]
    finally:
        stop.set()
        feeder.join()
    assert late == []
    assert sup.stop() == 0


def test_pause_sending_past_the_lease_sends_nothing_twice(operated, db, stub):
    sup, ctl = operated(claim_timeout="2000", batch_limit="5")
    ctl.request("pause", what="sending")
    insert_accounts(db, 15, "h")
    wait_for(lambda: ledger(db).get("claimed", 0) > 0, what="batches claimed and held")
    # Held longer than a lease: held batches must go back before they expire.
    assert stays(lambda: stub.bulk == [], 3.0)
    ctl.request("resume", what="sending")
    wait_for(lambda: ledger(db).get("sent") == 15, timeout=30, what="15 sent")
    assert sup.stop() == 0
    sent = addresses(stub)
    assert len(sent) == 15 and set(sent.values()) == {1}


def test_drain_returns_when_nothing_is_in_flight(operated, db, stub):
    sup, ctl = operated()
    stub.gate.clear()  # SES holds the calls until we say
    insert_accounts(db, 5, "d")
    stub.wait_for(1)
    threading.Timer(0.5, stub.gate.set).start()
    result = ctl.request("drain", timeout_s=30)
    assert result["drained"] is True and result["waited_s"] > 0
    assert ledger(db).get("sent") == 5
    assert ctl.request("status")["state"] == "paused"  # claims stay paused after a drain
    assert sup.stop() == 0


@pytest.mark.timing
def test_set_rate_holds_the_measured_rate(operated, db, stub):
    # Enough claimed ahead that the sender, not the collector, sets the pace.
    sup, ctl = operated(ses_max_send_rate="10000", batch_limit="5", max_in_flight="16")
    assert ctl.request("set_rate", per_second=50)["per_second"] == 50
    insert_accounts(db, 300, "r")
    wait_for(lambda: ledger(db).get("sent") == 300, timeout=60, what="300 sent")
    # The bucket allows a burst of one second's worth after an idle spell (its
    # documented behaviour, and the pipeline idles once while it fills): measure
    # the steady rate, from 1.5 s after the first call.
    calls = stub.bulk
    start = next(i for i, call in enumerate(calls) if call.time >= calls[0].time + 1.5)
    # Each call waits for the tokens of the one before it: between the first and
    # the last call measured, the calls paid for are those from the first up to
    # the one before the last (the sender fills calls from several batches, so
    # their sizes differ and the off-by-one matters).
    sent = sum(len(call.addresses) for call in calls[start:-1])
    rate = sent / (calls[-1].time - calls[start].time)
    assert 45 <= rate <= 55, rate
    assert sup.stop() == 0


def test_restart_sender_loses_nothing(operated, db, stub):
    sup, ctl = operated(batch_limit="10")
    first = sup.worker("sender")
    insert_accounts(db, 60, "s")
    ctl.request("restart", worker="sender")
    wait_for(lambda: len(sup.started("sender")) == 2, timeout=30, what="a new sender")
    insert_accounts(db, 60, "t")
    wait_for(lambda: ledger(db).get("sent") == 120, timeout=60, what="120 sent")
    assert sup.worker("sender") != first
    assert sup.stop() == 0
    sent = addresses(stub)
    assert len(sent) == 120 and set(sent.values()) == {1}


def test_events_arrive_in_seq_order_and_metrics_match_the_ledger(operated, db, stub):
    port = free_port()
    sup, ctl = operated(metrics_addr=f"127.0.0.1:{port}", batch_limit="10")
    snapshot = ctl.subscribe()
    assert snapshot["state"] == "running"
    insert_accounts(db, 40, "e")
    done, seqs = 0, []
    for event in ctl.events():
        seqs.append(event["seq"])
        if event["event"] == "batch.done":
            done += event["data"]["sent"]
        if done == 40:
            break
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    wait_for(lambda: ledger(db).get("sent") == 40, what="40 sent")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    sent = sum(sample.value for family in text_string_to_metric_families(body)
               for sample in family.samples
               if sample.name == "mailroom_deliveries_total" and sample.labels.get("outcome") == "sent")
    assert sent == ledger(db)["sent"] == 40
    assert sup.stop() == 0


def test_a_second_supervisor_on_the_same_socket_exits_2(operated, db, base_env, stub, tmp_path):
    operated()
    env = supervisor_env(base_env, db, stub.url, control_socket=str(tmp_path / "ctl0.sock"))
    second = SupervisorProcess(env)
    try:
        assert second.proc.wait(30) == 2
    finally:
        second.kill()
    errors = [line for line in second.log().splitlines() if "[SUP]" in line and "in use" in line]
    assert len(errors) == 1, second.log()


def _raw(path: str, payload: bytes, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server that refused a too-large line closes while we write it
        if not read:
            return b""
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data


def test_bad_requests_while_a_backlog_drains(operated, db, stub, tmp_path):
    insert_accounts(db, 400, "b")
    sup, ctl = operated(batch_limit="10")
    path = str(tmp_path / "ctl0.sock")
    answers = {
        "parse_error": _raw(path, b"not json\n"),
        "not utf-8": _raw(path, b"\xff\xfe{}\n"),
        "not an object": _raw(path, b"[1, 2]\n"),
        "unknown": _raw(path, b'{"v":1,"id":1,"cmd":"explode","args":{}}\n'),
        "types": _raw(path, b'{"v":1,"id":2,"cmd":"set_rate","args":{"per_second":"fast"}}\n'),
        "extra": _raw(path, b'{"v":1,"id":3,"cmd":"status","args":{},"x":1}\n'),
        "too large": _raw(path, b"x" * (10 << 20) + b"\n"),
    }
    codes = {name: json.loads(reply)["error"]["code"] for name, reply in answers.items() if reply}
    assert codes["parse_error"] == "parse_error" and codes["not utf-8"] == "parse_error"
    assert codes["not an object"] == "invalid_request" and codes["unknown"] == "unknown_command"
    assert codes["types"] == "invalid_args" and codes["extra"] == "invalid_request"
    assert codes["too large"] == "too_large"
    _raw(path, b"", read=False)  # connects and says nothing
    _raw(path, b'{"v":1,"id":4,"cmd":"sta', read=False)  # hangs up mid-line
    many = []
    for _ in range(200):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        many.append(sock)
    try:
        assert ctl.request("status")["state"] == "running"
    finally:
        for sock in many:
            sock.close()
    wait_for(lambda: ledger(db).get("sent") == 400, timeout=90, what="the backlog sent")
    assert sup.stop() == 0
    sent = addresses(stub)
    assert len(sent) == 400 and set(sent.values()) == {1}


def test_a_viewer_cannot_change_state(operated, db, stub):
    import shutil
    import subprocess
    import sys
    import tempfile

    require_nobody("from mailroom.control.client import ControlClient")
    # pytest's own tmp_path is 0700 under root: another uid could not reach it.
    where = tempfile.mkdtemp(prefix="mailroom-viewer-")
    os.chmod(where, 0o711)
    sup, ctl = operated(socket_dir=where, control_group="nogroup")
    path = os.path.join(where, "ctl0.sock")
    code = ("import sys; from mailroom.control.client import ControlClient, ControlRefused\n"
            "c = ControlClient(sys.argv[1]); c.connect()\n"
            "try:\n    c.request('pause', what='claims'); print('accepted')\n"
            "except ControlRefused as e:\n    print(e.code)\n")
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=30,
                          user=NOBODY, group="nogroup", extra_groups=[], env={"PATH": os.environ["PATH"]})
    assert done.stdout.strip() == "forbidden", done.stderr
    assert ctl.request("status")["paused"] == {"claims": False, "sending": False}
    with pytest.raises(ControlRefused):
        ctl.request("batch", id="nope")
    assert sup.stop() == 0
    shutil.rmtree(where, ignore_errors=True)


def test_the_supervisor_joins_the_fleet_and_leaves_it_at_a_clean_exit(operated, db, stub):
    import psycopg

    from mailroom.ledger import fleet

    sup, ctl = operated()

    def members() -> list[dict]:
        with psycopg.connect(db, autocommit=True) as conn:
            return fleet.consumers(conn, "mailroom")

    wait_for(lambda: [m["pid"] for m in members()] == [sup.proc.pid], what="this supervisor in the fleet")
    assert members()[0]["host"] == socket.gethostname() and not members()[0]["stale"]
    assert sup.stop() == 0
    assert members() == []


def test_sighup_restarts_both_workers_and_loses_nothing(operated, db, stub):
    import signal

    sup, ctl = operated(batch_limit="10")
    old = {role: sup.worker(role) for role in ("collector", "sender")}
    insert_accounts(db, 60, "first")
    sup.signal(signal.SIGHUP)
    wait_for(lambda: all(len(sup.started(role)) == 2 for role in old), timeout=30, what="both workers anew")
    insert_accounts(db, 60, "second")
    wait_for(lambda: ledger(db).get("sent") == 120, timeout=60, what="120 sent")
    assert sup.proc.poll() is None  # SIGHUP no longer kills the supervisor (exit 129)
    assert {role: sup.worker(role) for role in old} != old
    assert sup.stop() == 0
    sent = addresses(stub)
    assert len(sent) == 120 and set(sent.values()) == {1}


def _scrape(port: int) -> dict[str, dict[tuple, float]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _top(port: int, name: str) -> float:
    """The largest value of a series across its labels (0 when it has none)."""
    return max(_scrape(port).get(name, {}).values(), default=0.0)


def test_every_metric_moves_when_work_happens(operated, db, stub):
    """OPERATIONS.md 3: every series is fed by the running system, none only by tests."""
    port = free_port()
    sup, ctl = operated(metrics_addr=f"127.0.0.1:{port}", batch_limit="5", claim_timeout="60000")
    # Queued, not claimed: the queue gauges and the claims pause.
    ctl.request("pause", what="claims")
    insert_accounts(db, 20, "m")
    wait_for(lambda: _top(port, "mailroom_queue_depth") == 20
             and _top(port, "mailroom_oldest_queued_timestamp_seconds") > time.time() - 600,
             timeout=30, what="the queue gauges")
    # Claimed, not sent: batches in flight and the sending pause.
    ctl.request("pause", what="sending")
    ctl.request("resume", what="claims")
    wait_for(lambda: _top(port, "mailroom_in_flight_batches") > 0, timeout=30, what="batches in flight")
    m = _scrape(port)
    assert m["mailroom_paused"][(("what", "sending"),)] == 1
    ctl.request("resume", what="sending")
    wait_for(lambda: ledger(db).get("sent") == 20, timeout=30, what="20 sent")
    # A fresh sender reads the quota again (SentLast24Hours now counts ours).
    ctl.request("restart", worker="sender")
    wait_for(lambda: _top(port, "mailroom_worker_restarts_total") == 1, timeout=30, what="a restart")
    wait_for(lambda: _top(port, "mailroom_ses_max_24h_send") > 0, timeout=30, what="the SES quota")
    m = _scrape(port)
    d = m["mailroom_deliveries_total"]
    assert d[(("action", "activation"), ("outcome", "sent"))] == 20
    assert m["mailroom_batches_total"][(("result", "done"),)] >= 4
    assert sum(m["mailroom_batch_rows_sum"].values()) == 20
    assert m["mailroom_batch_duration_seconds_count"][()] >= 4
    # Fed from the sender's heartbeats: each SendBulkTemplatedEmail, by result.
    calls = len(stub.bulk)
    assert m["mailroom_ses_requests_total"][(("result", "ok"),)] == calls > 0
    assert m["mailroom_ses_request_duration_seconds_count"][()] == calls
    # Fed from the collector's RECORD: token created -> SES accepted, one per email.
    latency = m["mailroom_delivery_latency_seconds_count"]
    assert latency[(("action", "activation"),)] == 20
    assert 0 < m["mailroom_delivery_latency_seconds_sum"][(("action", "activation"),)] < 20 * 600
    assert m["mailroom_control_commands_total"][(("cmd", "pause"), ("result", "ok"))] == 2
    restarts = m["mailroom_worker_restarts_total"]
    assert restarts[(("reason", "planned"), ("worker", "sender"))] == 1  # ctl restart: planned
    assert restarts[(("reason", "crash"), ("worker", "sender"))] == 0
    up = m["mailroom_worker_up"]
    assert up[(("worker", "collector"),)] == up[(("worker", "sender"),)] == 1
    assert m["mailroom_send_rate_limit"][()] == 100000
    assert m["mailroom_ses_max_send_rate"][()] > 0
    assert m["mailroom_build_info"] and set(m["mailroom_build_info"].values()) == {1}
    # Nothing left: the gauges of work in progress are back at 0.
    wait_for(lambda: _top(port, "mailroom_in_flight_batches") == 0 and _top(port, "mailroom_queue_depth") == 0,
             timeout=10, what="nothing queued or in flight")
    assert sup.stop() == 0
