"""The events worker's own overhead: SES events/s from moto's SQS into a real ledger,
against a bare receive + delete loop on the same queue.

moto's server runs as the tests run it (``tests/ses_emulator.moto_server``: HTTP on
127.0.0.1).  Each round puts :data:`EVENTS` (500) SNS-wrapped SES events on one queue
(untimed, batches of 10), then:

- the floor, in pytest-benchmark's untimed ``setup``, timed apart: a bare loop through
  a client built the worker's way receives them 10 at a time and deletes each batch
  with ``DeleteMessageBatch``: what SQS itself costs, nothing parsed, nothing recorded;
- timed: the same number of events put on the same queue again, drained by
  :class:`~mailroom.events.worker.EventsLoop` turn by turn: receive, parse, record in
  one transaction (matching each event to its delivery by MessageId and address,
  raising its feedback, suppressing bounced addresses), delete.

Every event matches a delivery of its own (each round its own slice of accounts), so
the ledger does the full work, not the cheap path of a redelivery.  Target: the worker
keeps >= 70 % of the bare loop (issue 21).  Run::

    python -m pytest benchmarks/test_events.py --benchmark-only
"""

from __future__ import annotations

import os

import psycopg
import pytest
import ses_events as ses
from collector_util import insert_accounts
from conftest import Rounds, record, record_rate, timed
from pgutil import SECRET_KEY_HEX, create_database, drop_database
from ses_emulator import moto_server, restore_env, use_aws_env

from mailroom import config
from mailroom.events import worker as events_worker
from mailroom.ledger import migrate

EVENTS = 500
ROUNDS = 3
#: Every 20th event a permanent bounce (it suppresses too), the rest deliveries.
BOUNCE_EVERY = 20


def bodies(first: int) -> list[str]:
    """:data:`EVENTS` SES events for the deliveries of accounts ``first`` ...: SNS envelopes."""
    out = []
    for n in range(first, first + EVENTS):
        address = f"ev{n}@example.test"
        event = (ses.bounce(f"bench-{n}", address) if n % BOUNCE_EVERY == 0
                 else ses.delivery(f"bench-{n}", address))
        out.append(ses.sns(event, sns_id=f"sns-{n}"))
    return out


def fill(client, queue: str, messages: list[str]) -> None:
    for i in range(0, len(messages), 10):
        entries = [{"Id": str(j), "MessageBody": body} for j, body in enumerate(messages[i : i + 10])]
        assert not client.send_message_batch(QueueUrl=queue, Entries=entries).get("Failed")


def bare_loop(client, queue: str, count: int) -> None:
    """Receive and delete ``count`` messages, 10 at a time, as the worker's SQS part does."""
    done = 0
    while done < count:
        messages = client.receive_message(QueueUrl=queue, MaxNumberOfMessages=events_worker.RECEIVE_MAX,
                                          WaitTimeSeconds=1,
                                          AttributeNames=["ApproximateReceiveCount"]).get("Messages") or []
        if messages:
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
            client.delete_message_batch(QueueUrl=queue, Entries=entries)
            done += len(messages)


@pytest.fixture(scope="module")
def ledger_url():
    url = create_database("mailroom_bench_events")
    migrate.up(url)
    # Accounts ev1 ... with a delivery each; its MessageId set as if SES had accepted it.
    insert_accounts(url, EVENTS * ROUNDS, "ev")
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE deliveries AS d SET message_id = 'bench-' || substr(a.email, 3, strpos(a.email, '@') - 3)"
                     " FROM tokens AS t JOIN accounts AS a ON a.id = t.account WHERE t.id = d.token")
    try:
        yield url
    finally:
        drop_database(url)


@pytest.mark.timeout(900)
def test_events_worker_throughput(benchmark, ledger_url):
    saved = use_aws_env()
    try:
        with moto_server() as moto:
            os.environ["AWS_ENDPOINT_URL_SQS"] = moto.url  # boto3's own variable, as in production
            queue_url = events_worker.sqs_client("x").create_queue(
                QueueName="bench-events", Attributes={"VisibilityTimeout": "300"})["QueueUrl"]
            settings = config.load({"MAILROOM_DATABASE_URL": ledger_url, "MAILROOM_SECRET_KEY": SECRET_KEY_HEX,
                                    "MAILROOM_SES_EVENTS_QUEUE_URL": queue_url, "MAILROOM_WORKER_TIMEOUT": "30000"})
            bare_client = events_worker.sqs_client(queue_url)
            loop = events_worker.EventsLoop(settings, queue_url, wait_s=1)
            loop.connect()
            floor = Rounds()
            first = 1

            def drain() -> None:
                while loop.counts.received < EVENTS:
                    loop.turn()

            def setup():
                nonlocal first
                batch = bodies(first)
                fill(bare_client, queue_url, batch)  # the same bodies: the floor reads none of them
                timed(floor, bare_loop, bare_client, queue_url, EVENTS)
                fill(bare_client, queue_url, batch)
                first += EVENTS
                loop.take_counts()
                return (), {}

            benchmark.pedantic(drain, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
            counts = loop.take_counts()
            assert counts.unparsable == 0
            assert loop.conn is not None
            with loop.conn.transaction():
                recorded, matched = loop.conn.execute(
                    "SELECT count(*), count(token) FROM delivery_events").fetchone()
            assert recorded == matched and recorded >= EVENTS * ROUNDS
            loop.stop()
            loop.conn.close()
    finally:
        os.environ.pop("AWS_ENDPOINT_URL_SQS", None)
        restore_env(saved)
    rate = record(benchmark, "events worker", "EventsLoop", EVENTS, "events")
    if rate is not None:
        floor_rate = floor.rate(EVENTS)
        benchmark.extra_info.update(bare_sqs_per_s=round(floor_rate), share_of_bare=round(rate / floor_rate, 3))
        record_rate("events worker", "bare receive + delete", floor_rate, "events")
