"""Real HTTP endpoints standing in for SES in the tests and benchmarks.

- :func:`moto_server` / :class:`MotoSes`: moto's server mode (``ThreadedMotoServer``)
  on 127.0.0.1 with a free port, a verified sender identity and both templates.
  What it received is read from moto's in-process backend (the server runs in a
  thread of the test process).
- :class:`SesStub`: a small scripted SES for what moto cannot do (throttling, 5xx,
  per-destination ``TransientFailure``, a paused account, slow answers).  It records
  every request it gets.  Script it with replies built by :func:`success`,
  :func:`error`, :func:`throttling`, :func:`server_error`, :func:`account_paused`,
  :func:`per_destination`.
- :func:`stub_process`: a canned-answer stub in its own process for benchmarks, so
  the stub is not what limits the measured throughput.

Test modules import these with ``from ses_emulator import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import multiprocessing
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SOURCE = "noreply@mailroom.test"
TEMPLATES = {
    "activationv1": "Hello {{login}}, activate: https://example.test/activate/{{secret}}",
    "passwordrecoveryv1": "Hello {{login}}, code {{code}}: https://example.test/recover/{{secret}}",
}
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def aws_isolated(env: dict[str, str], scratch: Path) -> dict[str, str]:
    """``env`` with the dummy credentials of :data:`AWS_ENV` and nothing of the machine's
    own AWS setup (profile, session token, region, config and credentials files, pointed
    into ``scratch`` where none exist)."""
    values = {k: v for k, v in env.items() if k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION")}
    values.update(AWS_ENV)
    values["AWS_CONFIG_FILE"] = str(scratch / "no-aws-config")
    values["AWS_SHARED_CREDENTIALS_FILE"] = str(scratch / "no-aws-credentials")
    return values


_XMLNS = "http://ses.amazonaws.com/doc/2010-12-01/"


def use_aws_env() -> dict[str, str | None]:
    """Put :data:`AWS_ENV` in this process's environment (for an in-process boto3
    client); return what it replaced, for :func:`restore_env`."""
    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    """Undo :func:`use_aws_env`."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- moto -------------------------------------------------------------------------------


@dataclass
class BulkCall:
    """One SendBulkTemplatedEmail call as an SES endpoint received it."""

    source: str
    template: str
    default_data: str
    destinations: list[tuple[str, str]]  # (address, ReplacementTemplateData)
    config_set: str | None = None
    time: float = 0.0


class MotoSes:
    """Handle on a running moto server: set-up and what it received."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.source = SOURCE

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).client("ses", endpoint_url=self.url)

    def reset(self, *, verify: bool = True, templates: bool = True) -> None:
        """Forget everything, then verify :data:`SOURCE` and create both templates."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", data=b"", method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        client = self.client()
        if verify:
            client.verify_email_identity(EmailAddress=self.source)
        if templates:
            for name, text in TEMPLATES.items():
                client.create_template(
                    Template={"TemplateName": name, "SubjectPart": name, "TextPart": text}
                )

    def bulk_calls(self) -> list[BulkCall]:
        """Every accepted SendBulkTemplatedEmail call, oldest first."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ses.models import ses_backends

        backend = ses_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
        calls = []
        for message in backend.sent_messages:
            # Bulk messages keep their Destinations list; other kinds a dict.
            if isinstance(getattr(message, "destinations", None), list) and hasattr(message, "template"):
                destinations = [
                    (d["Destination"]["ToAddresses"][0], d["ReplacementTemplateData"])
                    for d in message.destinations
                ]
                calls.append(
                    BulkCall(message.source, message.template, message.template_data, destinations)
                )
        return calls


@contextlib.contextmanager
def moto_server() -> Iterator[MotoSes]:
    """Run moto's server on 127.0.0.1 (free port), set up for SES; stop it after."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        ses = MotoSes(f"http://127.0.0.1:{port}")
        ses.reset()
        yield ses
    finally:
        server.stop()


# --- scripted stub ------------------------------------------------------------------------


@dataclass
class StubRequest:
    """One request the stub received (form-decoded)."""

    action: str
    params: dict[str, str]
    time: float  # time.monotonic() on arrival

    @property
    def destinations(self) -> list[tuple[str, str]]:
        """(address, ReplacementTemplateData) of each destination, in order."""
        out = []
        for n in itertools.count(1):
            prefix = f"Destinations.member.{n}."
            address = self.params.get(prefix + "Destination.ToAddresses.member.1")
            if address is None:
                return out
            out.append((address, self.params.get(prefix + "ReplacementTemplateData", "")))
        return out

    @property
    def addresses(self) -> list[str]:
        return [address for address, _ in self.destinations]

    def as_call(self) -> BulkCall:
        p = self.params
        return BulkCall(p.get("Source", ""), p.get("Template", ""), p.get("DefaultTemplateData", ""),
                        self.destinations, p.get("ConfigurationSetName"), self.time)


@dataclass
class Reply:
    """What the stub answers: status, XML body, extra headers, and a delay first."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Script = Callable[[StubRequest], Reply]


def _bulk_body(statuses: list[tuple[str, str | None]]) -> bytes:
    members = []
    for status, error in statuses:
        if status == "Success":
            message_id = uuid.uuid4()
            members.append(f"<member><Status>Success</Status><MessageId>{message_id}</MessageId></member>")
        else:
            members.append(f"<member><Status>{status}</Status><Error>{error or status}</Error></member>")
    return (
        f'<SendBulkTemplatedEmailResponse xmlns="{_XMLNS}"><SendBulkTemplatedEmailResult>'
        f"<Status>{''.join(members)}</Status></SendBulkTemplatedEmailResult>"
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
        "</SendBulkTemplatedEmailResponse>"
    ).encode()


def per_destination(status_for: Callable[[str], str | None], delay: float = 0.0) -> Script:
    """Answer 200 with one status per destination: ``status_for(address)`` or Success."""

    def reply(request: StubRequest) -> Reply:
        statuses = [(status_for(a) or "Success", None) for a in request.addresses]
        return Reply(200, _bulk_body(statuses), delay=delay)

    return reply


def success(delay: float = 0.0) -> Script:
    """Every destination accepted, each with a fresh MessageId."""
    return per_destination(lambda address: None, delay)


def error(code: str, message: str, status: int = 400, delay: float = 0.0) -> Script:
    """The whole call fails with an SES error document."""
    fault = "Receiver" if status >= 500 else "Sender"
    body = (
        f'<ErrorResponse xmlns="{_XMLNS}"><Error><Type>{fault}</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    ).encode()
    return lambda request: Reply(status, body, {"x-amzn-RequestId": "stub-request"}, delay)


def throttling() -> Script:
    return error("Throttling", "Maximum sending rate exceeded.")


def server_error(status: int = 500) -> Script:
    message = "The request processing has failed because of an unknown error."
    return error("InternalFailure", message, status)


def account_paused() -> Script:
    message = "Email sending is disabled for your entire Amazon SES account."
    return error("AccountSendingPausedException", message)


class SesStub:
    """A scripted SES endpoint on 127.0.0.1 that records what it gets.

    ``script(*replies)`` queues replies for the next SendBulkTemplatedEmail calls, in
    order; when none is queued, :attr:`default` answers (all destinations accepted).
    ``quota_rate`` is the MaxSendRate of GetSendQuota (None: it answers HTTP 500).
    ``gate``, when cleared, holds every bulk call until it is set again.
    """

    def __init__(self, *, quota_rate: float | None = 10000.0) -> None:
        self.default: Script = success()
        self.quota_rate = quota_rate
        self.requests: list[StubRequest] = []
        self.gate = threading.Event()
        self.gate.set()
        self._queue: list[Script] = []
        self._cond = threading.Condition()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def bulk(self) -> list[StubRequest]:
        """The SendBulkTemplatedEmail requests received so far."""
        with self._cond:
            return [r for r in self.requests if r.action == "SendBulkTemplatedEmail"]

    def script(self, *replies: Script) -> None:
        with self._cond:
            self._queue.extend(replies)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[StubRequest]:
        """Wait until ``count`` bulk requests arrived; return them (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                bulk = [r for r in self.requests if r.action == "SendBulkTemplatedEmail"]
                if len(bulk) >= count:
                    return bulk
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"stub got {len(bulk)} bulk requests, expected {count}"
                self._cond.wait(remaining)

    def _answer(self, request: StubRequest) -> Reply:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()
            if request.action != "SendBulkTemplatedEmail":
                script = None
            else:
                script = self._queue.pop(0) if self._queue else self.default
        if request.action == "GetSendQuota":
            if self.quota_rate is None:
                return server_error()(request)
            body = (
                f'<GetSendQuotaResponse xmlns="{_XMLNS}"><GetSendQuotaResult>'
                f"<Max24HourSend>1000000</Max24HourSend><MaxSendRate>{self.quota_rate}</MaxSendRate>"
                f"<SentLast24Hours>0</SentLast24Hours></GetSendQuotaResult>"
                f"<ResponseMetadata><RequestId>q</RequestId></ResponseMetadata></GetSendQuotaResponse>"
            ).encode()
            return Reply(200, body)
        if script is None:
            return error("InvalidAction", f"the stub does not do {request.action}")(request)
        self.gate.wait()
        return script(request)

    def start(self) -> SesStub:
        stub = self

        class Handler(_Handler):
            def answer(self, body: bytes) -> Reply:
                form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True)
                params = {key: values[0] for key, values in form.items()}
                return stub._answer(StubRequest(params.get("Action", ""), params, time.monotonic()))

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for one poll, at the end of every test.
        serve = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        serve.start()
        return self

    def stop(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> SesStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1; the whole answer goes out in one write (no Nagle stall)."""

    protocol_version = "HTTP/1.1"

    def answer(self, body: bytes) -> Reply:  # pragma: no cover - overridden
        raise NotImplementedError

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = self.answer(body)
        if reply.delay:
            time.sleep(reply.delay)
        head = [f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}",
                "Content-Type: text/xml", f"Content-Length: {len(reply.body)}"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        try:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body)
        except OSError:
            pass  # the client gave up (read timeout test)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


# --- fast stub in its own process (benchmarks) --------------------------------------------

_MEMBER = (
    b"<member><Status>Success</Status>"
    b"<MessageId>0100018f-0000-0000-0000-000000000000-000000</MessageId></member>"
)
_ADDRESS = re.compile(rb"ToAddresses\.member\.1=([^&]*)")


class _FastHandler(_Handler):
    """Canned answers; optionally slow, with a quota, recording arrivals (see :func:`stub_process`)."""

    delay = 0.0
    quota = 1_000_000_000.0
    record = False
    received: list[tuple[float, list[str]]] = []
    lock = threading.Lock()

    def answer(self, body: bytes) -> Reply:
        arrived = time.monotonic()
        if b"Action=GetSendQuota" in body:
            return Reply(200, b"<GetSendQuotaResponse><GetSendQuotaResult>"
                              b"<MaxSendRate>%s</MaxSendRate>"
                              b"</GetSendQuotaResult></GetSendQuotaResponse>" % repr(self.quota).encode())
        count = body.count(b"ReplacementTemplateData=")
        if self.record:
            addresses = [urllib.parse.unquote_plus(m.decode()) for m in _ADDRESS.findall(body)]
            with self.lock:
                self.received.append((arrived, addresses))
        return Reply(200, (
            b'<SendBulkTemplatedEmailResponse><SendBulkTemplatedEmailResult><Status>'
            + _MEMBER * count
            + b"</Status></SendBulkTemplatedEmailResult></SendBulkTemplatedEmailResponse>"
        ), delay=self.delay)

    def do_GET(self) -> None:
        """``GET /received``: the bulk calls so far as JSON ``[[monotonic, [address, ...]], ...]``;
        ``GET /received?clear`` forgets them after answering."""
        with self.lock:
            body = json.dumps(self.received).encode()
            if self.path.endswith("?clear"):
                self.received.clear()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve_fast(conn: Any, delay: float, quota: float, record: bool) -> None:
    _FastHandler.delay, _FastHandler.quota, _FastHandler.record = delay, quota, record
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FastHandler)
    server.daemon_threads = True
    conn.send(server.server_address[1])
    server.serve_forever()


@contextlib.contextmanager
def stub_process(delay: float = 0.0, quota: float = 1_000_000_000.0, record: bool = False) -> Iterator[str]:
    """A stub accepting every destination, in a separate process; yields its URL.

    ``delay``: seconds before each SendBulkTemplatedEmail answer (calls overlap);
    ``quota``: GetSendQuota's MaxSendRate; ``record``: keep each call's arrival
    time (``time.monotonic()``, comparable across processes on Linux) and
    addresses, read with :func:`received`.
    """
    context = multiprocessing.get_context("spawn")  # no forking of a threaded test process
    parent, child = context.Pipe()
    process = context.Process(target=_serve_fast, args=(child, delay, quota, record), daemon=True)
    process.start()
    try:
        assert parent.poll(30), "the stub process did not start"
        yield f"http://127.0.0.1:{parent.recv()}"
    finally:
        process.terminate()
        process.join(5)


def received(url: str, clear: bool = False) -> list[tuple[float, list[str]]]:
    """What a recording :func:`stub_process` got: ``(arrival, addresses)`` per bulk call."""
    with urllib.request.urlopen(f"{url}/received{'?clear' if clear else ''}", timeout=30) as answer:
        return [(arrived, addresses) for arrived, addresses in json.loads(answer.read())]


# --- fixtures (a plugin for tests/: tests/conftest.py lists this module) -----------

@pytest.fixture(scope="module")
def moto_module() -> Iterator[MotoSes]:
    """moto's server mode on 127.0.0.1, shared by the tests of a module."""
    with moto_server() as server:
        yield server


@pytest.fixture
def moto(moto_module: MotoSes) -> MotoSes:
    """moto, reset, with the source verified and both templates created."""
    moto_module.reset()
    return moto_module


@pytest.fixture
def stub() -> Iterator[SesStub]:
    """A scripted SES stub on 127.0.0.1 (what moto cannot do: throttling, 5xx, ...)."""
    with SesStub() as server:
        yield server
