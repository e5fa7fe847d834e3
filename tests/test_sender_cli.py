"""Stdin mode: ``run_stdin`` in-process, and the installed ``mailroom-sender`` script.

Compatibility mode reads batch lines on stdin (as ``mailroom-collector |
mailroom-sender``).  SES is a real HTTP endpoint: moto's server for what it can do,
the scripted stub for the rest.  The Sender engine itself is tested in test_sender.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pgutil import console_script
from ses_emulator import AWS_ENV, SOURCE, aws_isolated

from mailroom import wire
from mailroom.config import Settings
from mailroom.sender import SendPolicy
from mailroom.sender.stdin import run_stdin

DATA = Path(__file__).parent / "data"
SIGNER = wire.Signer(bytes.fromhex("deadbeef" * 8))
LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[SES\] ")
FAST_HOLD = SendPolicy(backoff_base=0.01, backoff_cap=0.05, pause_base=0.05, pause_cap=0.2,
                       connect_timeout=1.0, read_timeout=5.0, hold_when_paused=True)


@pytest.fixture
def env(base_env, tmp_path):
    """Environment for the sender: dummy AWS credentials, a temp output dir."""
    values = aws_isolated(base_env, tmp_path)
    values["MAILROOM_SES_SOURCE"] = SOURCE
    values["MAILROOM_SES_OUTPUT_PATH"] = str(tmp_path / "output")
    values["MAILROOM_SES_MAX_SEND_RATE"] = "10000"  # moto's quota says 1/s
    return values


@pytest.fixture
def in_process(env, monkeypatch):
    """For run_stdin in this process: the same AWS environment, and Settings from it."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name in (*AWS_ENV, "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, env[name])

    def settings(url: str, **overrides) -> Settings:
        values = dict(ses_endpoint_url=url, ses_source=SOURCE, ses_max_send_rate=10000.0,
                      ses_output_path=env["MAILROOM_SES_OUTPUT_PATH"])
        return Settings(**{**values, **overrides})

    return settings


def line(*batch_rows: tuple) -> bytes:
    """A real wire line for rows given with a 32-byte secret."""
    return SIGNER.encode_batch(list(batch_rows))


def good_line(n: int, action: int = 1) -> bytes:
    return line((action, f"g{n}@example.test", f"g{n}", bytes([n]) * 32, "12345"))


def expected_calls(data: bytes) -> list:
    """[template, [(address, data), ...]] for each action of each line: one call each.

    An address with a non-ASCII local part cannot go through SES: not in any call.
    """
    calls = []
    for text in data.splitlines():
        decoded = wire.decode_line(text)
        for action, template in ((1, "activationv1"), (2, "passwordrecoveryv1")):
            group = [(email, {"login": login, "secret": secret} | ({"code": code} if action == 2 else {}))
                     for act, email, login, secret, code in decoded if act == action and email.isascii()]
            if group:
                calls.append([template, group])
    return sorted(calls, key=_call_key)


def received_calls(moto) -> list:
    calls = [[c.template, [(a, json.loads(d)) for a, d in c.destinations]] for c in moto.bulk_calls()]
    return sorted(calls, key=_call_key)


def _call_key(call: list) -> str:
    return json.dumps(call, sort_keys=True)


def run_lines(settings: Settings, data: bytes, **kwargs) -> int:
    """run_stdin in this process on a real pipe (the poll path), fed from a thread."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with open(write_fd, "wb") as out:
            out.write(data)

    threading.Thread(target=feed, daemon=True).start()
    with open(read_fd, "rb") as stdin:
        return run_stdin(settings, stdin, policy=kwargs.pop("policy", FAST_HOLD), **kwargs)


# --- run_stdin in-process ------------------------------------------------------------------------


def test_vector_lines_make_one_call_per_action_per_line(moto, in_process, caplog):
    caplog.set_level(logging.INFO, logger="mailroom")
    data = (DATA / "expected-limit3.txt").read_bytes() + (DATA / "expected-quoting.txt").read_bytes()
    assert run_lines(in_process(moto.url), data) == 0
    assert len(moto.bulk_calls()) == 6  # lines of actions (2,1,1), (1,2), (1,2,1): two calls each
    assert received_calls(moto) == expected_calls(data)
    assert all(c.source == SOURCE for c in moto.bulk_calls())
    # The non-ASCII local part cannot go through SES: failed with a reason, no crash.
    assert ("line 3: failed to send to ünïcode@example.test: bad address: the local part has non-ASCII"
            in caplog.text)
    assert "line 3: 3 rows, 2 sent, 1 failed" in caplog.text
    assert not any(row[3] in caplog.text for text in data.splitlines() for row in wire.decode_line(text))


def test_malformed_lines_are_reported_and_skipped(stub, in_process, caplog):
    good = [line((1, f"g{n}@example.test", f"g{n}", bytes([n]) * 32, "12345")) for n in range(3)]
    data = b"".join([
        good[0],
        b"1,a@example.test,ann\n",                         # 2: wrong field count
        good[1],
        good[0].replace(b"1,", b"3,", 1),                # 4: unknown action
        b"1,a@example.test,ann," + b"A" * 85 + b",1\n",    # 5: bad secret length
        b"1,\xff@example.test,ann," + b"A" * 86 + b",1\n",  # 6: invalid UTF-8
        b'1,"a@example.test,ann,' + b"A" * 86 + b",1\n",   # 7: quote never closed
        good[2],
        good[1][:-4],                                    # 9: cut short: no newline
    ])
    assert run_lines(in_process(stub.url), data) == 0
    for number, needle in [(2, "each row needs 5"), (4, "expected action 1 or 2"), (5, "expected 86"),
                           (6, "invalid UTF-8"), (7, "never closed")]:
        [message] = [m for m in caplog.messages if m.startswith(f"line {number}: ")]
        assert message.startswith(f"line {number}: row 1 field ") and needle in message
    assert "line 9: incomplete (input ended without a newline); skipped" in caplog.messages
    sent = sorted(r.addresses[0] for r in stub.wait_for(3))
    assert sent == ["g0@example.test", "g1@example.test", "g2@example.test"]
    assert len(stub.bulk) == 3


def test_quoted_line_break_spans_lines_but_a_broken_quote_does_not_swallow_the_next(
    stub, in_process, caplog
):
    spanning = line((1, "a@example.test", "first\nsecond", b"\x05" * 32, "12345"))
    assert spanning.count(b"\n") == 2
    broken = b'1,"b@example.test,bob,' + b"A" * 86 + b",1\n"
    after = line((2, "c@example.test", "carl", b"\x06" * 32, "54321"))
    assert run_lines(in_process(stub.url), spanning + broken + after) == 0
    by_address = {r.addresses[0]: json.loads(r.destinations[0][1]) for r in stub.wait_for(2)}
    assert by_address["a@example.test"]["login"] == "first\nsecond"
    assert by_address["c@example.test"]["login"] == "carl"
    assert "line 3: row 1 field 2 (email)" in caplog.text  # numbered by physical line


def test_stdin_is_not_read_far_ahead(stub, in_process):
    """While SES answers nothing, only a bounded number of lines is taken from stdin."""
    lines = [line((1, f"u{n}@example.test", "u", bytes([n]) * 32, "1")) for n in range(60)]

    class Source:
        taken = 0

        def read1(self, size: int) -> bytes:
            if self.taken == len(lines):
                return b""
            self.taken += 1
            return lines[self.taken - 1]

    source = Source()
    stub.gate.clear()
    settings = in_process(stub.url, ses_concurrency=2, max_in_flight=3)
    result = []
    worker = threading.Thread(target=lambda: result.append(run_stdin(settings, source, policy=FAST_HOLD)))
    worker.start()
    try:
        stub.wait_for(2)
        time.sleep(0.2)  # give a runaway reader the time to show itself
        assert source.taken <= 2 + 3 + 1  # pool + queue + the line waiting for room
    finally:
        stub.gate.set()
        worker.join(30)
    assert result == [0] and len(stub.bulk) == 60



# --- the console script -------------------------------------------------------------------


def run_sender(env: dict[str, str], data: bytes, **extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(console_script("mailroom-sender"), input=data, env={**env, **extra},
                          capture_output=True, timeout=60)


def log_lines(stderr: bytes) -> list[str]:
    """The log messages, after checking that every line has the [SES] log format."""
    lines = stderr.decode().splitlines()
    assert all(LOG_LINE.match(text) for text in lines), lines
    return [LOG_LINE.sub("", text) for text in lines]


def test_vector_lines_reach_moto_one_call_per_action_per_line(moto, env):
    data = (DATA / "expected-limit3.txt").read_bytes() + (DATA / "expected-quoting.txt").read_bytes()
    done = run_sender(env, data, MAILROOM_SES_ENDPOINT_URL=moto.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    messages = log_lines(done.stderr)
    assert "line 1: 3 rows, 3 sent, 0 failed" in " ".join(messages)
    assert "line 2: 2 rows, 2 sent, 0 failed" in " ".join(messages)
    assert any(m.startswith("line 3: failed to send to ünïcode@example.test: bad address") for m in messages)

    # Exactly one call per action per line, each destination's data exactly its row.
    assert len(moto.bulk_calls()) == 6
    assert received_calls(moto) == expected_calls(data)
    calls = moto.bulk_calls()
    # Spelled out for the quoting vector: quotes and commas intact.
    received = {address: json.loads(data) for call in calls for address, data in call.destinations}
    assert received['"quoted"@example.test'] == {
        "login": 'say "hi"', "code": "22222",
        "secret": "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj87AdehDRCCShIynxLnzKJyMNeNUCXq_tdmB-yuZb9HYw"}
    assert received["o'brien@example.test"]["login"] == "comma,login"
    assert all(call.source == SOURCE for call in calls)
    assert not any(r[3] in done.stderr.decode() for t in data.splitlines() for r in wire.decode_line(t))


def test_malformed_lines_are_reported_with_their_numbers_and_skipped(moto, env):
    data = b"".join([
        good_line(1),
        b"2,a@example.test,ann," + b"A" * 86 + b"\n",     # 2: a field short
        good_line(2, action=2),
        b"7,a@example.test,ann," + b"A" * 86 + b",1\n",  # 4: unknown action
        b"\n",                                           # 5: empty: nothing to send
        good_line(3),
    ])
    done = run_sender(env, data, MAILROOM_SES_ENDPOINT_URL=moto.url)
    assert done.returncode == 0, done.stderr
    messages = log_lines(done.stderr)
    [short] = [m for m in messages if m.startswith("line 2: ")]
    assert re.fullmatch(
        r"line 2: row 1 field 5 \(code\) at byte \d+: line ends after 4 fields; each row needs 5", short
    )
    assert [m for m in messages if m.startswith("line 4: ")] == [
        "line 4: row 1 field 1 (action) at byte 0: expected action 1 or 2, got '7'"]
    sent = sorted(address for call in moto.bulk_calls() for address, _ in call.destinations)
    assert sent == ["g1@example.test", "g2@example.test", "g3@example.test"]


def test_unverified_source_fails_every_destination_and_keeps_the_response(moto, env, tmp_path):
    moto.reset(verify=False)
    done = run_sender(env, good_line(1) + good_line(2), MAILROOM_SES_ENDPOINT_URL=moto.url)
    assert done.returncode == 0, done.stderr
    messages = log_lines(done.stderr)
    failures = [m for m in messages if "failed to send to" in m]
    assert len(failures) == 2, messages
    assert all("MessageRejected: Email address not verified" in m for m in failures)
    assert len(list((tmp_path / "output").iterdir())) == 2  # one raw response per call, no retries


def test_debug_mode_prints_the_requests_and_sends_nothing(stub, env):
    data = good_line(1) + good_line(2, action=2)
    done = run_sender(env, data, MAILROOM_SES_ENDPOINT_URL=stub.url, MAILROOM_DEBUG="true")
    assert done.returncode == 0, done.stderr
    requests = [json.loads(text) for text in done.stdout.decode().splitlines()]
    assert [r["Template"] for r in requests] == ["activationv1", "passwordrecoveryv1"]
    assert requests[1]["Destinations"][0]["Destination"]["ToAddresses"] == ["g2@example.test"]
    assert json.loads(requests[1]["Destinations"][0]["ReplacementTemplateData"])["code"] == "12345"
    assert stub.requests == []


class Running:
    """A sender subprocess whose stdin stays open and whose log is read as it comes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(console_script("mailroom-sender"), env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.process.stderr:
            with self._cond:
                self.lines.append(raw.decode().rstrip("\n"))
                self._cond.notify_all()

    def wait_log(self, needle: str, timeout: float = 20.0) -> None:
        with self._cond:
            found = self._cond.wait_for(lambda: any(needle in text for text in self.lines), timeout)
            assert found, self.lines

    def send(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()


def test_sigterm_stops_reading_and_finishes_the_calls_in_flight(stub, env):
    stub.gate.clear()
    sender = Running({**env, "MAILROOM_SES_ENDPOINT_URL": stub.url, "MAILROOM_SHUTDOWN_TIMEOUT": "20000"})
    try:
        sender.send(good_line(1))
        stub.wait_for(1)
        sender.process.send_signal(signal.SIGTERM)
        sender.wait_log("SIGTERM: stopped reading")
        stub.gate.set()  # SES answers now: the call in flight completes
        assert sender.process.wait(20) == 0
    finally:
        stub.gate.set()
        sender.process.kill()
    sender.wait_log("line 1: 1 rows, 1 sent, 0 failed")
    assert len(stub.bulk) == 1


def test_sigterm_gives_up_after_the_shutdown_timeout(stub, env):
    stub.gate.clear()
    sender = Running({**env, "MAILROOM_SES_ENDPOINT_URL": stub.url, "MAILROOM_SHUTDOWN_TIMEOUT": "300"})
    try:
        sender.send(good_line(1))
        stub.wait_for(1)
        sender.process.send_signal(signal.SIGINT)
        assert sender.process.wait(20) == 0
    finally:
        stub.gate.set()
        sender.process.kill()
    sender.wait_log("line 1: not sent to g1@example.test (not sent: sender stopped)")
    sender.wait_log("line 1: 1 rows, 0 sent, 0 failed, 1 not sent")


def test_a_second_signal_ends_the_process_at_once(stub, env):
    stub.gate.clear()
    sender = Running({**env, "MAILROOM_SES_ENDPOINT_URL": stub.url, "MAILROOM_SHUTDOWN_TIMEOUT": "60000"})
    try:
        sender.send(good_line(1))
        stub.wait_for(1)
        sender.process.send_signal(signal.SIGTERM)
        sender.wait_log("SIGTERM: stopped reading")
        sender.process.send_signal(signal.SIGTERM)
        assert sender.process.wait(10) == -signal.SIGTERM
    finally:
        stub.gate.set()
        sender.process.kill()
