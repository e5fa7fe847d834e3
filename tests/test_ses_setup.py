"""``mailroom ses setup-events`` against moto's SES, SNS and SQS over HTTP (issue 21 item 6).

The real console script runs as a process; what it made is read back from moto with
boto3 over HTTP, and a message published to the topic must reach the queue.
"""

from __future__ import annotations

import json
import subprocess

import boto3
import pytest
from pgutil import console_script
from ses_emulator import AWS_ENV, SesStub

from mailroom.events.setup import EVENT_TYPES

CONFIG_SET = "mailroom-test-set"
RESOURCES = ["configuration set", "SNS topic", "SQS dead-letter queue", "SQS queue", "SQS queue policy",
             "SNS subscription", "SES event destination"]


def _env(base_env: dict[str, str], url: str, *, sns: str | None = None) -> dict[str, str]:
    return {**base_env, **AWS_ENV, "MAILROOM_SES_ENDPOINT_URL": url, "MAILROOM_SES_CONFIG_SET": CONFIG_SET,
            "AWS_ENDPOINT_URL_SNS": sns or url, "AWS_ENDPOINT_URL_SQS": url}


def _setup(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*console_script("mailroom"), "ses", "setup-events", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _client(service: str, url: str):
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1").client(service, endpoint_url=url)


def _states(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The state of each resource line, in order."""
    return [line.rsplit(": ", 1)[1] for line in done.stdout.splitlines()[:len(RESOURCES)]]


def _nothing_made(url: str) -> None:
    assert _client("sns", url).list_topics()["Topics"] == []
    assert _client("sqs", url).list_queues().get("QueueUrls", []) == []
    assert _client("ses", url).list_configuration_sets().get("ConfigurationSets", []) == []


def test_first_run_creates_everything_and_a_second_changes_nothing(moto, base_env):
    env = _env(base_env, moto.url)
    planned = _setup(env, "--dry-run")
    assert (planned.returncode, planned.stderr) == (0, ""), planned
    assert _states(planned) == ["would create"] * len(RESOURCES)
    assert [line.split(" ", 2)[:2] for line in planned.stdout.splitlines()[:2]] == [
        ["configuration", "set"], ["SNS", "topic"]]
    assert planned.stdout.splitlines()[-1] == "dry run: 7 to change, nothing done"
    _nothing_made(moto.url)

    first = _setup(env)
    assert (first.returncode, first.stderr) == (0, ""), first
    assert _states(first) == ["created"] * len(RESOURCES)
    lines = first.stdout.splitlines()
    assert lines[0] == f"configuration set {CONFIG_SET}: created"
    sqs = _client("sqs", moto.url)
    queue_url = sqs.get_queue_url(QueueName="mailroom-ses-events")["QueueUrl"]
    assert lines[-2:] == ["7 changed", f"MAILROOM_SES_EVENTS_QUEUE_URL={queue_url}"]

    # What it made: the redrive policy, the queue policy, the subscription, the event destination.
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    dlq_url = sqs.get_queue_url(QueueName="mailroom-ses-events-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    assert json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"] == dlq_arn
    (topic,) = _client("sns", moto.url).list_topics()["Topics"]
    (statement,) = json.loads(attributes["Policy"])["Statement"]
    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Resource"] == attributes["QueueArn"]
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": topic["TopicArn"]}}
    (subscription,) = _client("sns", moto.url).list_subscriptions_by_topic(
        TopicArn=topic["TopicArn"])["Subscriptions"]
    assert (subscription["Protocol"], subscription["Endpoint"]) == ("sqs", attributes["QueueArn"])
    described = _client("ses", moto.url).describe_configuration_set(
        ConfigurationSetName=CONFIG_SET, ConfigurationSetAttributeNames=["eventDestinations"])
    (destination,) = described["EventDestinations"]
    assert destination["SNSDestination"]["TopicARN"] == topic["TopicArn"]
    assert sorted(destination["MatchingEventTypes"]) == sorted(EVENT_TYPES)

    # The wiring carries a message: topic -> subscription -> queue (the policy allows it).
    _client("sns", moto.url).publish(TopicArn=topic["TopicArn"], Message='{"eventType": "Delivery"}')
    got = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=5)["Messages"]
    assert json.loads(json.loads(got[0]["Body"])["Message"]) == {"eventType": "Delivery"}

    second = _setup(env)
    assert (second.returncode, second.stderr) == (0, ""), second
    assert _states(second) == ["exists"] * len(RESOURCES)
    assert second.stdout.splitlines()[-2:] == ["nothing changed: everything exists",
                                               f"MAILROOM_SES_EVENTS_QUEUE_URL={queue_url}"]
    assert len(_client("sns", moto.url).list_topics()["Topics"]) == 1
    assert len(sqs.list_queues()["QueueUrls"]) == 2
    assert len(_client("sns", moto.url).list_subscriptions()["Subscriptions"]) == 1

    again = _setup(env, "--dry-run", "--json")
    assert again.returncode == 0, again
    answer = json.loads(again.stdout)
    assert (answer["dry_run"], answer["changed"], answer["queue_url"]) == (True, False, queue_url)
    assert [r["resource"] for r in answer["resources"]] == RESOURCES
    assert {r["state"] for r in answer["resources"]} == {"exists"}


def test_a_queue_made_by_hand_gets_what_it_lacks(moto, base_env):
    """An existing queue without a redrive policy or a policy for the topic is completed, not replaced."""
    sqs = _client("sqs", moto.url)
    queue_url = sqs.create_queue(QueueName="mailroom-ses-events")["QueueUrl"]
    done = _setup(_env(base_env, moto.url))
    assert done.returncode == 0, done
    assert _states(done) == ["created", "created", "created", "updated", "created", "created", "created"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"].endswith(":mailroom-ses-events-dlq")
    assert "sns.amazonaws.com" in attributes["Policy"]
    assert _states(_setup(_env(base_env, moto.url))) == ["exists"] * len(RESOURCES)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_an_aws_refusal_is_one_line_and_exit_1(moto, base_env, dry_run):
    """SNS refuses (a scripted endpoint that does not do ListTopics): one line naming the resource."""
    with SesStub() as refusing:
        done = _setup(_env(base_env, moto.url, sns=refusing.url), *(["--dry-run"] if dry_run else []))
    assert done.returncode == 1, done
    assert done.stderr == "mailroom ses setup-events: SNS topic: InvalidAction: the stub does not do ListTopics\n"
    # What was done before the refusal is said; nothing after it was tried.
    made = "would create" if dry_run else "created"
    assert done.stdout == f"configuration set {CONFIG_SET}: {made}\n"
    assert _client("sqs", moto.url).list_queues().get("QueueUrls", []) == []
