"""Protecting the account (issue 21 item 5) and the rates in status and metrics (item 4), end
to end: a real ``mailroom-supervisor`` with its events worker, moto's SES and SQS over HTTP,
a real PostgreSQL.  Bounces put on the queue move the 24-hour rates; past
MAILROOM_PAUSE_BOUNCE_RATE the supervisor pauses claims by itself, says why once, and a
person's resume holds until a new bounce arrives."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import subprocess
from typing import Any

import psycopg
import ses_events as ses
from collector_util import wait_for
from pgutil import console_script
from ses_emulator import free_port
from supervisor_util import supervisor_env


def sqs(moto) -> Any:
    import boto3

    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1").client("sqs", endpoint_url=moto.url)


def ctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*console_script("mailroom"), "ctl", *args], env=env, capture_output=True, text=True,
                          timeout=30)


def status(env: dict[str, str]) -> dict[str, Any]:
    done = ctl(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def message_ids(db: str) -> dict[str, str]:
    with psycopg.connect(db) as conn:
        return dict(conn.execute("SELECT a.email, d.message_id FROM deliveries AS d JOIN tokens AS t"
                                 " ON t.id = d.token JOIN accounts AS a ON a.id = t.account"
                                 " WHERE d.status = 'sent'").fetchall())


def scrape(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def sample(text: str, series: str) -> float | None:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_a_bounce_rate_past_the_limit_pauses_claims_once_until_resumed(db, base_env, moto, supervisors) -> None:
    client = sqs(moto)
    queue = client.create_queue(QueueName="ses-events", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    port = free_port()
    env = supervisor_env(base_env, db, moto.url, ses_events_queue_url=queue, worker_timeout=6000,
                         pause_bounce_rate="0.1", pause_min_sends="5", metrics_addr=f"127.0.0.1:{port}")
    env["AWS_ENDPOINT_URL_SQS"] = moto.url
    sup = supervisors(env)
    emails = [f"u{i}@example.com" for i in range(5)]
    with psycopg.connect(db) as conn:
        for e in emails:
            conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)", (e, e))
    ids = wait_for(lambda: len(m := message_ids(db)) == 5 and m, what="five sent")
    first = status(env)
    assert first["guard"] == {"pause_bounce_rate": 0.1, "pause_complaint_rate": None, "min_sends": 5,
                              "paused_reason": None}

    # One permanent bounce of five sends: 20 % >= 10 %.
    client.send_message(QueueUrl=queue, MessageBody=ses.sns(ses.bounce(ids["u0@example.com"], "u0@example.com",
                                                                        at=now())))
    paused = wait_for(lambda: (s := status(env))["state"] == "paused" and s, what="claims paused by the guard")
    reason = paused["guard"]["paused_reason"]
    assert reason == "bounce rate 20.00 % (1 of 5 sent in 24 h) reached MAILROOM_PAUSE_BOUNCE_RATE 10 %"
    assert paused["paused"]["claims"] is True
    health = paused["deliverability"]
    assert (health["sent"], health["bounced"], health["complained"]) == (5, 1, 0)
    assert health["bounce_rate"] == 0.2 and health["bounce_thresholds"] == {"review": 0.05, "pause": 0.1}
    assert health["suppressions"] == 1
    shown = ctl(env, "status").stdout
    assert "bounce rate     20.00 % (1 of 5 sent in 24 h; SES 5 % / 10 %, PAST SES'S PAUSE)" in shown
    assert f"auto-pause      CLAIMS PAUSED: {reason}" in shown
    metrics = scrape(port)
    assert sample(metrics, "mailroom_bounce_rate") == 0.2 and sample(metrics, "mailroom_complaint_rate") == 0
    assert sample(metrics, 'mailroom_ses_events_total{type="bounced"}') == 1
    assert sample(metrics, 'mailroom_ses_events_total{type="complained"}') == 0
    assert sample(metrics, "mailroom_suppressed_addresses") == 1
    assert (sample(metrics, "mailroom_events_lag_seconds") or -1) >= 0
    # The paused gauge follows the supervisor's tick (once a second), not the pause itself.
    wait_for(lambda: sample(scrape(port), 'mailroom_paused{what="claims"}') == 1, what="the paused gauge")

    # A person resumes: the next sign-up is sent; the same numbers do not pause again.
    resumed = ctl(env, "resume", "claims")
    assert resumed.returncode == 0, resumed.stderr
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO accounts (email, login) VALUES ('late@example.com', 'late')")
    late = wait_for(lambda: message_ids(db).get("late@example.com"), what="sent after the resume")
    client.send_message(QueueUrl=queue, MessageBody=ses.sns(ses.delivery(late, "late@example.com", at=now())))
    # 1 of 6 = 16.7 %, still past 10 %, but nothing new went wrong: claims stay on.
    after = wait_for(lambda: (s := status(env))["deliverability"]["sent"] == 6 and s, what="rates read again")
    assert after["state"] == "running" and after["guard"]["paused_reason"] is None
    assert sup.log().count("pausing claims to protect the SES account") == 1

    # A new complaint on top of it is new: paused again, said once more.
    client.send_message(QueueUrl=queue, MessageBody=ses.sns(ses.complaint(late, "late@example.com", at=now())))
    again = wait_for(lambda: (s := status(env))["state"] == "paused" and s, what="paused again")
    assert again["guard"]["paused_reason"].startswith("bounce rate 16.67 % (1 of 6 sent in 24 h)")
    assert again["deliverability"]["complained"] == 1
    log = sup.log()
    assert log.count("pausing claims to protect the SES account") == 2
    assert sup.stop() == 0
    assert "Traceback" not in sup.log()
