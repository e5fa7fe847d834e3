"""SES event messages -> :class:`~mailroom.vocabulary.DeliveryEvent`: pure, no I/O.

What arrives on the queue (DESIGN.md 11): an SNS envelope (``{"Type": "Notification",
"Message": "<the event as a JSON string>", ...}``), or the event itself when the
subscription uses raw message delivery.  The event names its kind in ``eventType``
(configuration-set event publishing) or ``notificationType`` (the older identity
notifications); one event may name several recipients (a bounce of three addresses),
and becomes one :class:`DeliveryEvent` each.

Kinds mailroom does not track (``Send``, ``Open``, ``Click``, ``Subscription``, an
SNS subscription confirmation) parse to no events: the worker deletes them.  Anything
else it cannot read raises :class:`Unparsable`: the worker logs it and leaves the
message to the queue's redrive policy.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from email.utils import parseaddr
from typing import Any

from mailroom.vocabulary import DeliveryEvent, Feedback

__all__ = ["IGNORED", "Unparsable", "parse_message"]

#: Kinds that are not about what became of an email: parsed to nothing.
IGNORED = frozenset({"Send", "Open", "Click", "Subscription", "AmazonSnsSubscriptionSucceeded"})
#: A diagnostic is cut at this many characters: the reason, not the remote server's essay.
DIAGNOSTIC_CAP = 200

_SMTP_PREFIX = re.compile(r"^\s*smtp\s*;\s*", re.IGNORECASE)
_REPLY_CODE = re.compile(r"^\d{3}[\s-]+")


class Unparsable(ValueError):
    """A message that is not an SES event mailroom can read; ``str()`` says why, in one line."""


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Unparsable(f"{what} is not a JSON object")
    return value


def _when(value: Any, what: str) -> dt.datetime:
    if not isinstance(value, str):
        raise Unparsable(f"{what}: no timestamp")
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise Unparsable(f"{what}: not an ISO timestamp: {value[:40]!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _address(value: Any) -> str | None:
    """The bare address of ``Jane <jane@example.com>`` or ``jane@example.com``."""
    if not isinstance(value, str):
        return None
    address = parseaddr(value)[1] or value.strip()
    return address or None


def _diagnostic(status: Any, code: Any) -> str | None:
    """``5.1.1 user unknown`` from SES's ``status`` and ``diagnosticCode``
    (``smtp; 550 5.1.1 user unknown``): the enhanced status and the text."""
    text = _SMTP_PREFIX.sub("", code).strip() if isinstance(code, str) else ""
    text = _REPLY_CODE.sub("", text)
    if isinstance(status, str) and status and not text.startswith(status):
        text = f"{status} {text}".strip()
    text = " ".join(text.split())
    return text[:DIAGNOSTIC_CAP] or None


def _storable(value: Any) -> Any:
    """``value`` with every string made storable: JSON's ``\u0000`` and lone surrogates
    (``\ud800``) decode into text PostgreSQL refuses (a DataError, or an encoding error
    before the query is even sent), and one such event would hold back its whole batch."""
    if isinstance(value, str):
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    return value


def _unwrap(body: str) -> tuple[dict[str, Any] | None, str]:
    """The SES event of a queue message and its JSON text; ``None`` for an SNS message
    that carries none (a subscription confirmation)."""
    try:
        outer = _obj(_storable(json.loads(body)), "the message")
    except json.JSONDecodeError as exc:
        raise Unparsable(f"not JSON ({exc.msg} at {exc.pos})") from None
    if "Type" in outer and "Message" in outer:  # the SNS envelope
        if outer["Type"] != "Notification":
            return None, body
        inner = outer["Message"]
        if not isinstance(inner, str):
            raise Unparsable("SNS Message is not a string")
        try:
            return _obj(_storable(json.loads(inner)), "the SNS Message"), inner
        except json.JSONDecodeError as exc:
            raise Unparsable(f"SNS Message is not JSON ({exc.msg} at {exc.pos})") from None
    return outer, body


def parse_message(body: str) -> list[DeliveryEvent]:
    """The events of one queue message (see the module's docstring); raises
    :class:`Unparsable`."""
    event, raw = _unwrap(body)
    if event is None:
        return []
    kind = event.get("eventType", event.get("notificationType"))
    if not isinstance(kind, str):
        raise Unparsable("neither eventType nor notificationType")
    if kind in IGNORED:
        return []
    mail = _obj(event.get("mail"), "mail")
    message_id = mail.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise Unparsable(f"{kind}: no mail.messageId")
    sent_at = mail.get("timestamp")
    destination = [a for a in (_address(d) for d in mail.get("destination") or ()) if a]

    def one(recipient: str | None, feedback: Feedback, when: Any, subtype: Any = None,
            diagnostic: str | None = None) -> DeliveryEvent:
        if recipient is None:
            raise Unparsable(f"{kind}: a recipient without an address")
        return DeliveryEvent(message_id, recipient, feedback, _when(when, kind),
                             subtype if isinstance(subtype, str) and subtype else None, diagnostic, raw)

    if kind == "Bounce":
        bounce = _obj(event.get("bounce"), "bounce")
        permanent = bounce.get("bounceType") == "Permanent"
        feedback = Feedback.BOUNCED if permanent else Feedback.SOFT_BOUNCED
        subtype = bounce.get("bounceType")
        if isinstance(bounce.get("bounceSubType"), str):
            subtype = f"{subtype}/{bounce['bounceSubType']}"
        return [one(_address(r.get("emailAddress")), feedback, bounce.get("timestamp", sent_at), subtype,
                    _diagnostic(r.get("status"), r.get("diagnosticCode")))
                for r in _recipients(bounce, "bouncedRecipients", kind)]
    if kind == "Complaint":
        complaint = _obj(event.get("complaint"), "complaint")
        subtype = complaint.get("complaintFeedbackType") or complaint.get("complaintSubType")
        return [one(_address(r.get("emailAddress")), Feedback.COMPLAINED, complaint.get("timestamp", sent_at),
                    subtype) for r in _recipients(complaint, "complainedRecipients", kind)]
    if kind == "Delivery":
        delivery = _obj(event.get("delivery"), "delivery")
        recipients = delivery.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise Unparsable("Delivery: no delivery.recipients")
        smtp = delivery.get("smtpResponse")
        return [one(_address(r), Feedback.DELIVERED, delivery.get("timestamp", sent_at), None,
                    smtp[:DIAGNOSTIC_CAP] if isinstance(smtp, str) else None) for r in recipients]
    if kind == "DeliveryDelay":
        delay = _obj(event.get("deliveryDelay"), "deliveryDelay")
        return [one(_address(r.get("emailAddress")), Feedback.DELAYED, delay.get("timestamp", sent_at),
                    delay.get("delayType"), _diagnostic(r.get("status"), r.get("diagnosticCode")))
                for r in _recipients(delay, "delayedRecipients", kind)]
    if kind in ("Reject", "Rendering Failure", "RenderingFailure"):
        # About the whole email: every destination.
        if not destination:
            raise Unparsable(f"{kind}: no mail.destination")
        if kind == "Reject":
            detail = _obj(event.get("reject"), "reject").get("reason")
            feedback = Feedback.REJECTED
        else:
            failure = _obj(event.get("failure"), "failure")
            detail, feedback = failure.get("errorMessage"), Feedback.RENDER_FAILED
        text = detail[:DIAGNOSTIC_CAP] if isinstance(detail, str) else None
        return [one(r, feedback, sent_at, None, text) for r in destination]
    raise Unparsable(f"unknown event type {kind[:40]!r}")


def _recipients(section: dict[str, Any], key: str, kind: str) -> list[dict[str, Any]]:
    found = section.get(key)
    if not isinstance(found, list) or not found:
        raise Unparsable(f"{kind}: no {key}")
    return [_obj(r, f"{kind}: an entry of {key}") for r in found]
