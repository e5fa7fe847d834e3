"""mailroom.events.parse on SES's documented event shapes: no I/O."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import ses_events as ses

from mailroom.events.parse import Unparsable, parse_message
from mailroom.vocabulary import Feedback


def kinds(body: str) -> list[tuple[str, str, str, str | None, str | None]]:
    return [(e.message_id, e.recipient, e.type.value, e.subtype, e.diagnostic) for e in parse_message(body)]


@pytest.mark.parametrize("wrap", [ses.sns, ses.raw], ids=["sns", "raw"])
def test_permanent_bounce_of_three_recipients(wrap) -> None:
    body = wrap(ses.bounce("m1", "a@example.com", "b@example.com", "c@example.com"))
    assert kinds(body) == [("m1", f"{r}@example.com", "bounced", "Permanent/General", "5.1.1 user unknown")
                           for r in "abc"]
    [first, *_] = parse_message(body)
    assert first.event_at == dt.datetime(2026, 12, 1, 12, 0, 1, tzinfo=dt.UTC)
    assert json.loads(first.raw or "")["eventType"] == "Bounce"  # the event, not the envelope


def test_transient_bounce_is_soft() -> None:
    assert kinds(ses.sns(ses.bounce("m", "a@example.com", permanent=False))) == [
        ("m", "a@example.com", "soft_bounced", "Transient/General", "4.2.2 mailbox full")]


def test_the_older_notification_type() -> None:
    assert [e.type for e in parse_message(ses.sns(ses.bounce("m", "a@x.org", key="notificationType")))] == [
        Feedback.BOUNCED]


def test_complaint_delivery_reject_rendering_failure_delay() -> None:
    assert kinds(ses.sns(ses.complaint("m", "a@x.org"))) == [("m", "a@x.org", "complained", "abuse", None)]
    assert kinds(ses.raw(ses.delivery("m", "a@x.org"))) == [
        ("m", "a@x.org", "delivered", None, "250 2.6.0 Message received")]
    assert kinds(ses.sns(ses.reject("m", "Jane <a@x.org>"))) == [("m", "a@x.org", "rejected", None, "Bad content")]
    assert kinds(ses.sns(ses.rendering_failure("m", "a@x.org"))) == [
        ("m", "a@x.org", "render_failed", None, "Attribute 'login' is not present in the rendering data.")]
    assert kinds(ses.sns(ses.delivery_delay("m", "a@x.org", "b@x.org"))) == [
        ("m", f"{r}@x.org", "delayed", "TransientCommunicationFailure", "4.4.1 timed out") for r in "ab"]


def test_kinds_mailroom_does_not_track_parse_to_nothing() -> None:
    opened = {"eventType": "Open", "mail": ses.mail("m", ["a@x.org"]), "open": {"timestamp": ses.T}}
    assert parse_message(ses.sns(opened)) == []
    confirmation = json.dumps({"Type": "SubscriptionConfirmation", "Message": "You have chosen...",
                               "SubscribeURL": "https://sns/..."})
    assert parse_message(confirmation) == []


@pytest.mark.parametrize(("body", "why"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"Type": "Notification", "Message": "{oops"}), "SNS Message is not JSON"),
    (ses.sns({"eventType": "Teleport", "mail": ses.mail("m", ["a@x.org"])}), "unknown event type 'Teleport'"),
    (ses.sns({"mail": ses.mail("m", ["a@x.org"])}), "neither eventType nor notificationType"),
    (ses.sns({"eventType": "Bounce", "mail": {"destination": []}, "bounce": {}}), "no mail.messageId"),
    (ses.sns({"eventType": "Bounce", "mail": ses.mail("m", []), "bounce": {"bounceType": "Permanent"}}),
     "no bouncedRecipients"),
    (ses.sns({**ses.delivery("m", "a@x.org"), "delivery": {"timestamp": "yesterday", "recipients": ["a@x.org"]}}),
     "not an ISO timestamp"),
], ids=["json", "array", "sns-inner", "unknown-type", "no-type", "no-message-id", "no-recipients", "bad-time"])
def test_what_cannot_be_read_says_why(body: str, why: str) -> None:
    with pytest.raises(Unparsable, match=why):
        parse_message(body)
