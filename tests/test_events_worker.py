"""The events worker end to end: a real ``mailroom-supervisor`` with
``MAILROOM_SES_EVENTS_QUEUE_URL`` set, moto's SES and SQS over HTTP, a real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import psycopg
import pytest
import ses_events as ses
from collector_util import wait_for
from pgutil import console_script
from ses_emulator import StubRequest
from supervisor_util import supervisor_env

from mailroom.events import worker as events_worker


def sqs(moto) -> Any:
    import boto3

    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1").client("sqs", endpoint_url=moto.url)


def on_queue(client: Any, url: str) -> int:
    """Messages still on the queue, visible or not (not deleted)."""
    attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def sent(db: str, email: str) -> str | None:
    """The MessageId of the latest delivery to ``email`` once SES accepted it."""
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT d.message_id FROM deliveries AS d JOIN tokens AS t ON t.id = d.token"
                           " JOIN accounts AS a ON a.id = t.account WHERE a.email = %s AND d.status = 'sent'"
                           " ORDER BY d.token DESC LIMIT 1", (email,)).fetchone()
    return row[0] if row else None


def rows(db: str, sql: str) -> list[tuple]:
    with psycopg.connect(db) as conn:
        return conn.execute(sql).fetchall()


def ctl_status(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([*console_script("mailroom"), "ctl", "status", "--json"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_region_of_a_queue_url() -> None:
    assert events_worker.region_of("https://sqs.eu-west-1.amazonaws.com/123456789012/ses-events") == "eu-west-1"
    assert events_worker.region_of("http://127.0.0.1:5000/123456789012/q") is None


def test_the_24_hour_read_costs_at_most_a_fiftieth_of_the_time() -> None:
    """The read scans the queue's deliveries: on a small ledger it follows new events
    within 2 s, on a ledger where it takes 1.5 s it waits 75 s, events or not."""
    assert events_worker.health_gap(due=True, cost_s=0.004) == events_worker.HEALTH_AFTER_EVENTS_S == 2.0
    assert events_worker.health_gap(due=False, cost_s=0.004) == events_worker.HEALTH_EVERY_S == 30.0
    assert events_worker.health_gap(due=True, cost_s=1.5) == events_worker.health_gap(due=False, cost_s=1.5) == 75.0


def test_bounce_suppresses_and_the_next_token_is_never_sent(db, base_env, moto, supervisors) -> None:
    client = sqs(moto)
    queue = client.create_queue(QueueName="ses-events", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    env = supervisor_env(base_env, db, moto.url, ses_events_queue_url=queue, worker_timeout=6000)
    env["AWS_ENDPOINT_URL_SQS"] = moto.url  # boto3's own variable: no mailroom setting
    sup = supervisors(env)
    events_pid = sup.worker("events")

    def title() -> bytes:
        with open(f"/proc/{events_pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0]

    wait_for(lambda: title() == b"mailroom: events", what="the events worker's process title")

    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO accounts (email, login) VALUES ('gone@example.com', 'gone'),"
                     " ('fine@example.com', 'fine'), ('a@example.com', 'a')")
    gone = wait_for(lambda: sent(db, "gone@example.com"), what="gone@ sent")
    fine = wait_for(lambda: sent(db, "fine@example.com"), what="fine@ sent")
    a_id = wait_for(lambda: sent(db, "a@example.com"), what="a@ sent")

    bounce = ses.sns(ses.bounce(gone, "gone@example.com"), sns_id="sns-bounce")
    for body in (bounce, ses.raw(ses.delivery(fine, "fine@example.com")),
                 ses.sns(ses.delivery_delay(a_id, "a@example.com")),
                 ses.sns(ses.complaint("not-ours", "stranger@example.org")),  # another sender's
                 "{this is not json"):
        client.send_message(QueueUrl=queue, MessageBody=body)

    def feedback() -> dict[str, str | None]:
        return dict(rows(db, "SELECT a.email, d.feedback::text FROM deliveries AS d JOIN tokens AS t"
                             " ON t.id = d.token JOIN accounts AS a ON a.id = t.account"))

    wait_for(lambda: feedback() == {"gone@example.com": "bounced", "fine@example.com": "delivered",
                                    "a@example.com": "delayed"}, what="feedback recorded")
    # Everything recorded is deleted; the garbage stays for the redrive policy.
    wait_for(lambda: on_queue(client, queue) == 1, what="recorded messages deleted")
    events = rows(db, "SELECT recipient, type::text, token IS NOT NULL, diagnostic FROM delivery_events ORDER BY id")
    assert sorted(events) == [("a@example.com", "delayed", True, "4.4.1 timed out"),
                              ("fine@example.com", "delivered", True, "250 2.6.0 Message received"),
                              ("gone@example.com", "bounced", True, "5.1.1 user unknown"),
                              ("stranger@example.org", "complained", False, None)]
    assert sorted(rows(db, "SELECT address, reason FROM suppressions")) == [
        ("gone@example.com", "bounced"), ("stranger@example.org", "complained")]

    # SQS delivers at least once: the same bounce again changes nothing.
    client.send_message(QueueUrl=queue, MessageBody=bounce)
    wait_for(lambda: ctl_status(env)["events"]["received"] >= 6, what="redelivery received")
    wait_for(lambda: on_queue(client, queue) == 1, what="redelivery deleted")
    assert len(rows(db, "SELECT 1 FROM delivery_events")) == 4
    assert len(rows(db, "SELECT 1 FROM suppressions")) == 2

    # The bounced address's next token is skipped in the claim and never reaches SES.
    calls_before = [a for call in moto.bulk_calls() for a, _ in call.destinations]
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO tokens (action, account) SELECT 'activation', id FROM accounts"
                     " WHERE email = 'gone@example.com'")
    skipped = wait_for(lambda: rows(db, "SELECT last_error FROM deliveries WHERE status = 'skipped'"),
                       what="the suppressed token skipped")
    assert skipped == [("suppressed: bounced (5.1.1 user unknown)",)]
    assert [a for call in moto.bulk_calls() for a, _ in call.destinations] == calls_before
    assert calls_before.count("gone@example.com") == 1

    counts = ctl_status(env)["events"]
    assert counts["recorded"] == {"bounced": 1, "delivered": 1, "delayed": 1, "complained": 1}
    assert counts["unmatched"] == 1 and counts["suppressed"] == 2 and counts["unparsable"] >= 1
    log = sup.log()
    assert log.count("unparsable message") == 1  # one line per message, however often it comes back
    assert sup.stop() == 0
    assert "events worker (pid" in sup.log() and "Traceback" not in sup.log()


def test_sqs_unreachable_is_one_line_and_no_restart_loop(db, base_env, moto, supervisors) -> None:
    env = supervisor_env(base_env, db, moto.url, ses_events_queue_url="http://127.0.0.1:9/1/nowhere",
                         worker_timeout=10000)
    env["AWS_ENDPOINT_URL_SQS"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    sup = supervisors(env)
    sup.worker("events")
    wait_for(lambda: "SQS unavailable" in sup.log(), timeout=60, what="the SQS line")
    # Several backoff rounds later: still the same worker, still one line.
    wait_for(lambda: ctl_status(env)["workers"]["events"]["uptime_s"] > 5, timeout=60, what="5 s of uptime")
    assert len(sup.started("events")) == 1
    assert sup.log().count("SQS unavailable") == 1
    assert sup.stop() == 0


@pytest.mark.parametrize("signal_name", ["SIGKILL"])
def test_a_killed_events_worker_loses_nothing_and_counts_nothing_twice(db, base_env, moto, supervisors,
                                                                       signal_name: str) -> None:
    import os
    import signal

    client = sqs(moto)
    queue = client.create_queue(QueueName="ses-events-kill", Attributes={"VisibilityTimeout": "2"})["QueueUrl"]
    env = supervisor_env(base_env, db, moto.url, ses_events_queue_url=queue)
    env["AWS_ENDPOINT_URL_SQS"] = moto.url
    sup = supervisors(env)
    first = sup.worker("events")
    for n in range(30):
        client.send_message(QueueUrl=queue, MessageBody=ses.sns(ses.delivery(f"m{n}", f"u{n}@example.com")))
    wait_for(lambda: rows(db, "SELECT count(*) FROM delivery_events")[0][0] > 0, what="some recorded")
    os.kill(first, getattr(signal, signal_name))
    wait_for(lambda: len(sup.started("events")) == 2, what="the events worker restarted")
    wait_for(lambda: on_queue(client, queue) == 0, timeout=30, what="every message deleted")
    assert rows(db, "SELECT count(*), count(DISTINCT message_id) FROM delivery_events") == [(30, 30)]
    # Counted when recorded anew: what the killed worker recorded and the next one
    # received again is not counted a second time.
    since = ctl_status(env)["workers"]["events"]["uptime_s"]
    wait_for(lambda: ctl_status(env)["workers"]["events"]["uptime_s"] > since + 1.5, what="a heartbeat after")
    assert ctl_status(env)["events"]["recorded"].get("delivered", 0) <= 30
    assert sup.stop() == 0


def test_events_before_their_outcome_end_as_feedback_for_three_recipients(db, base_env, moto, stub,
                                                                          supervisors) -> None:
    """One bounce naming three recipients arrives while SES still holds the call that
    sends to them: recorded unmatched (no delivery has its MessageId yet), then matched
    by the worker's rematch once the outcome is written, and each delivery ends bounced."""
    from ses_emulator import _XMLNS, Reply

    client = sqs(moto)
    queue = client.create_queue(QueueName="ses-events-early", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    # The SES stub sends (its gate holds the call); moto is the SQS the events arrive on.
    env = supervisor_env(base_env, db, stub.url, ses_events_queue_url=queue, worker_timeout=6000)
    env["AWS_ENDPOINT_URL_SQS"] = moto.url
    # One MessageId for the three destinations of the call, as SES gives one email to
    # several recipients: one event then names all three.
    mid = "0100-early-three"

    def one_message_id(request: StubRequest) -> Reply:
        members = "".join(f"<member><Status>Success</Status><MessageId>{mid}</MessageId></member>"
                          for _ in request.addresses)
        return Reply(200, (f'<SendBulkTemplatedEmailResponse xmlns="{_XMLNS}"><SendBulkTemplatedEmailResult>'
                           f"<Status>{members}</Status></SendBulkTemplatedEmailResult>"
                           "<ResponseMetadata><RequestId>r</RequestId></ResponseMetadata>"
                           "</SendBulkTemplatedEmailResponse>").encode())

    stub.script(one_message_id)
    stub.gate.clear()
    sup = supervisors(env)
    sup.worker("events")
    three = ["one@example.com", "two@example.com", "three@example.com"]
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO accounts (email, login) VALUES (%s, 'one'), (%s, 'two'), (%s, 'three')", three)
    [call] = stub.wait_for(1, timeout=30)
    assert sorted(call.addresses) == sorted(three)

    client.send_message(QueueUrl=queue, MessageBody=ses.sns(ses.bounce(mid, *three), sns_id="sns-early"))
    unmatched = "SELECT recipient FROM delivery_events WHERE token IS NULL ORDER BY recipient"
    wait_for(lambda: rows(db, unmatched) == [(a,) for a in sorted(three)], what="three events, unmatched")
    wait_for(lambda: on_queue(client, queue) == 0, what="the event's message deleted")
    assert rows(db, "SELECT count(*) FROM deliveries WHERE message_id IS NOT NULL") == [(0,)]
    # Suppression needs no delivery: the addresses are suppressed already.
    assert sorted(rows(db, "SELECT address FROM suppressions")) == [(a,) for a in sorted(three)]

    stub.gate.set()  # SES answers: the outcome writes the MessageId
    wait_for(lambda: rows(db, f"SELECT count(*) FROM deliveries WHERE message_id = '{mid}'") == [(3,)],
             what="the outcome written")
    feedback = ("SELECT a.email, d.feedback::text FROM deliveries AS d JOIN tokens AS t ON t.id = d.token"
                " JOIN accounts AS a ON a.id = t.account ORDER BY a.email")
    # The worker matches again at most every REMATCH_EVERY_S (10 s).
    wait_for(lambda: rows(db, feedback) == [(a, "bounced") for a in sorted(three)],
             timeout=events_worker.REMATCH_EVERY_S + 20, what="feedback on the three deliveries")
    assert rows(db, "SELECT count(*), count(token) FROM delivery_events") == [(3, 3)]
    wait_for(lambda: ctl_status(env)["events"]["rematched"] >= 3, what="rematched counted")
    assert sup.stop() == 0
    assert "Traceback" not in sup.log()
