"""Clients of the control socket (sync, asyncio, ``mailroom ctl``) and the metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest
from control_util import Handler, LoopThread, make_server
from prometheus_client.parser import text_string_to_metric_families

from mailroom.control import protocol
from mailroom.control.client import AsyncControlClient, ControlClient, ControlRefused, ControlUnavailable
from mailroom.control.metrics import OUTCOME_LABELS, Metrics, MetricsServer
from mailroom.control.server import ControlServer
from mailroom.vocabulary import Action, OutcomeKind


@pytest.fixture
def running() -> Iterator[tuple[ControlServer, Handler, LoopThread, str]]:
    with tempfile.TemporaryDirectory(prefix="mailroom-cl-") as directory:
        path = os.path.join(directory, "c.sock")
        handler = Handler()
        srv = make_server(path, handler)
        srv.start()
        with LoopThread(srv) as loop:
            yield srv, handler, loop, path
        srv.close()


def test_sync_client_requests_refusals_and_events(running):
    srv, handler, loop, path = running
    with ControlClient(path, timeout=10) as client:
        assert client.hello()["role"] == "operator"
        assert client.request("pause", what="claims") == {"what": "claims", "changed": True}
        with pytest.raises(ControlRefused) as info:
            client.request("batch", id="nope")
        assert info.value.code == "not_found" and "nope" in info.value.message
        snapshot = client.subscribe(["state"])
        assert snapshot["state"] == "running"
        loop.call(lambda: srv.publish("state.changed", {"state": "paused"}))
        loop.call(lambda: srv.publish("tick", {}))  # not subscribed: never arrives
        loop.call(lambda: srv.publish("state.changed", {"state": "running"}))
        assert client.request("status")["state"] == "paused"  # events read meanwhile are kept
        loop.call(lambda: srv.close())
        events = list(client.events())  # ends when the server closes
    assert [(e["seq"], e["data"]["state"]) for e in events] == [(1, "paused"), (2, "running")]


def test_sync_client_unavailable(tmp_path):
    with pytest.raises(ControlUnavailable, match="No such file"):
        ControlClient(str(tmp_path / "none.sock")).request("status")


def test_async_client_contract(running):
    srv, handler, loop, path = running

    async def scenario() -> None:
        client = AsyncControlClient(path)
        hello = await client.connect()
        assert {"version", "protocol", "role", "commands"} <= set(hello)
        snapshot = await client.subscribe()
        assert snapshot["seq"] == 0
        # Overlapping requests are matched by id.
        a, b = await asyncio.gather(client.request("status"), client.request("set_rate", per_second=5))
        assert a["state"] == "running" and b["args"] == {"per_second": 5}
        with pytest.raises(ControlRefused) as info:
            await client.request("restart", worker="nobody")
        assert info.value.code == "invalid_args"
        await asyncio.to_thread(loop.call, lambda: [srv.publish("batch.done", {"n": n}) for n in range(3)])
        await asyncio.to_thread(loop.call, srv.close)
        seen = [e async for e in client.events()]  # ends when the socket closes
        assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
        audits = [(e["data"]["cmd"], e["data"]["result"]) for e in seen if e["event"] == "audit"]
        assert audits == [("set_rate", "ok"), ("restart", "invalid_args")]
        done = [(e["event"], e["data"]["n"]) for e in seen if e["event"] != "audit"]
        assert done == [("batch.done", i) for i in range(3)]
        with pytest.raises(ControlUnavailable):
            await client.request("status")
        await client.close()
        with pytest.raises(ControlUnavailable):
            await AsyncControlClient(path).connect()

    asyncio.run(scenario())


def test_async_client_pending_request_fails_when_closed(running):
    srv, handler, loop, path = running

    async def scenario() -> None:
        client = AsyncControlClient(path)
        await client.connect()
        pending = asyncio.ensure_future(client.request("drain"))  # the handler keeps it
        await asyncio.to_thread(handler.kept.get, True, 10)
        await client.close()
        with pytest.raises(ControlUnavailable):
            await pending

    asyncio.run(scenario())


def ctl(path: str | None, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mailroom.cli", "ctl", *(["--socket", path] if path else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env or dict(os.environ))


def test_ctl_exit_codes(running):
    srv, handler, loop, path = running
    ok = ctl(path, "pause", "claims")
    assert (ok.returncode, ok.stdout.strip(), ok.stderr) == (0, "pause claims: done", "")
    raw = ctl(path, "--json", "status")
    assert raw.returncode == 0 and json.loads(raw.stdout) == {"state": "paused", "in_flight": 0}
    refused = ctl(path, "shutdown", "--now")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "invalid_state" in refused.stderr
    usage = ctl(path, "frobnicate")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and usage.stdout == ""
    bad = ctl(path, "set-rate", "fast")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    # Numbers the protocol refuses are usage errors here, not tracebacks from the client.
    for args in (("set-rate", "nan"), ("set-rate", "-1"), ("set-rate", "inf"), ("drain", "--timeout=-20"),
                 ("drain", "--timeout", "nan"), ("drain", "--timeout", "1e300")):
        refused_here = ctl(path, *args)
        assert (refused_here.returncode, refused_here.stdout) == (2, ""), (args, refused_here.stderr)
        assert refused_here.stderr.count("\n") == 1 and "must be above 0" in refused_here.stderr, refused_here.stderr
    gone = ctl(path + ".missing", "status")
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1 and "cannot connect" in gone.stderr
    off = ctl(None, "status", env=dict(os.environ, MAILROOM_CONTROL_SOCKET="off"))
    assert off.returncode == 2 and "off" in off.stderr
    assert [r.cmd for r in handler.requests] == ["pause", "status", "shutdown"]
    assert handler.requests[2].args == {"mode": "now"}


def test_ctl_finds_the_socket_from_the_environment(running):
    srv, handler, loop, path = running
    done = ctl(None, "--json", "set-rate", "50", env=dict(os.environ, MAILROOM_CONTROL_SOCKET=path))
    assert done.returncode == 0 and json.loads(done.stdout)["args"] == {"per_second": 50.0}


def test_ctl_subscribe_prints_json_lines(running):
    srv, handler, loop, path = running
    proc = subprocess.Popen([sys.executable, "-m", "mailroom.cli", "ctl", "--socket", path, "subscribe",
                             "--topic", "batch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not loop.call(lambda: any(c.topics for c in srv._clients.values())):
            assert proc.poll() is None and time.monotonic() < deadline, "ctl subscribe never subscribed"
        loop.call(lambda: srv.publish("batch.claimed", {"rows": 3}))
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "batch.claimed" and line["seq"] == 1 and line["data"] == {"rows": 3}
    finally:
        proc.terminate()
        proc.wait(10)


# -- metrics -----------------------------------------------------------------------

def families(text: str) -> dict[str, dict[tuple, float]]:
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_every_metric_of_the_list_with_known_labels_at_zero():
    m = families(Metrics(impl="c").render().decode())
    for name in ("mailroom_deliveries_total", "mailroom_batches_total", "mailroom_ses_requests_total",
                 "mailroom_worker_restarts_total", "mailroom_control_commands_total",
                 "mailroom_ses_request_duration_seconds_count", "mailroom_batch_duration_seconds_count",
                 "mailroom_delivery_latency_seconds_count", "mailroom_batch_rows_count",
                 "mailroom_in_flight_batches", "mailroom_queue_depth", "mailroom_oldest_queued_timestamp_seconds",
                 "mailroom_send_rate_limit", "mailroom_ses_max_send_rate", "mailroom_ses_sent_last_24h",
                 "mailroom_ses_max_24h_send", "mailroom_paused", "mailroom_worker_up", "mailroom_build_info"):
        assert name in m, name
    deliveries = m["mailroom_deliveries_total"]
    # Every action with every outcome label some OutcomeKind maps to: a new kind or
    # action in the vocabulary changes what is expected here, not a count to edit.
    expected = {(("action", a.db_name), ("outcome", OUTCOME_LABELS[k])) for a in Action for k in OutcomeKind}
    assert set(deliveries) == expected and set(deliveries.values()) == {0.0}
    assert (("action", "password_recovery"), ("outcome", "retried")) in deliveries
    assert m["mailroom_build_info"] == {(("impl", "c"), ("version", "0.1.0")): 1.0}
    assert set(m["mailroom_paused"]) == {(("what", "claims"),), (("what", "sending"),), (("what", "ses"),)}


def test_metrics_move():
    metrics = Metrics()
    A, R, K = Action.ACTIVATION, Action.RECOVERY, OutcomeKind
    metrics.batch_done(Counter({(A, K.SENT): 6, (A, K.EMITTED): 1, (A, K.FAILED): 1, (A, K.RETRY): 1,
                                (A, K.SKIPPED): 1}), 0.5)
    metrics.batch_done(Counter({(R, K.FAILED): 4}), 0.2)
    metrics.batch_done(Counter({(A, K.SENT): 1, (R, K.SENT): 2}), 0.1)
    metrics.ses_request("ok", 0.05)
    metrics.ses_request("throttled", 0.01)
    metrics.delivery_latency("activation", 1.5)
    metrics.worker_restarted("sender", "crash")
    metrics.command("pause", "ok")
    metrics.command("pause", "forbidden")
    metrics.set_gauges(in_flight=2, queue_depth=1234, paused={"claims": True}, worker_up={"sender": True})
    m = families(metrics.render().decode())
    d = m["mailroom_deliveries_total"]
    assert d[(("action", "activation"), ("outcome", "sent"))] == 8
    assert d[(("action", "password_recovery"), ("outcome", "failed"))] == 4
    assert d[(("action", "password_recovery"), ("outcome", "sent"))] == 2
    assert sum(v for k, v in d.items() if ("outcome", "sent") in k) == 10
    assert m["mailroom_batches_total"] == {(("result", "done"),): 1, (("result", "partial"),): 1,
                                           (("result", "failed"),): 1, (("result", "released"),): 0}
    metrics.batch_released()
    assert families(metrics.render().decode())["mailroom_batches_total"][(("result", "released"),)] == 1
    assert m["mailroom_batch_rows_count"][()] == 3 and m["mailroom_batch_rows_sum"][()] == 17
    assert m["mailroom_ses_requests_total"][(("result", "throttled"),)] == 1
    assert m["mailroom_worker_restarts_total"][(("reason", "crash"), ("worker", "sender"))] == 1
    assert m["mailroom_worker_restarts_total"][(("reason", "planned"), ("worker", "sender"))] == 0
    assert m["mailroom_control_commands_total"][(("cmd", "pause"), ("result", "forbidden"))] == 1
    assert m["mailroom_queue_depth"][()] == 1234 and m["mailroom_in_flight_batches"][()] == 2
    assert m["mailroom_paused"][(("what", "claims"),)] == 1 and m["mailroom_paused"][(("what", "sending"),)] == 0


def test_metrics_server_scrape_404_and_oversized():
    metrics = Metrics()
    metrics.set_gauges(queue_depth=7)
    srv = MetricsServer("127.0.0.1:1", metrics.render)
    srv.port = 0  # a free port (the address is validated like MAILROOM_METRICS_ADDR)
    srv.start()
    base = f"http://127.0.0.1:{srv.port}"
    try:
        with LoopThread(srv) as loop:
            with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=")
                assert families(response.read().decode())["mailroom_queue_depth"][()] == 7
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + "/", timeout=10)
            assert info.value.code == 404
            big = urllib.request.Request(base + "/metrics", headers={"X-Pad": "x" * 20000})
            with pytest.raises((urllib.error.HTTPError, ConnectionError, urllib.error.URLError)):
                urllib.request.urlopen(big, timeout=10)
            assert loop.call(lambda: len(srv._conns)) == 0
            with urllib.request.urlopen(base + "/metrics?x=1", timeout=10) as response:
                assert response.status == 200
    finally:
        srv.close()


def test_protocol_table_marks_every_state_change_operator_only():
    assert {c.name for c in protocol.COMMANDS.values() if c.operator_only} == {
        "pause", "resume", "drain", "set_rate", "restart", "shutdown"}
    assert protocol.commands_for(protocol.VIEWER) == ["hello", "status", "subscribe", "unsubscribe",
                                                      "batches", "batch"]
