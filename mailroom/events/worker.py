"""The events worker's loop: SQS -> parse -> one ledger transaction -> delete.

:class:`EventsLoop` receives up to 10 messages with a long poll, parses them
(:mod:`mailroom.events.parse`), records their events with
:func:`mailroom.ledger.events.record_events` in one transaction, and deletes the
messages only after the commit: a crash anywhere before the delete leaves them on
the queue, to be received and recorded again, which changes nothing (the ledger is
idempotent).  Messages that carry no tracked event (opens, clicks, a subscription
confirmation) are deleted too.

An unparsable message is logged on one line (once per message while this process
lives), counted, and left alone: its receive count grows each time it comes back,
and the queue's redrive policy moves it to the dead-letter queue.  SQS or the
database failing (unreachable, throttling, credentials) is one line when it starts
and one when it ends; meanwhile the loop backs off (1 s doubling to a minute) and
keeps beating, so the supervisor does not restart it in a loop.

The SQS endpoint is boto3's own business: ``AWS_ENDPOINT_URL_SQS`` (or the shared
config file) points it at an emulator; mailroom has no setting for it.  The region
is the queue URL's when it names one (``sqs.eu-west-1.amazonaws.com``).

Stopping: :meth:`EventsLoop.stop` (the supervisor's Stop, SIGTERM, the supervisor's
death) lets the batch being recorded finish and its messages be deleted; a stop
during the long poll does not wait for it (see ``mailroom.supervisor.workers``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import psycopg

from mailroom._process import backoff, one_line
from mailroom.config import Settings
from mailroom.events.parse import Unparsable, parse_message
from mailroom.ledger import connection, report
from mailroom.ledger import events as ledger_events
from mailroom.vocabulary import DeliveryEvent

log = logging.getLogger("mailroom.events")

#: SQS's own limits: 10 messages a receive, 20 s the longest poll.
RECEIVE_MAX = 10
LONG_POLL_S = 20
#: Backoff of a failing SQS or database: first delay and cap (seconds).
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0
#: Unmatched events are matched again at most this often (seconds).
REMATCH_EVERY_S = 10.0
#: The 24-hour deliverability (:func:`mailroom.ledger.events.health`: one query,
#: a scan of the queue's deliveries like ``mailroom status``) is read this often,
#: and sooner, at most every :data:`HEALTH_AFTER_EVENTS_S`, while new events are
#: recorded; it travels in the heartbeat to the supervisor (status, metrics, the
#: automatic pause, which should hear of a bounce in seconds, not half a minute).
HEALTH_EVERY_S = 30.0
HEALTH_AFTER_EVENTS_S = 2.0
#: The scan grows with the ledger (deliveries has only its key, so that sends stay
#: HOT updates): after a read that took ``d`` seconds the next waits at least
#: ``d * HEALTH_COST_RATIO``, so the worker spends at most about 2 % of its time (and
#: of a core of the database) on it, however large the ledger.
HEALTH_COST_RATIO = 50.0
#: Unparsable messages already logged, remembered by SQS MessageId (bounded).
_REPORTED_MAX = 10_000

_REGION = re.compile(r"^https?://sqs[.-]([a-z0-9-]+)\.amazonaws\.com", re.IGNORECASE)


def health_gap(due: bool, cost_s: float) -> float:
    """Seconds from one 24-hour read to the next: soon after new events (``due``),
    else :data:`HEALTH_EVERY_S`, and never sooner than the last read's cost allows."""
    return max(HEALTH_AFTER_EVENTS_S if due else HEALTH_EVERY_S, cost_s * HEALTH_COST_RATIO)


def region_of(queue_url: str) -> str | None:
    """The AWS region an SQS queue URL names, if it names one."""
    found = _REGION.match(queue_url)
    return found.group(1) if found else None


def sqs_client(queue_url: str) -> Any:
    """A boto3 SQS client for ``queue_url``: endpoint and credentials from boto3's own
    configuration (``AWS_ENDPOINT_URL_SQS``, ...), the region from the URL if it has one."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "sqs", region_name=region_of(queue_url),
        # The long poll holds the connection for up to 20 s: a read timeout above it.
        config=Config(read_timeout=LONG_POLL_S + 10, connect_timeout=10,
                      retries={"max_attempts": 2, "mode": "standard"}))


@dataclasses.dataclass
class Counts:
    """What the loop did since the last :meth:`EventsLoop.take_counts`."""

    received: int = 0
    recorded: Counter[str] = dataclasses.field(default_factory=Counter)  # new events by feedback
    unmatched: int = 0
    unparsable: int = 0
    ignored: int = 0
    suppressed: int = 0
    rematched: int = 0
    lag_s: float | None = None  # SES event time -> recorded, the latest batch's largest
    #: The latest :func:`mailroom.ledger.report.deliverability`, when read since.
    deliverability: dict[str, Any] | None = None

    def as_stats(self) -> dict[str, Any]:
        return {"received": self.received, "recorded": dict(self.recorded), "unmatched": self.unmatched,
                "unparsable": self.unparsable, "ignored": self.ignored, "suppressed": self.suppressed,
                "rematched": self.rematched, "lag_s": self.lag_s, "deliverability": self.deliverability}


class EventsLoop:
    """Receive, record, delete, until :meth:`stop`.  ``beat`` is called at least once
    per turn (each long poll, each backoff second) with nothing; the caller sends
    its heartbeat from there."""

    def __init__(self, settings: Settings, queue_url: str, *, sqs: Any = None,
                 beat: Callable[[], None] = lambda: None, wait_s: float = LONG_POLL_S) -> None:
        self.settings = settings
        self.queue_url = queue_url
        self.sqs = sqs if sqs is not None else sqs_client(queue_url)
        self.beat = beat
        # A poll no longer than a third of the watchdog's patience: a long poll
        # is silence to the supervisor.
        self.wait_s = int(max(1, min(wait_s, settings.worker_timeout / 3000)))
        self.conn: psycopg.Connection[Any] | None = None
        self.counts = Counts()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._reported: OrderedDict[str, None] = OrderedDict()
        self._failing: dict[str, int] = {}  # what is failing ("SQS", "database") -> attempts
        self._rematched_at = 0.0
        self._health_at = -HEALTH_EVERY_S  # the first turn reads it
        self._health_due = False  # new events since the last read
        self._health_cost = 0.0  # seconds the last read took
        self.polling = False  # in the long poll: a stop need not wait for it

    # -- control ----------------------------------------------------------------
    def stop(self) -> bool:
        """Stop after the current turn; ``True`` when the loop is in its long poll,
        holding nothing (the caller may then exit at once rather than wait for it)."""
        with self._lock:
            self._stopping.set()
            return self.polling

    def _set_polling(self, flag: bool) -> None:
        with self._lock:
            self.polling = flag

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def take_counts(self) -> Counts:
        with self._lock:
            taken, self.counts = self.counts, Counts()
        return taken

    # -- the loop -----------------------------------------------------------------
    def connect(self) -> None:
        """Connect to the ledger and check its schema (:class:`connection.SchemaError`
        is the caller's: restarting will not help)."""
        self.conn = psycopg.connect(self.settings.database_url, connect_timeout=10,
                                    application_name="mailroom-events")
        connection.check_schema(self.conn)
        self.conn.commit()

    def run(self) -> None:
        while not self.stopping:
            self.beat()
            self.turn()
        if self.conn is not None:
            self.conn.close()

    def turn(self) -> None:
        """One receive, and what follows it."""
        with self._lock:
            if self.stopping:
                return
        self._health()
        with self._lock:
            if self.stopping:
                return
            self.polling = True
        try:
            reply = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=RECEIVE_MAX, WaitTimeSeconds=self.wait_s,
                AttributeNames=["ApproximateReceiveCount"])
        except Exception as exc:  # noqa: BLE001 - botocore's errors, connection errors: all the same here
            self._set_polling(False)
            self._failed("SQS", exc)
            return
        self._set_polling(False)
        self._recovered("SQS")
        messages = reply.get("Messages") or []
        if not messages:
            self._rematch()
            return
        if self.stopping:
            # Received as the stop came: back on the queue at once, for the next worker.
            self._give_back(messages)
            return
        self.handle(messages)
        self._rematch()  # a queue that never runs dry must not starve the rematch
        self._health()  # nor the rates the automatic pause waits for

    def handle(self, messages: list[dict[str, Any]]) -> None:
        """Parse, record in one transaction, then delete what was recorded or carried nothing."""
        events: list[DeliveryEvent] = []
        done: list[dict[str, Any]] = []
        unparsable = ignored = 0
        for message in messages:
            try:
                parsed = parse_message(message.get("Body") or "")
            except Unparsable as exc:
                unparsable += 1
                self._report(message, exc)
                continue
            if not parsed:
                ignored += 1
            events.extend(parsed)
            done.append(message)
        try:
            recorded = self._record(events)
        except (psycopg.Error, OSError) as exc:
            self._failed("database", exc)
            self._drop_connection()
            return  # nothing deleted: the messages come back after their visibility timeout
        self._recovered("database")
        now = time.time()
        with self._lock:
            c = self.counts
            c.received += len(messages)
            c.recorded.update(recorded.by_type)
            c.unmatched += recorded.unmatched
            c.suppressed += recorded.suppressed
            c.unparsable += unparsable
            c.ignored += ignored
            if events:
                c.lag_s = max(0.0, now - min(e.event_at.timestamp() for e in events))
        if recorded.new:
            self._health_due = True  # the rates may have moved
        if recorded.suppressed:
            log.info("%d addresses suppressed (permanent bounce or complaint)", recorded.suppressed)
        self._delete(done)

    # -- the ledger -------------------------------------------------------------------
    def _record(self, events: list[DeliveryEvent]) -> ledger_events.Recorded:
        if not events:
            return ledger_events.Recorded({}, 0, 0, 0)
        if self.conn is None or self.conn.closed:
            self.connect()
        assert self.conn is not None
        with self.conn.transaction():
            return ledger_events.record_events(self.conn, events)

    def _rematch(self) -> None:
        """Events that came before the outcome writing their MessageId, matched now."""
        now = time.monotonic()
        if now - self._rematched_at < REMATCH_EVERY_S:
            return
        self._rematched_at = now
        try:
            if self.conn is None or self.conn.closed:
                self.connect()
            assert self.conn is not None
            with self.conn.transaction():
                n = ledger_events.rematch_events(self.conn)
        except (psycopg.Error, OSError) as exc:
            self._failed("database", exc)
            self._drop_connection()
            return
        self._recovered("database")
        if n:
            with self._lock:
                self.counts.rematched += n

    def _health(self) -> None:
        """The 24-hour rates for the heartbeat (:data:`HEALTH_EVERY_S`)."""
        now = time.monotonic()
        if now - self._health_at < health_gap(self._health_due, self._health_cost):
            return
        self._health_at, self._health_due = now, False
        try:
            if self.conn is None or self.conn.closed:
                self.connect()
            assert self.conn is not None
            with self.conn.transaction():
                health = ledger_events.health(self.conn, self.settings.queue_name)
        except (psycopg.Error, OSError) as exc:
            self._failed("database", exc)
            self._drop_connection()
            return
        self._health_cost = time.monotonic() - now
        self._recovered("database")
        with self._lock:
            self.counts.deliverability = report.deliverability(health)

    def _drop_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    # -- SQS --------------------------------------------------------------------------
    def _delete(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            return
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        try:
            reply = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except Exception as exc:  # noqa: BLE001 - recorded already: they come back and change nothing
            self._failed("SQS", exc)
            return
        failed = reply.get("Failed") or []
        if failed:
            log.warning("%d messages not deleted (%s); recorded already, they will change nothing",
                           len(failed), one_line(str(failed[0].get("Message") or failed[0].get("Code"))))

    def _give_back(self, messages: list[dict[str, Any]]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                   for i, m in enumerate(messages)]
        try:
            self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=entries)
        except Exception:  # noqa: BLE001 - they come back after their visibility timeout anyway
            pass

    def _report(self, message: dict[str, Any], exc: Unparsable) -> None:
        key = str(message.get("MessageId"))
        if key in self._reported:
            return
        self._reported[key] = None
        while len(self._reported) > _REPORTED_MAX:
            self._reported.popitem(last=False)
        received = (message.get("Attributes") or {}).get("ApproximateReceiveCount", "?")
        log.warning("unparsable message %s (received %s times), left for the redrive policy: %s",
                       key, received, one_line(str(exc)))

    # -- failures: one line when it starts, one when it ends ---------------------------
    def _failed(self, what: str, exc: BaseException) -> None:
        attempt = self._failing.get(what, 0)
        self._failing[what] = attempt + 1
        delay = backoff(attempt, BACKOFF_FIRST, BACKOFF_CAP)
        if attempt == 0:
            log.error("%s unavailable: %s; retrying with backoff (up to %.0fs)", what,
                         one_line(exc, named=True), BACKOFF_CAP)
        deadline = time.monotonic() + delay
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self._stopping.wait(min(1.0, left))
            self.beat()

    def _recovered(self, what: str) -> None:
        attempts = self._failing.pop(what, 0)
        if attempts:
            log.info("%s available again (after %d failed attempts)", what, attempts)
