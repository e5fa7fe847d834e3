"""The control socket server on real Unix sockets: framing, validation, roles, events,
bounded buffers, the socket file. The server runs in a LoopThread (tests/control_util.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
from control_util import Handler, LoopThread, Raw, make_server, nobody_cannot_run, require_nobody

from mailroom.control import protocol
from mailroom.control import server as server_mod
from mailroom.control.server import ControlServer, SocketInUse, default_socket_path
from mailroom.control.sockfile import ControlSocketError


@pytest.fixture
def sockdir() -> Iterator[str]:
    # A directory other users may traverse (the viewer test connects as nobody).
    path = tempfile.mkdtemp(prefix="mailroom-ctl-")
    os.chmod(path, 0o711)
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


@pytest.fixture
def running(sockdir: str) -> Iterator[tuple[ControlServer, Handler, LoopThread, str]]:
    path = os.path.join(sockdir, "c.sock")
    handler = Handler()
    srv = make_server(path, handler, idle_timeout=300.0)
    srv.start()
    with LoopThread(srv) as loop:
        yield srv, handler, loop, path
    srv.close()


def req(cmd: str, ident: int = 1, **args: object) -> dict:
    return {"v": 1, "id": ident, "cmd": cmd, "args": args}


def test_hello_names_the_role_and_commands(running):
    _, _, _, path = running
    c = Raw(path)
    reply = c.request(req("hello", 7))
    assert reply["ok"] and reply["id"] == 7 and reply["v"] == 1
    result = reply["result"]
    assert result["protocol"] == 1 and result["role"] == "operator" and result["version"] == "test"
    assert set(result["commands"]) == set(protocol.COMMANDS)


BAD_LINES = [
    (b"this is not json", None, "parse_error"),
    (b'{"v":1,"id":1,"cmd":"hello"', None, "parse_error"),
    (b'{"v":1,"id":1,"cmd":"hel\xff\xfelo"}', None, "parse_error"),
    (b'{"v":1,"id":1,"cmd":"set_rate","args":{"per_second":NaN}}', None, "parse_error"),
    (b"[1, 2, 3]", None, "invalid_request"),
    (b'"hello"', None, "invalid_request"),
    (b'{"v":1,"id":4,"cmd":"hello","extra":true}', 4, "invalid_request"),
    (b'{"v":2,"id":5,"cmd":"hello"}', 5, "invalid_request"),
    (b'{"v":1,"id":"6","cmd":"hello"}', None, "invalid_request"),
    (b'{"v":1,"id":7,"cmd":42}', 7, "invalid_request"),
    (b'{"v":1,"id":8,"cmd":"hello","args":[]}', 8, "invalid_request"),
    (b'{"v":1,"id":9,"cmd":"launch_missiles"}', 9, "unknown_command"),
]


@pytest.mark.parametrize("line,ident,code", BAD_LINES)
def test_malformed_requests_get_their_code_and_the_connection_stays_open(running, line, ident, code):
    _, handler, _, path = running
    c = Raw(path)
    c.send(line + b"\n")
    reply = c.line()
    assert reply["ok"] is False and reply["id"] == ident and reply["error"]["code"] == code
    assert c.request(req("hello", 99))["ok"]  # still served on the same connection
    assert handler.requests == []


BAD_ARGS = [
    (req("set_rate", per_second="fast"), "per_second"),
    (req("set_rate", per_second=True), "per_second"),
    (req("set_rate", per_second=-1), "per_second"),
    (req("set_rate"), "per_second"),
    (req("pause", what="everything"), "what"),
    (req("pause", what=["claims"]), "what"),
    (req("batches", limit=501), "limit"),
    (req("batches", limit=2.5), "limit"),
    (req("batch", id=12), "id"),
    (req("drain", timeout_s="60"), "timeout_s"),
    (req("restart", worker="supervisor"), "worker"),
    (req("shutdown", mode="later"), "mode"),
    (req("subscribe", topics=["batch", "nonsense"]), "topics"),
    (req("status", verbose=True), "verbose"),
]


@pytest.mark.parametrize("request_,field", BAD_ARGS)
def test_wrong_arguments_are_invalid_args_naming_the_field(running, request_, field):
    _, handler, _, path = running
    reply = Raw(path).request(request_)
    assert reply["error"]["code"] == "invalid_args"
    assert reply["error"]["message"].startswith(field + ":")
    assert handler.requests == []


def test_valid_commands_reach_the_handler_with_checked_args(running):
    _, handler, _, path = running
    c = Raw(path)
    assert c.request(req("set_rate", 2, per_second=50))["result"] == {"ok": True, "args": {"per_second": 50}}
    assert c.request(req("pause", 3, what="claims"))["result"] == {"what": "claims", "changed": True}
    assert c.request(req("pause", 4, what="claims"))["result"]["changed"] is False
    assert c.request(req("batch", 5, id="b1"))["error"]["code"] == "not_found"
    assert c.request(req("shutdown", 6, mode="now"))["error"]["code"] == "invalid_state"
    assert [r.cmd for r in handler.requests] == ["set_rate", "pause", "pause", "batch", "shutdown"]
    assert handler.requests[0].peer.uid == os.getuid() and handler.requests[0].peer.pid == os.getpid()


def test_handler_exception_is_internal_without_detail(running, caplog):
    _, _, _, path = running
    with caplog.at_level(logging.ERROR, logger="mailroom.control"):
        reply = Raw(path).request(req("batches"))
    assert reply["error"]["code"] == "internal"
    assert "secret" not in json.dumps(reply) and "Traceback" not in json.dumps(reply)
    assert any("batches failed" in r.getMessage() for r in caplog.records)


def test_state_changes_are_logged_accepted_or_refused(running, caplog):
    _, _, _, path = running
    c = Raw(path)
    with caplog.at_level(logging.INFO, logger="mailroom.control"):
        c.request(req("pause", 1, what="sending"))
        c.request(req("set_rate", 2, per_second="x"))
        c.request(req("status", 3))
    lines = [r.getMessage() for r in caplog.records if r.name == "mailroom.control"]
    audit = [line for line in lines if line.startswith("control: uid")]
    assert len(audit) == 2, lines
    assert f"uid {os.getuid()} pid {os.getpid()} pause" in audit[0] and "-> ok" in audit[0]
    assert "set_rate" in audit[1] and "invalid_args" in audit[1]


def test_a_deferred_reply_arrives_later_and_a_gone_client_is_no_error(running):
    _, handler, loop, path = running
    c = Raw(path)
    c.send(json.dumps(req("drain", 11, timeout_s=5)).encode() + b"\n")
    kept = handler.kept.get(timeout=10)
    loop.call(lambda: kept.reply({"drained": True}))
    assert c.line() == {"v": 1, "id": 11, "ok": True, "result": {"drained": True}}
    gone = Raw(path)
    gone.send(json.dumps(req("drain", 12)).encode() + b"\n")
    kept = handler.kept.get(timeout=10)
    gone.close()
    assert Raw(path).request(req("hello"))["ok"]  # the server noticed the EOF meanwhile
    loop.call(lambda: kept.reply({"drained": True}))
    loop.call(lambda: kept.fail("internal", "twice"))  # a second answer is dropped
    assert Raw(path).request(req("hello"))["ok"]


def test_a_client_that_half_closes_still_gets_a_deferred_answer(running):
    _, handler, loop, path = running
    c = Raw(path)
    c.send(json.dumps(req("drain", 21)).encode() + b"\n")
    c.sock.shutdown(socket.SHUT_WR)  # what `echo ... | nc -U` does
    kept = handler.kept.get(timeout=10)
    loop.call(lambda: kept.reply({"drained": True}))
    assert c.line()["result"] == {"drained": True}
    assert c.closed()


def test_a_10_mb_line_is_too_large_then_closed(running):
    srv, _, loop, path = running
    big = Raw(path)
    other = Raw(path)
    try:
        big.sock.sendall(b"x" * (10 * 1024 * 1024) + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending: the reply is already queued for us
    reply = big.line()
    assert reply["error"]["code"] == "too_large" and reply["id"] is None
    assert big.closed()
    assert other.request(req("hello"))["ok"]


def test_a_line_of_exactly_64_kib_is_accepted(running):
    _, _, _, path = running
    c = Raw(path)
    line = json.dumps(req("batch", 1, id="x")).encode()
    line = line[:-1] + b" " * (protocol.MAX_LINE - len(line)) + b"}"
    assert len(line) == protocol.MAX_LINE
    c.send(line + b"\n")
    assert c.line()["error"]["code"] == "not_found"


def test_silent_and_half_sent_clients_do_not_block_others_and_time_out(sockdir):
    path = os.path.join(sockdir, "t.sock")
    srv = make_server(path, idle_timeout=0.5, line_timeout=0.5)
    srv.start()
    with LoopThread(srv):
        silent = Raw(path)
        half = Raw(path)
        half.send(b'{"v":1,"id":1,"cm')
        assert Raw(path).request(req("hello"))["ok"]
        assert silent.closed() and half.closed()  # both dropped after their timeout
    srv.close()


def test_a_client_that_disconnects_mid_line_is_dropped_quietly(running):
    srv, handler, loop, path = running
    for _ in range(20):
        c = Raw(path)
        c.send(b'{"v":1,"id":1,"cmd":"sta')
        c.close()
    probe = Raw(path)
    assert probe.request(req("status"))["ok"]
    deadline = time.monotonic() + 10
    while loop.call(lambda: srv.clients) != 1:  # only the probe is left
        assert time.monotonic() < deadline
    assert [r.cmd for r in handler.requests] == ["status"]


def test_200_clients_at_once(running):
    srv, _, loop, path = running
    clients = [Raw(path) for _ in range(200)]
    for i, c in enumerate(clients):
        c.send(json.dumps(req("status", i)).encode() + b"\n")
    for i, c in enumerate(clients):
        assert c.line()["id"] == i
    assert loop.call(lambda: srv.clients) == 200


def test_subscribe_snapshot_then_events_in_seq_order_by_topic(running):
    srv, _, loop, path = running
    everything, batches = Raw(path), Raw(path)
    snap = everything.request(req("subscribe", 1))
    assert snap["result"] == {"state": "running", "batches": [], "seq": 0}
    assert batches.request(req("subscribe", 1, topics=["batch"]))["ok"]
    for n in range(5):
        loop.call(lambda n=n: srv.publish("batch.done", {"n": n}))
        loop.call(lambda: srv.publish("tick", {"rate": 1.5}))
    got = [everything.line() for _ in range(10)]
    assert [e["seq"] for e in got] == list(range(1, 11))
    assert [e["event"] for e in got[:2]] == ["batch.done", "tick"]
    assert got[0]["data"] == {"n": 0} and got[0]["ts"].endswith("+00:00")
    only = [batches.line() for _ in range(5)]
    assert [(e["event"], e["seq"], e["data"]["n"]) for e in only] == [("batch.done", i + 1, i) for i in range(5)]
    assert everything.request(req("unsubscribe", 2))["result"] == {"subscribed": False}
    loop.call(lambda: srv.publish("tick", {}))
    assert everything.request(req("hello", 3))["id"] == 3  # no event in between


def test_a_subscriber_that_stops_reading_is_dropped(running):
    srv, _, loop, path = running
    slow = Raw(path)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert slow.request(req("subscribe"))["ok"]
    blob = {"pad": "x" * 10_000}
    for _ in range(300):  # 3 MB: well past socket buffers + MAX_OUTPUT
        loop.call(lambda: srv.publish("tick", blob))
    assert loop.call(lambda: srv.clients) == 0
    assert Raw(path).request(req("hello"))["ok"]


def _as_nobody(path: str, lines: list[dict]) -> list[dict]:
    """Send ``lines`` as uid/gid nobody from a fresh interpreter; the replies."""
    require_nobody("import json, socket")
    code = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
        "f = s.makefile('rwb')\n"
        "for line in sys.stdin: f.write(line.encode()); f.flush(); print(f.readline().decode(), end='')\n"
    )

    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    proc = subprocess.run([sys.executable, "-I", "-c", code, path], preexec_fn=drop, capture_output=True,
                          input="".join(json.dumps(x) + "\n" for x in lines), text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_the_nobody_probe_says_why_nobody_cannot_run_the_interpreter(tmp_path):
    """Where the interpreter lives under a 0700 directory (a venv in a private home),
    the viewer tests skip with this reason instead of failing."""
    if os.geteuid() != 0:
        assert nobody_cannot_run() == "running a client as user nobody needs root"
        return
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    python = private / "python"
    python.symlink_to(sys.executable)
    reason = nobody_cannot_run(str(python), "pass")
    assert reason is not None and "user nobody cannot" in reason and str(python) in reason


def test_a_viewer_is_forbidden_every_state_change(sockdir, caplog):
    path = os.path.join(sockdir, "g.sock")
    handler = Handler()
    srv = make_server(path, handler, group="nogroup")
    srv.start()
    operator_only = [c for c in protocol.COMMANDS.values() if c.operator_only]
    lines = [req("hello", 0), req("status", 1)]
    valid = {"pause": {"what": "claims"}, "resume": {"what": "claims"}, "drain": {}, "shutdown": {},
             "set_rate": {"per_second": 5}, "restart": {"worker": "sender"}}
    lines += [{"v": 1, "id": 10 + i, "cmd": c.name, "args": valid[c.name]} for i, c in enumerate(operator_only)]
    with caplog.at_level(logging.INFO, logger="mailroom.control"), LoopThread(srv):
        replies = _as_nobody(path, lines)
    srv.close()
    assert replies[0]["result"]["role"] == "viewer" and replies[0]["result"]["uid"] == 65534
    assert "pause" not in replies[0]["result"]["commands"]
    assert replies[1]["ok"]
    assert len(operator_only) == 6
    assert [r["error"]["code"] for r in replies[2:]] == ["forbidden"] * 6
    assert [r.cmd for r in handler.requests] == ["status"]
    assert sum("uid 65534" in r.getMessage() and "forbidden" in r.getMessage() for r in caplog.records) == 6


def test_socket_is_0600_and_nobody_cannot_connect(sockdir):
    path = os.path.join(sockdir, "p.sock")
    srv = make_server(path)
    srv.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(AssertionError, match="Permission denied"):
            _as_nobody(path, [req("hello")])
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_group_socket_is_0660_with_that_group(sockdir):
    path = os.path.join(sockdir, "g.sock")
    srv = make_server(path, group="nogroup")
    srv.start()
    info = os.stat(path)
    srv.close()
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == 65534


def test_stale_socket_is_removed_and_a_live_one_is_refused(sockdir):
    path = os.path.join(sockdir, "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nothing listens
    first = make_server(path)
    first.start()
    with LoopThread(first):
        second = make_server(path)
        with pytest.raises(SocketInUse, match=f"in use by pid {os.getpid()}"):
            second.start()
        assert Raw(path).request(req("hello"))["ok"]  # the first one still owns it
    first.close()
    assert not os.path.exists(path)
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(ControlSocketError, match="not a socket"):
        make_server(path).start()


def test_default_directory_is_created_0700(sockdir):
    path = os.path.join(sockdir, "sub", "q.sock")
    srv = make_server(path)
    srv.start()
    srv.close()
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    os.rmdir(os.path.dirname(path))


def test_default_socket_path():
    uid = os.getuid()
    assert default_socket_path({}, "q") == f"/tmp/mailroom-{uid}/q.sock"
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/1"}, "q") == "/run/user/1/mailroom/q.sock"
    env = {"XDG_RUNTIME_DIR": "/run/user/1", "RUNTIME_DIRECTORY": "/run/mailroom"}
    assert default_socket_path(env, "q") == "/run/mailroom/control.sock"
    assert default_socket_path(dict(env, MAILROOM_CONTROL_SOCKET="/x/y.sock"), "q") == "/x/y.sock"
    assert default_socket_path(dict(env, MAILROOM_CONTROL_SOCKET="off"), "q") is None


def test_server_module_keeps_to_its_imports():
    # control may import config/_process/ledger, never the workers or the supervisor.
    source = open(server_mod.__file__).read()
    for name in ("collector", "sender", "supervisor", "psycopg", "boto3", "threading"):
        assert f"import {name}" not in source and f"mailroom.{name}" not in source
