"""The demo's SES event publishing: the emulator's part, standing in for what AWS does.

moto accepts ``SendBulkTemplatedEmail`` but publishes no events through configuration
sets, and does not keep the MessageIds it returns.  So the demo's local SES is a thin
HTTP relay in front of moto: every request goes to moto unchanged and its answer comes
back unchanged; for each accepted bulk call the relay notes (configuration set,
recipient, MessageId), and a publisher thread posts SES-shaped events for them to the
SNS topic of that configuration set's event destination, as SES would:

- ``bounce+...@simulator.amazonses.com``: a permanent bounce (``5.1.1 user unknown``),
- ``complaint+...@simulator.amazonses.com``: a delivery, then a complaint,
- anything else: a delivery.

(The addresses follow SES's own mailbox simulator.)  Nothing of mailroom is involved:
the events reach mailroom through SNS -> SQS, wired by ``mailroom ses setup-events``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import json
import logging
import queue
import re
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from typing import Any

__all__ = ["SIMULATOR", "EventRelay"]

log = logging.getLogger("mailroom.demo")

#: SES's mailbox simulator domain: its local parts say what becomes of the email.
SIMULATOR = "simulator.amazonses.com"
_MEMBER = re.compile(rb"<member>(.*?)</member>", re.S)
_MESSAGE_ID = re.compile(rb"<MessageId>(.*?)</MessageId>")
_DESTINATION_TTL_S = 2.0     # how long the publisher trusts its look-up of a set's destination


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fate(address: str) -> list[str]:
    """The event types SES would publish for ``address``, in order."""
    local, _, domain = address.rpartition("@")
    if domain.lower() == SIMULATOR:
        if local.startswith("bounce"):
            return ["Bounce"]
        if local.startswith("complaint"):
            return ["Delivery", "Complaint"]
    return ["Delivery"]


def event(kind: str, config_set: str, source: str, address: str, message_id: str) -> dict[str, Any]:
    """One SES event as SES's event publishing writes it to SNS (``eventType`` form)."""
    at = _now()
    mail = {"timestamp": at, "source": source, "sendingAccountId": "123456789012", "messageId": message_id,
            "destination": [address], "headersTruncated": False,
            "tags": {"ses:configuration-set": [config_set]}}
    body: dict[str, Any] = {"eventType": kind, "mail": mail}
    if kind == "Bounce":
        body["bounce"] = {"bounceType": "Permanent", "bounceSubType": "General", "timestamp": at,
                          "feedbackId": str(uuid.uuid4()), "reportingMTA": "dns; demo.local",
                          "bouncedRecipients": [{"emailAddress": address, "action": "failed", "status": "5.1.1",
                                                 "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]}
    elif kind == "Complaint":
        body["complaint"] = {"complainedRecipients": [{"emailAddress": address}], "timestamp": at,
                             "feedbackId": str(uuid.uuid4()), "complaintFeedbackType": "abuse"}
    else:
        body["delivery"] = {"timestamp": at, "processingTimeMillis": 120, "recipients": [address],
                            "smtpResponse": "250 2.0.0 OK", "reportingMTA": "demo.local"}
    return body


class EventRelay:
    """The relay on 127.0.0.1 in front of moto (``url``) and its publisher thread."""

    def __init__(self, moto_url: str, clients: Any) -> None:
        self.moto = urllib.parse.urlsplit(moto_url)
        self.ses, self.sns = clients          # boto3 clients talking to moto directly
        self.published: Counter[str] = Counter()
        self._accepted: queue.Queue[tuple[str, str, list[tuple[str, str]]] | None] = queue.Queue()
        self._destinations: dict[str, tuple[float, tuple[str, set[str]] | None]] = {}
        self._local = threading.local()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._publisher: threading.Thread | None = None
        self.url = ""

    def start(self) -> str:
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, headers, answer = relay._forward(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                if status == 200 and b"Action=SendBulkTemplatedEmail" in body:
                    relay._note(body, answer)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.1,), name="demo-ses-relay", daemon=True).start()
        self._publisher = threading.Thread(target=self._publish_loop, name="demo-ses-events", daemon=True)
        self._publisher.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._publisher is not None:
            self._accepted.put(None)
            self._publisher.join(10)
            self._publisher = None

    # --- relay ----------------------------------------------------------------------------

    def _forward(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        # One keep-alive connection to moto per relay thread (the sender keeps its own open).
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.moto.hostname or "127.0.0.1", self.moto.port,
                                                                        timeout=60)
            try:
                sent = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
                conn.request("POST", path, body, sent)
                answer = conn.getresponse()
                return answer.status, answer.getheaders(), answer.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _note(self, body: bytes, answer: bytes) -> None:
        form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True)
        config_set = form.get("ConfigurationSetName", [""])[0]
        if not config_set:
            return                        # SES publishes only through a configuration set
        accepted = []
        for n, member in enumerate(_MEMBER.findall(answer), start=1):
            found = _MESSAGE_ID.search(member)
            address = form.get(f"Destinations.member.{n}.Destination.ToAddresses.member.1", [""])[0]
            if found and address and b"<Error>" not in member:   # moto leaves Status out
                accepted.append((address, found.group(1).decode()))
        if accepted:
            self._accepted.put((config_set, form.get("Source", [""])[0], accepted))

    # --- publisher ------------------------------------------------------------------------

    def _destination(self, config_set: str) -> tuple[str, set[str]] | None:
        """The set's SNS topic and event types (lower case), looked up again every few seconds."""
        when, found = self._destinations.get(config_set, (0.0, None))
        if time.monotonic() - when < _DESTINATION_TTL_S:
            return found
        found = None
        try:
            answer = self.ses.describe_configuration_set(ConfigurationSetName=config_set,
                                                         ConfigurationSetAttributeNames=["eventDestinations"])
            for destination in answer.get("EventDestinations") or []:
                topic = ((destination or {}).get("SNSDestination") or {}).get("TopicARN")
                if topic and destination.get("Enabled", True) not in (False, "false"):
                    found = (topic, {t.lower() for t in destination.get("MatchingEventTypes") or []})
        except Exception:  # noqa: BLE001 - no such set (yet): no events, as SES
            found = None
        self._destinations[config_set] = (time.monotonic(), found)
        return found

    def _publish_loop(self) -> None:
        while True:
            item = self._accepted.get()
            if item is None:
                return
            config_set, source, accepted = item
            destination = self._destination(config_set)
            if destination is None:
                continue
            topic, types = destination
            entries = [(kind, event(kind, config_set, source, address, message_id))
                       for address, message_id in accepted for kind in fate(address) if kind.lower() in types]
            for start in range(0, len(entries), 10):     # SNS PublishBatch takes 10
                chunk = entries[start:start + 10]
                try:
                    self.sns.publish_batch(TopicArn=topic, PublishBatchRequestEntries=[
                        {"Id": str(i), "Message": json.dumps(body)} for i, (_, body) in enumerate(chunk)])
                except Exception as exc:  # noqa: BLE001 - the demo goes on; say it once per batch
                    log.warning("local SES: cannot publish events: %s", exc)
                    continue
                self.published.update(kind for kind, _ in chunk)
