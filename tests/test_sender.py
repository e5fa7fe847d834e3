"""The Sender engine in-process, against real HTTP endpoints: moto's server and the SES stub.

No boto3 call is patched: every request goes over HTTP to moto (what it can do) or to
the scripted stub (throttling, 5xx, per-destination failures, pauses, timing).  The
stdin mode (``run_stdin`` and the console script) is in test_sender_cli.py.
"""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from ses_emulator import (
    AWS_ENV,
    SOURCE,
    account_paused,
    error,
    free_port,
    per_destination,
    server_error,
    success,
    throttling,
)

from mailroom import wire
from mailroom.config import Settings
from mailroom.sender import Outcome, Sender, SendPolicy, pacing, ses
from mailroom.sender.stdin import run_stdin
from mailroom.vocabulary import OutcomeKind

SIGNER = wire.Signer(bytes.fromhex("deadbeef" * 8))
FAST = SendPolicy(backoff_base=0.01, backoff_cap=0.05, pause_base=0.05, pause_cap=0.2,
                  connect_timeout=1.0, read_timeout=5.0)
FAST_HOLD = SendPolicy(**{**FAST.__dict__, "hold_when_paused": True})


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials and region; no shared AWS files of the machine."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def make_settings(tmp_path):
    def make(url: str | None, **overrides) -> Settings:
        values = dict(ses_endpoint_url=url, ses_source=SOURCE, ses_max_send_rate=100_000.0,
                      ses_output_path=str(tmp_path / "output"))
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def running():
    """Start a Sender; close it (handing back anything left) after the test."""
    senders = []

    def start(settings: Settings, policy: SendPolicy = FAST, **kwargs) -> Sender:
        sender = Sender(settings, policy=policy, **kwargs)
        sender.start()
        senders.append(sender)
        return sender

    yield start
    for sender in senders:
        sender.close(0)


def token(n: int) -> str:
    return SIGNER.sign(1, n.to_bytes(32, "big"), "")


def rows(count: int, action: int = 1, start: int = 0, domain: str = "example.test") -> list[tuple]:
    return [(action, f"user{i}@{domain}", f"login{i}", token(i), f"{i % 100000:05d}")
            for i in range(start, start + count)]


def expected_data(row: tuple) -> dict:
    action, _, login, secret, code = row
    if action == 1:
        return {"login": login, "secret": secret}
    return {"login": login, "secret": secret, "code": code}


def line(*batch_rows: tuple) -> bytes:
    """A real wire line for rows given with a 32-byte secret."""
    return SIGNER.encode_batch(list(batch_rows))


# --- moto: what SES receives ------------------------------------------------------------


def test_120_rows_go_out_as_50_50_20(moto, make_settings, running):
    batch = rows(120)
    outcomes = running(make_settings(moto.url)).submit(batch).result(30)
    assert [o.kind for o in outcomes] == [OutcomeKind.SENT] * 120
    assert all(o.message_id for o in outcomes)
    calls = moto.bulk_calls()
    assert sorted(len(c.destinations) for c in calls) == [20, 50, 50]
    sent = [address for c in calls for address, _ in c.destinations]
    assert sorted(sent) == sorted(r[1] for r in batch)


def test_unverified_source_fails_every_destination_without_retrying(moto, make_settings, running, tmp_path):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ses.models import ses_backends

    moto.reset(verify=False)
    outcomes = running(make_settings(moto.url)).submit(rows(3)).result(30)
    assert {o.kind for o in outcomes} == {OutcomeKind.FAILED}
    assert all("MessageRejected" in o.error and "not verified" in o.error for o in outcomes)
    assert ses_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].rejected_messages_count == 1  # one call, no retry
    [raw] = (tmp_path / "output").iterdir()
    assert raw.read_bytes().upper().startswith(b"HTTP/1.1 400 BAD REQUEST\r\n")  # moto's own status line
    assert b"<Code>MessageRejected</Code>" in raw.read_bytes()


def test_missing_template_is_a_permanent_failure(moto, make_settings, running):
    moto.reset(templates=False)
    outcomes = running(make_settings(moto.url)).submit(rows(2, action=2)).result(30)
    assert [o.kind for o in outcomes] == [OutcomeKind.FAILED, OutcomeKind.FAILED]
    assert "TemplateDoesNotExist" in outcomes[0].error


def test_rate_comes_from_get_send_quota_unless_configured(moto, stub, make_settings, running, caplog):
    assert running(make_settings(moto.url, ses_max_send_rate=None)).rate == 1.0  # moto's quota
    assert running(make_settings(stub.url, ses_max_send_rate=25.0)).rate == 25.0
    # Configured: GetSendQuota is called only to open the connection ahead of the first email.
    assert [r.action for r in stub.requests] == ["GetSendQuota"]
    stub.quota_rate = None  # GetSendQuota answers 500
    assert running(make_settings(stub.url, ses_max_send_rate=None)).rate is None
    assert "cannot read the SES send quota" in caplog.text


def test_region_defaults_to_us_east_1(monkeypatch, stub, make_settings, running):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    sender = running(make_settings(stub.url))
    assert sender._client.meta.region_name == "us-east-1"


# --- stub: retries, permanent failures, pauses ----------------------------------------------


def test_throttling_then_500_then_success_is_sent_after_backoff(stub, make_settings, running, tmp_path):
    stub.script(throttling(), server_error(), success())
    policy = SendPolicy(**{**FAST.__dict__, "backoff_base": 0.1, "backoff_cap": 1.0})
    [outcome] = running(make_settings(stub.url), policy).submit(rows(1)).result(30)
    assert outcome.kind == OutcomeKind.SENT and outcome.message_id
    first, second, third = stub.wait_for(3)
    assert first.addresses == second.addresses == third.addresses == ["user0@example.test"]
    # Equal jitter: at least half the nominal delay (0.1 s, then 0.2 s).
    assert second.time - first.time >= 0.05
    assert third.time - second.time >= 0.1
    files = sorted((tmp_path / "output").iterdir())
    assert len(files) == 2  # the two whole-call service errors
    texts = sorted(f.read_bytes() for f in files)
    assert any(t.startswith(b"HTTP/1.1 500 Internal Server Error\r\n") for t in texts)
    assert any(b"<Code>Throttling</Code>" in t for t in texts)


def test_per_destination_transient_failure_retries_only_those(stub, make_settings, running):
    flaky = {"user1@example.test", "user3@example.test"}
    stub.script(per_destination(lambda a: "TransientFailure" if a in flaky else None), success())
    batch = rows(5)
    outcomes = running(make_settings(stub.url)).submit(batch).result(30)
    assert [o.kind for o in outcomes] == [OutcomeKind.SENT] * 5
    first, second = stub.wait_for(2)
    assert len(first.destinations) == 5
    assert sorted(second.addresses) == sorted(flaky)
    assert second.destinations == [d for d in first.destinations if d[0] in flaky]  # same data
    assert len(stub.bulk) == 2


def test_retries_stop_at_send_max_attempts(stub, make_settings, running):
    stub.default = throttling()
    [outcome] = running(make_settings(stub.url, send_max_attempts=3)).submit(rows(1)).result(30)
    assert outcome.kind == OutcomeKind.FAILED
    assert "Throttling" in outcome.error and "after 3 attempts" in outcome.error
    assert len(stub.bulk) == 3


@pytest.mark.parametrize("status", ["MessageRejected", "InvalidParameterValue", "MailFromDomainNotVerified",
                                    "ConfigurationSetDoesNotExist", "Failed"])
def test_permanent_destination_status_fails_at_once(stub, make_settings, running, status):
    stub.script(per_destination(lambda a: status if a == "user0@example.test" else None))
    outcomes = running(make_settings(stub.url)).submit(rows(2)).result(30)
    assert outcomes[0].kind == OutcomeKind.FAILED and outcomes[0].error.startswith(status)
    assert outcomes[1].kind == OutcomeKind.SENT
    assert len(stub.bulk) == 1


def test_whole_call_permanent_error_fails_at_once_and_keeps_the_raw_response(
    stub, make_settings, running, tmp_path
):
    stub.script(error("InvalidParameterValue", "Missing final '@domain'"))
    outcomes = running(make_settings(stub.url)).submit(rows(2)).result(30)
    assert [o.kind for o in outcomes] == [OutcomeKind.FAILED, OutcomeKind.FAILED]
    assert outcomes[0].error == "InvalidParameterValue: Missing final '@domain'"
    [raw] = (tmp_path / "output").iterdir()
    head, _, body = raw.read_bytes().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"x-amzn-RequestId: stub-request" in head
    assert body.startswith(b"<ErrorResponse") and b"Missing final" in body


def test_connection_refused_is_retried_then_failed(make_settings, running):
    settings = make_settings(f"http://127.0.0.1:{free_port()}", send_max_attempts=2)
    [outcome] = running(settings).submit(rows(1)).result(30)
    assert outcome.kind == OutcomeKind.FAILED
    assert "Could not connect" in outcome.error and "after 2 attempts" in outcome.error


def test_read_timeout_is_retried(stub, make_settings, running):
    stub.script(success(delay=1.0), success())
    policy = SendPolicy(**{**FAST.__dict__, "read_timeout": 0.2})
    [outcome] = running(make_settings(stub.url), policy).submit(rows(1)).result(30)
    assert outcome.kind == OutcomeKind.SENT
    assert len(stub.bulk) == 2


def test_paused_account_holds_and_probes_without_burning_attempts(stub, make_settings, running, caplog):
    stub.script(account_paused(), account_paused(), success())
    sender = running(make_settings(stub.url, send_max_attempts=1), FAST_HOLD)
    outcomes = sender.submit(rows(2)).result(30)
    assert [o.kind for o in outcomes] == [OutcomeKind.SENT, OutcomeKind.SENT]  # one attempt allowed, yet sent
    assert len(stub.bulk) == 3
    assert "SES sending is paused (AccountSendingPausedException" in caplog.text
    assert "SES sending resumed" in caplog.text


@pytest.mark.parametrize("reply", [
    per_destination(lambda a: "AccountSendingPaused"),
    account_paused(),
    error("Throttling", "Daily message quota exceeded."),
], ids=["per-destination", "whole-call", "daily-quota"])
def test_paused_account_hands_tokens_back_in_worker_mode(stub, make_settings, running, reply):
    stub.script(reply)
    policy = SendPolicy(**{**FAST.__dict__, "pause_base": 30.0, "pause_cap": 60.0})
    sender = running(make_settings(stub.url), policy)
    first = sender.submit(rows(2)).result(30)
    assert [o.kind for o in first] == [OutcomeKind.RETRY, OutcomeKind.RETRY]
    assert 15.0 <= first[0].retry_after <= 30.0
    # Still paused: the next batch is handed back without calling SES.
    second = sender.submit(rows(1, start=5)).result(30)
    assert second[0].kind == OutcomeKind.RETRY and "paused" in second[0].error
    assert len(stub.bulk) == 1


@pytest.mark.timing
def test_rate_limit_holds_within_ten_percent(stub, make_settings, running):
    sender = running(make_settings(stub.url, ses_max_send_rate=200.0))
    futures = [sender.submit(rows(10, start=10 * n)) for n in range(100)]  # 1000 recipients
    for future in futures:
        assert {o.kind for o in future.result(30)} == {OutcomeKind.SENT}
    calls = sorted(stub.bulk, key=lambda r: r.time)
    # The bucket starts full (one second's worth, as after an idle spell): 200
    # recipients and one more call go at once; each later call waits for the
    # tokens of the ones before.
    burst = 200 // 10 + 1
    elapsed = calls[-1].time - calls[burst - 1].time
    rate = sum(len(c.destinations) for c in calls[burst:]) / elapsed
    assert 180 <= rate <= 220, f"{rate:.1f} recipients/s over {elapsed:.2f} s"


def test_token_bucket_makes_each_caller_pay_for_the_one_before():
    clock = [0.0]
    bucket = pacing.TokenBucket(10.0, clock=lambda: clock[0])
    assert bucket.take(50) == 0.0  # full at start; a call larger than the bucket still goes...
    assert bucket.take(10) == 4.0  # ...and the next one waits until it is paid for
    clock[0] = 4.0
    assert bucket.take(10) == 0.0
    assert bucket.take(10) == pytest.approx(1.0)
    clock[0] = 100.0  # idle: the bucket refills, but only to one second's worth
    assert bucket.take(10) == 0.0
    assert bucket.take(1) == pytest.approx(0.0)
    assert bucket.take(1) == pytest.approx(0.1)
    assert pacing.TokenBucket(None).take(10**6) == 0.0


def test_a_rate_change_wakes_a_caller_waiting_at_the_old_rate():
    bucket = pacing.TokenBucket(0.01)
    stop = threading.Event()
    assert bucket.acquire(50, stop)  # the bucket now owes 49 tokens: 4900 s at 0.01/s
    went = threading.Event()
    waiter = threading.Thread(target=lambda: bucket.acquire(1, stop) and went.set())
    waiter.start()
    assert not went.wait(0.2)
    bucket.set_rate(10_000.0)  # the debt is paid in 5 ms at the new rate
    assert went.wait(5)
    assert bucket.acquire(50, stop)
    bucket.set_rate(0.01)
    blocked = threading.Thread(target=bucket.acquire, args=(1, stop))
    blocked.start()
    stop.set()
    bucket.interrupt()  # a stop is seen at once, not after the wait
    blocked.join(5)
    assert not blocked.is_alive()
    waiter.join(5)


def test_calls_run_concurrently_but_bounded(stub, make_settings, running):
    stub.gate.clear()
    sender = running(make_settings(stub.url, ses_concurrency=3))
    futures = [sender.submit(rows(1, start=n)) for n in range(8)]
    stub.wait_for(3)
    time.sleep(0.2)  # the absence of a 4th call can only be seen by waiting a little
    assert len(stub.bulk) == 3
    stub.gate.set()
    assert all(f.result(30)[0].kind == OutcomeKind.SENT for f in futures)
    assert len(stub.bulk) == 8


# --- requests: addresses and template data --------------------------------------------------


def test_template_data_is_json_with_every_field_intact(stub, make_settings, running):
    odd = 'say "hi", \\ back\nslash 名前 ✉'
    batch = [(1, "a@example.test", odd, token(1), "00001"), (2, "b@example.test", odd, token(2), "01234")]
    settings = make_settings(stub.url, ses_config_set="cs-1", ses_template_activation="act",
                             ses_template_recovery="rec", ses_source="Mail <m@example.test>")
    running(settings).submit(batch).result(30)
    calls = {r.params["Template"]: r for r in stub.wait_for(2)}
    assert set(calls) == {"act", "rec"}
    for request, row in ((calls["act"], batch[0]), (calls["rec"], batch[1])):
        assert request.params["ConfigurationSetName"] == "cs-1"
        assert request.params["Source"] == "Mail <m@example.test>"
        [(address, data)] = request.destinations
        assert address == row[1] and json.loads(data) == expected_data(row)
        assert set(json.loads(request.params["DefaultTemplateData"]).values()) == {""}
        assert set(json.loads(request.params["DefaultTemplateData"])) == set(expected_data(row))


def test_international_domain_goes_out_as_idna(stub, make_settings, running):
    sender = running(make_settings(stub.url))
    [outcome] = sender.submit([(1, "anne@bücher.example", "anne", token(1), "1")]).result(30)
    assert outcome.kind == OutcomeKind.SENT
    assert stub.bulk[0].addresses == ["anne@xn--bcher-kva.example"]


@pytest.mark.parametrize("email, reason", [
    ("ünïcode@example.test", "non-ASCII"),
    ("no-at-sign", "not an email address"),
    ("two..dots@example.test", "not valid address syntax"),
    ("space inside@example.test", "not valid address syntax"),
    ("user@-bad-.example", "not a valid host name"),
    ("user@", "not an email address"),
])
def test_address_ses_cannot_take_fails_that_destination_only(stub, make_settings, running, email, reason):
    sender = running(make_settings(stub.url))
    outcomes = sender.submit([(1, email, "x", token(1), "1")] + rows(1)).result(30)
    assert outcomes[0].kind == OutcomeKind.FAILED and reason in outcomes[0].error
    assert outcomes[1].kind == OutcomeKind.SENT
    assert stub.bulk[0].addresses == ["user0@example.test"]


@pytest.mark.parametrize("email, expected", [
    ("anne@straße.example", "anne@xn--strae-oqa.example"),  # IDNA 2003 would say strasse.example
    ("bo@faß.de", "bo@xn--fa-hia.de"),
    ("cy@ΣΊΣΥΦΟΣ.example", "cy@xn--kxa6akbbkh.example"),  # UTS 46 maps to lower case first
])
def test_international_domains_follow_uts46(email, expected):
    assert ses.normalize_address(email) == expected


def test_a_domain_idna_2008_refuses_fails_the_destination():
    with pytest.raises(ses.AddressError, match="IDNA"):
        ses.normalize_address("x@a\u200db.example")  # a joiner with no context: invalid


@pytest.mark.parametrize("email", ['"quoted"@example.test', "o'brien+tag@example.test", "x@localhost"])
def test_valid_addresses_pass_unchanged(email):
    assert ses.normalize_address(email) == email


# --- debug mode ------------------------------------------------------------------------------


def test_debug_mode_prints_requests_and_sends_nothing(stub, make_settings):
    out = io.StringIO()
    settings = make_settings(stub.url, debug=True, ses_max_send_rate=None)
    data = line((1, "a@example.test", "ann", b"\x01" * 32, "11111"),
                (2, "b@example.test", "bob", b"\x02" * 32, "22222"))
    assert run_stdin(settings, io.BytesIO(data), out) == 0
    requests = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [r["Template"] for r in requests] == ["activationv1", "passwordrecoveryv1"]
    decoded = wire.decode_line(data)
    for request, row in zip(requests, decoded, strict=True):
        assert request["Source"] == SOURCE and request["ConfigurationSetName"] == "default"
        assert json.loads(request["Destinations"][0]["ReplacementTemplateData"]) == expected_data(row)
        assert request["Destinations"][0]["Destination"] == {"ToAddresses": [row[1]]}
    assert stub.requests == []  # not even GetSendQuota

    sender = Sender(settings, stdout=out)
    sender.start()
    # Printed, not sent: the ledger records these as emitted, never as sent.
    assert sender.submit(rows(2)).result(5) == [Outcome(OutcomeKind.EMITTED), Outcome(OutcomeKind.EMITTED)]
    sender.close()
    assert stub.requests == []


# --- closing ---------------------------------------------------------------------------------


def test_nothing_is_created_before_start(stub, make_settings):
    threads = threading.active_count()
    sender = Sender(make_settings(stub.url))
    assert sender._client is None and threading.active_count() == threads
    with pytest.raises(RuntimeError):
        sender.submit(rows(1))


@pytest.mark.timing
def test_close_with_timeout_hands_back_calls_still_in_flight(stub, make_settings, running):
    stub.gate.clear()
    sender = running(make_settings(stub.url))
    future = sender.submit(rows(2))
    stub.wait_for(1)
    started = time.monotonic()
    sender.close(0.2)
    assert time.monotonic() - started < 2
    assert [o.kind for o in future.result(0)] == [OutcomeKind.RETRY, OutcomeKind.RETRY]
    stub.gate.set()


@pytest.mark.timing
def test_close_defer_retries_hands_back_waiting_retries(stub, make_settings, running):
    stub.script(throttling())
    policy = SendPolicy(**{**FAST.__dict__, "backoff_base": 20.0, "backoff_cap": 20.0})
    sender = running(make_settings(stub.url), policy)
    future = sender.submit(rows(1))
    stub.wait_for(1)
    while not sender._schedule._heap:  # the retry is queued right after the answer
        time.sleep(0.01)
    started = time.monotonic()
    sender.close(10, defer_retries=True)
    assert time.monotonic() - started < 2
    [outcome] = future.result(0)
    assert outcome.kind == OutcomeKind.RETRY and 5 <= outcome.retry_after <= 20


def test_close_waits_for_retries_by_default(stub, make_settings, running):
    stub.script(throttling(), success())
    sender = running(make_settings(stub.url))
    future = sender.submit(rows(1))
    sender.close()
    assert future.result(0)[0].kind == OutcomeKind.SENT


# --- the sender worker (supervisor mode) ------------------------------------------------------


def _receive(pipe, kind, timeout=20.0):
    """The next message of class ``kind`` from a worker, skipping heartbeats."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if pipe.poll(left):
            message = pipe.recv()
            if isinstance(message, kind):
                return message
    raise AssertionError(f"no {kind.__name__} from the worker within {timeout}s")


def test_worker_reports_a_batch_in_flight_at_stop_after_a_malformed_one(stub, make_settings):
    """A malformed batch must not upset the count of batches in flight: the
    batch after it is still waited for and reported when the worker stops."""
    import multiprocessing

    from mailroom.supervisor import messages as msg
    from mailroom.supervisor.workers import sender_worker

    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    worker = ctx.Process(target=sender_worker, args=(theirs, make_settings(stub.url)), daemon=True)
    worker.start()
    theirs.close()
    try:
        _receive(ours, msg.Ready)
        ours.send(msg.SendBatch("bad", b"not a batch line\n", [1]))
        bad = _receive(ours, msg.BatchOutcomes)
        assert bad.batch_id == "bad" and [(t, o.kind) for t, o in bad.outcomes] == [(1, OutcomeKind.FAILED)]

        stub.gate.clear()  # SES holds the next call until we say
        ours.send(msg.SendBatch("good", line((1, "g@example.test", "g", b"\x07" * 32, "00001")), [2]))
        stub.wait_for(1)
        ours.send(msg.Stop(timeout=20.0))
        threading.Timer(0.3, stub.gate.set).start()  # answers while the worker is stopping
        good = _receive(ours, msg.BatchOutcomes)
        assert good.batch_id == "good" and [(t, o.kind) for t, o in good.outcomes] == [(2, OutcomeKind.SENT)]
        worker.join(20)
        assert worker.exitcode == 0
    finally:
        stub.gate.set()
        if worker.is_alive():
            worker.kill()


def test_an_idle_sender_keeps_its_connection_warm(stub, make_settings, running, monkeypatch):
    from mailroom.sender import warm

    monkeypatch.setattr(warm, "IDLE_AFTER", 0.3)
    sender = running(make_settings(stub.url, ses_max_send_rate=50.0))

    def pings() -> int:
        return sum(1 for r in stub.requests if r.action == "GetSendQuota")

    assert pings() == 1  # at start: the first email finds a connection open
    time.sleep(1.0)
    assert pings() >= 3  # idle: a GetSendQuota every 0.3 s
    # Sending keeps it warm by itself: no pings while calls are being made.
    before = pings()
    for n in range(8):
        assert sender.submit(rows(1, start=n)).result(30)[0].kind == OutcomeKind.SENT
        time.sleep(0.1)
    assert pings() == before
    sender.close(5)
    after = pings()
    time.sleep(0.5)
    assert pings() == after  # closed: the keep-warm thread is gone


# --- flow control: full calls and concurrency from the quota (issue 13) -----------------------


def test_worker_mode_fills_calls_across_batches(stub, make_settings, running):
    stub.gate.clear()
    rejected = {"user23@example.test", "user41@example.test"}
    stub.default = per_destination(lambda a: "MessageRejected" if a in rejected else None)
    sender = running(make_settings(stub.url, ses_concurrency=1), policy=SendPolicy(**{**FAST.__dict__,
                                                                                     "fill_calls": True}))
    first = sender.submit(rows(10))
    stub.wait_for(1)                                         # on the wire, held
    later = [sender.submit(rows(10, start=10 * n)) for n in range(1, 6)]
    recovery = sender.submit(rows(3, action=2, start=100))
    stub.gate.set()
    outcomes = [f.result(30) for f in [first, *later, recovery]]
    calls = stub.bulk
    # The five batches queued behind the first make one call of 50; the other action its own.
    assert sorted(len(r.addresses) for r in calls) == [3, 10, 50]
    full = next(r for r in calls if len(r.addresses) == 50)
    assert full.addresses == [f"user{i}@example.test" for i in range(10, 60)]
    # Each destination's outcome reaches its own batch, in row order.
    for n, batch in enumerate(outcomes[1:6], start=1):
        for i, outcome in enumerate(batch):
            address = f"user{10 * n + i}@example.test"
            assert outcome.kind == (OutcomeKind.FAILED if address in rejected else OutcomeKind.SENT), address
    assert all(o.kind == OutcomeKind.SENT for o in outcomes[0] + outcomes[6])


def test_stdin_mode_keeps_one_call_per_batch(stub, make_settings, running):
    stub.gate.clear()
    sender = running(make_settings(stub.url, ses_concurrency=1))
    futures = [sender.submit(rows(10, start=10 * n)) for n in range(4)]
    stub.wait_for(1)
    stub.gate.set()
    assert all(o.kind == OutcomeKind.SENT for f in futures for o in f.result(30))
    assert [len(r.addresses) for r in stub.bulk] == [10] * 4


def test_concurrency_follows_the_quota_and_the_latency():
    bucket = pacing.TokenBucket(1000.0)
    little = pacing.Concurrency(16, bucket, 50)
    little.latency = 0.06            # 60 destinations in flight: 1.2 full calls
    assert little.target() == 3      # with half again and one call of slack
    bucket.set_rate(5000.0)          # 300 in flight: 6 calls (an operator's set_rate too)
    assert little.target() == 10
    bucket.set_rate(100_000.0)
    assert little.target() == 16     # the bound
    assert pacing.Concurrency(16, pacing.TokenBucket(None), 50).target() == 16  # no known limit
    assert pacing.Concurrency(16, pacing.TokenBucket(14.0), 50).target() == 2   # a sandbox account
    little.observe(0.5)
    assert 0.06 < little.latency < 0.5


def test_each_ses_call_is_counted_by_result_with_its_duration(stub, make_settings, running):
    """What feeds mailroom_ses_requests_total and mailroom_ses_request_duration_seconds."""
    stub.script(throttling(), server_error(), success())
    policy = SendPolicy(**{**FAST.__dict__, "backoff_base": 0.05, "backoff_cap": 0.1})
    sender = running(make_settings(stub.url), policy)
    [outcome] = sender.submit(rows(1)).result(30)
    assert outcome.kind == OutcomeKind.SENT
    calls = sender.take_calls()
    assert [result for result, _ in calls] == ["throttled", "error", "ok"]
    assert all(0 < seconds < 10 for _, seconds in calls)
    assert sender.take_calls() == []  # each call is reported once
