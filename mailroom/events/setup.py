"""``mailroom ses setup-events``: wire SES event publishing to an SQS queue, idempotently.

DESIGN.md 11: configuration set -> SNS event destination -> SNS topic -> SQS queue
(with a dead-letter queue) that the events worker long-polls.  Each resource is
looked up first and created only when missing, so a second run changes nothing and
says so; ``--dry-run`` only looks.  SES is reached with the sender's settings
(``MAILROOM_SES_ENDPOINT_URL``, boto3's credential chain and region); SNS and SQS
with boto3's own configuration (``AWS_ENDPOINT_URL_SNS`` / ``AWS_ENDPOINT_URL_SQS``),
as the events worker reaches SQS, so a local emulator needs no mailroom setting.

The steps run in dependency order (the subscription needs the topic and the queue,
the event destination the topic) and stop at the first refusal: one line naming the
resource and AWS's error code, exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from mailroom import config
from mailroom._process import add_version, one_line
from mailroom.config import Settings

__all__ = ["EVENT_TYPES", "Step", "add_arguments", "main", "setup"]

#: What the event destination publishes (SES v1 names): every outcome the ledger records.
EVENT_TYPES = ("bounce", "complaint", "delivery", "reject", "renderingFailure", "deliveryDelay")
#: Receives before SQS moves a message the worker cannot parse to the dead-letter queue.
MAX_RECEIVE_COUNT = 5
#: Long polling by default, so any consumer of the queue waits instead of spinning.
_WAIT_SECONDS = "20"
#: How long SQS keeps an event: 14 days (its maximum), so mailroom may be down a while.
_RETENTION_SECONDS = "1209600"

CREATED, EXISTS, UPDATED, WOULD_CREATE, WOULD_UPDATE = "created", "exists", "updated", "would create", "would update"


@dataclass(frozen=True)
class Step:
    """What one run did (or would do) to one resource."""

    resource: str  # "configuration set", "SNS topic", ...
    name: str
    state: str  # one of CREATED, EXISTS, UPDATED, WOULD_CREATE, WOULD_UPDATE

    @property
    def changes(self) -> bool:
        return self.state != EXISTS


class SetupError(Exception):
    """AWS refused or could not be reached; ``str()`` is one line naming the resource.
    :attr:`steps`: what the run did before (printed, so the operator knows what exists)."""

    steps: list[Step] = []


@dataclass(frozen=True)
class Names:
    """The resources' names: the configuration set from the settings, the rest from options."""

    config_set: str
    topic: str
    queue: str
    dead_letter_queue: str
    destination: str


@dataclass
class Result:
    steps: list[Step]
    queue_url: str | None  # None in a dry run while the queue does not exist yet
    dry_run: bool

    @property
    def changed(self) -> bool:
        return any(step.changes for step in self.steps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ses`` subcommand group on ``parser`` (``--version`` on each level)."""
    add_version(parser)
    sub = parser.add_subparsers(dest="ses_command", required=True, metavar="{setup-events}")
    setup_events = sub.add_parser(
        "setup-events", help="create what SES needs to publish delivery events to an SQS queue",
        description="Create, where missing, the SES configuration set (MAILROOM_SES_CONFIG_SET), its SNS event"
        " destination (" + ", ".join(EVENT_TYPES) + "), the SNS topic, the SQS queue with a dead-letter queue,"
        " the queue policy letting the topic send and the subscription; print one line per resource and the"
        " MAILROOM_SES_EVENTS_QUEUE_URL line to set. Running it again changes nothing. SNS and SQS endpoints"
        " come from boto3's configuration (AWS_ENDPOINT_URL_SNS, AWS_ENDPOINT_URL_SQS).")
    setup_events.add_argument("--dry-run", action="store_true", help="say what would be created; create nothing")
    setup_events.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    setup_events.add_argument("--topic", default="mailroom-ses-events", metavar="NAME",
                              help="the SNS topic's name (default: mailroom-ses-events)")
    setup_events.add_argument("--queue", default="mailroom-ses-events", metavar="NAME",
                              help="the SQS queue's name; its dead-letter queue is NAME-dlq"
                                   " (default: mailroom-ses-events)")
    setup_events.add_argument("--destination", default="mailroom-events", metavar="NAME",
                              help="the configuration set's event destination name (default: mailroom-events)")
    add_version(setup_events)


def _clients(settings: Settings) -> tuple[Any, Any, Any]:
    import boto3  # heavy; only this command imports it

    session = boto3.session.Session()
    region = session.region_name or "us-east-1"
    # SES exactly as the sender reaches it; SNS and SQS by boto3's own endpoint configuration.
    return (session.client("ses", region_name=region, endpoint_url=settings.ses_endpoint_url),
            session.client("sns", region_name=region),
            session.client("sqs", region_name=region))


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code: str = response.get("Error", {}).get("Code", "")
    return code


def _refused(resource: str, exc: BaseException) -> SetupError:
    error = (getattr(exc, "response", None) or {}).get("Error", {})
    if error.get("Code"):
        text = f"{error['Code']}: {error.get('Message', '')}".rstrip(": ")
    else:
        text = one_line(exc, named=True)
    return SetupError(f"{resource}: {one_line(text)}")


class _Run:
    """One run: the clients, the names, and the steps so far."""

    def __init__(self, clients: tuple[Any, Any, Any], names: Names, dry_run: bool) -> None:
        self.ses, self.sns, self.sqs = clients
        self.names = names
        self.dry_run = dry_run
        self.steps: list[Step] = []

    def call(self, resource: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except Exception as exc:  # noqa: BLE001 - every AWS failure becomes one line
            raise _refused(resource, exc) from None

    def record(self, resource: str, name: str, exists: bool, create: Callable[[], Any] | None,
               *, update: bool = False) -> None:
        """Note the resource's state; when it is missing (or stale, ``update``) and this is
        no dry run, call ``create``."""
        if exists and not update:
            self.steps.append(Step(resource, name, EXISTS))
            return
        if not self.dry_run and create is not None:
            create()
        done = (WOULD_UPDATE if update else WOULD_CREATE) if self.dry_run else (UPDATED if update else CREATED)
        self.steps.append(Step(resource, name, done))

    # --- the resources, in dependency order ------------------------------------------------

    def configuration_set(self) -> list[dict[str, Any]]:
        """Ensure the configuration set; return its event destinations."""
        name = self.names.config_set
        try:
            answer = self.ses.describe_configuration_set(ConfigurationSetName=name,
                                                         ConfigurationSetAttributeNames=["eventDestinations"])
        except Exception as exc:  # noqa: BLE001 - every AWS failure becomes one line
            if _code(exc) != "ConfigurationSetDoesNotExist":
                raise _refused("configuration set", exc) from None
            self.record("configuration set", name, False, lambda: self.call(
                "configuration set", self.ses.create_configuration_set, ConfigurationSet={"Name": name}))
            return []
        self.record("configuration set", name, True, None)
        # Some SES look-alikes answer [null] for a set without destinations.
        return [d for d in answer.get("EventDestinations") or [] if d]

    def topic(self) -> str | None:
        """Ensure the SNS topic; return its ARN (None in a dry run when it does not exist)."""
        paginator = self.sns.get_paginator("list_topics")
        found = None
        try:
            for page in paginator.paginate():
                for topic in page.get("Topics", []):
                    if topic["TopicArn"].rsplit(":", 1)[-1] == self.names.topic:
                        found = topic["TopicArn"]
        except Exception as exc:  # noqa: BLE001 - every AWS failure becomes one line
            raise _refused("SNS topic", exc) from None
        created: list[str] = []
        self.record("SNS topic", self.names.topic, found is not None, lambda: created.append(
            self.call("SNS topic", self.sns.create_topic, Name=self.names.topic)["TopicArn"]))
        return found or (created[0] if created else None)

    def queue(self, resource: str, name: str, attributes: dict[str, str]) -> tuple[str | None, str | None]:
        """Ensure an SQS queue; return (URL, ARN), both None in a dry run when it does not exist.
        An existing queue keeps its attributes except those in ``attributes`` that differ
        (the redrive policy), which are set."""
        try:
            url: str | None = self.sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except Exception as exc:  # noqa: BLE001 - every AWS failure becomes one line
            if _code(exc) not in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                raise _refused(resource, exc) from None
            url = None
        if url is None:
            created: list[str] = []
            self.record(resource, name, False, lambda: created.append(self.call(
                resource, self.sqs.create_queue, QueueName=name, Attributes={
                    "ReceiveMessageWaitTimeSeconds": _WAIT_SECONDS,
                    "MessageRetentionPeriod": _RETENTION_SECONDS, **attributes})["QueueUrl"]))
            url = created[0] if created else None
        else:
            current = self._attributes(resource, url)
            stale = {key: value for key, value in attributes.items()
                     if _normal(current.get(key)) != _normal(value)}
            self.record(resource, name, True, lambda: self.call(
                resource, self.sqs.set_queue_attributes, QueueUrl=url, Attributes=stale), update=bool(stale))
        if url is None:
            return None, None
        return url, self._attributes(resource, url)["QueueArn"]

    def _attributes(self, resource: str, url: str) -> dict[str, str]:
        answer = self.call(resource, self.sqs.get_queue_attributes, QueueUrl=url, AttributeNames=["All"])
        attributes: dict[str, str] = answer.get("Attributes", {})
        return attributes

    def queue_policy(self, url: str | None, queue_arn: str | None, topic_arn: str | None) -> None:
        """Let the topic (and only it) send to the queue; other statements are kept."""
        resource = "SQS queue policy"
        label = f"{self.names.queue} <- {self.names.topic}"
        if url is None or queue_arn is None or topic_arn is None:
            self.record(resource, label, False, None)
            return
        policy = json.loads(self._attributes(resource, url).get("Policy") or '{"Version": "2012-10-17"}')
        statements = policy.get("Statement") or []
        if isinstance(statements, dict):
            statements = [statements]
        allowed = any(_allows(statement, queue_arn, topic_arn) for statement in statements)
        statement = {
            "Sid": f"mailroom-{self.names.topic}", "Effect": "Allow",
            "Principal": {"Service": "sns.amazonaws.com"}, "Action": "sqs:SendMessage", "Resource": queue_arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
        }
        policy["Statement"] = [*statements, statement]
        self.record(resource, label, allowed, lambda: self.call(
            resource, self.sqs.set_queue_attributes, QueueUrl=url, Attributes={"Policy": json.dumps(policy)}))

    def subscription(self, topic_arn: str | None, queue_arn: str | None) -> None:
        """Subscribe the queue to the topic (SNS envelopes: the worker reads both forms)."""
        resource = "SNS subscription"
        label = f"{self.names.topic} -> {self.names.queue}"
        if topic_arn is None or queue_arn is None:
            self.record(resource, label, False, None)
            return
        found = False
        try:
            for page in self.sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn):
                found = found or any(s.get("Protocol") == "sqs" and s.get("Endpoint") == queue_arn
                                     for s in page.get("Subscriptions", []))
        except Exception as exc:  # noqa: BLE001 - every AWS failure becomes one line
            raise _refused(resource, exc) from None
        self.record(resource, label, found, lambda: self.call(
            resource, self.sns.subscribe, TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn,
            ReturnSubscriptionArn=True))

    def event_destination(self, destinations: list[dict[str, Any]], topic_arn: str | None) -> None:
        """The configuration set's SNS destination for every event type; a destination
        of that name publishing elsewhere or fewer types is updated."""
        resource = "SES event destination"
        name = self.names.destination
        label = f"{self.names.config_set}/{name} -> {self.names.topic}"
        wanted = {"Name": name, "Enabled": True, "MatchingEventTypes": list(EVENT_TYPES),
                  "SNSDestination": {"TopicARN": topic_arn or ""}}
        current = next((d for d in destinations if d.get("Name") == name), None)
        if current is None:
            self.record(resource, label, False, lambda: self.call(
                resource, self.ses.create_configuration_set_event_destination,
                ConfigurationSetName=self.names.config_set, EventDestination=wanted))
            return
        same = (current.get("Enabled") in (True, "true")
                and set(current.get("MatchingEventTypes") or []) == set(EVENT_TYPES)
                and (current.get("SNSDestination") or {}).get("TopicARN") == topic_arn)
        self.record(resource, label, True, lambda: self.call(
            resource, self.ses.update_configuration_set_event_destination,
            ConfigurationSetName=self.names.config_set, EventDestination=wanted), update=not same)


def _normal(value: str | None) -> Any:
    """An attribute for comparison: JSON documents (the redrive policy) by content, their
    values as text (SQS answers ``"maxReceiveCount": 5`` to a ``"5"``)."""
    try:
        document = json.loads(value) if value else value
    except ValueError:
        return value
    return {k: str(v) for k, v in document.items()} if isinstance(document, dict) else document


def _allows(statement: dict[str, Any], queue_arn: str, topic_arn: str) -> bool:
    """Whether a policy statement lets ``topic_arn`` send to the queue."""
    actions = statement.get("Action")
    actions = [actions] if isinstance(actions, str) else actions or []
    condition = json.dumps(statement.get("Condition", {}))
    return (statement.get("Effect") == "Allow"
            and any(a in ("sqs:SendMessage", "sqs:*", "*") for a in actions)
            and statement.get("Resource") in (queue_arn, "*")
            and topic_arn in condition)


def setup(clients: tuple[Any, Any, Any], names: Names, *, dry_run: bool) -> Result:
    """Look up every resource, creating what is missing unless ``dry_run``
    (:class:`SetupError` on the first refusal)."""
    run = _Run(clients, names, dry_run)
    try:
        return _steps(run, names)
    except SetupError as exc:
        exc.steps = run.steps
        raise


def _steps(run: _Run, names: Names) -> Result:
    destinations = run.configuration_set()
    topic_arn = run.topic()
    _, dlq_arn = run.queue("SQS dead-letter queue", names.dead_letter_queue, {})
    redrive = {} if dlq_arn is None else {"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)})}
    url, queue_arn = run.queue("SQS queue", names.queue, redrive)
    run.queue_policy(url, queue_arn, topic_arn)
    run.subscription(topic_arn, queue_arn)
    run.event_destination(destinations, topic_arn)
    return Result(run.steps, url, run.dry_run)


def _print(result: Result, out: TextIO) -> None:
    for step in result.steps:
        print(f"{step.resource} {step.name}: {step.state}", file=out)
    changes = sum(step.changes for step in result.steps)
    if result.dry_run:
        print(f"dry run: {changes} to change, nothing done" if changes else "dry run: everything exists", file=out)
    else:
        print(f"{changes} changed" if changes else "nothing changed: everything exists", file=out)
    if result.queue_url is not None:
        print(f"MAILROOM_SES_EVENTS_QUEUE_URL={result.queue_url}", file=out)


def main(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    """Run ``mailroom ses setup-events``; return the exit code."""
    names = Names(settings.ses_config_set, args.topic, args.queue, f"{args.queue}-dlq", args.destination)
    try:
        clients = _clients(settings)
    except Exception as exc:  # noqa: BLE001 - boto3 refusing its settings, e.g. a bad endpoint URL
        print(f"mailroom ses setup-events: cannot make the AWS clients: {one_line(exc, named=True)}", file=sys.stderr)
        return config.EXIT_CONFIG
    try:
        result = setup(clients, names, dry_run=args.dry_run)
    except SetupError as exc:
        if not args.json:
            for step in exc.steps:
                print(f"{step.resource} {step.name}: {step.state}", file=out)
        print(f"mailroom ses setup-events: {exc}", file=sys.stderr)
        return config.EXIT_FAILURE
    if args.json:
        print(json.dumps({"dry_run": result.dry_run, "changed": result.changed, "queue_url": result.queue_url,
                          "resources": [{**asdict(s)} for s in result.steps]}, indent=2), file=out)
    else:
        _print(result, out)
    return config.EXIT_OK
