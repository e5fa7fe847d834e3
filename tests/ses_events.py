"""SES event messages shaped like SES's documented examples (event publishing, "Examples of
event data that Amazon SES publishes to Amazon SNS"), for the parser's tests and for the
end-to-end tests that put them on a moto SQS queue."""

from __future__ import annotations

import json
from typing import Any

T = "2026-12-01T12:00:00.000Z"


def mail(message_id: str, destination: list[str]) -> dict[str, Any]:
    return {"timestamp": T, "source": "noreply@mailroom.test", "sourceArn": "arn:aws:ses:us-east-1:1:identity/x",
            "sendingAccountId": "123456789012", "messageId": message_id, "destination": destination,
            "headersTruncated": False, "tags": {"ses:configuration-set": ["default"]}}


def bounce(message_id: str, *recipients: str, permanent: bool = True, at: str = "2026-12-01T12:00:01.000Z",
           key: str = "eventType") -> dict[str, Any]:
    return {key: "Bounce", "mail": mail(message_id, list(recipients)), "bounce": {
        "bounceType": "Permanent" if permanent else "Transient",
        "bounceSubType": "General",
        "bouncedRecipients": [{"emailAddress": r, "action": "failed", "status": "5.1.1" if permanent else "4.2.2",
                               "diagnosticCode": "smtp; 550 5.1.1 user unknown" if permanent
                               else "smtp; 452 4.2.2 mailbox full"} for r in recipients],
        "timestamp": at, "feedbackId": "0100-bounce", "reportingMTA": "dsn; mta.example.com"}}


def complaint(message_id: str, *recipients: str, at: str = "2026-12-01T12:00:02.000Z") -> dict[str, Any]:
    return {"eventType": "Complaint", "mail": mail(message_id, list(recipients)), "complaint": {
        "complainedRecipients": [{"emailAddress": r} for r in recipients], "timestamp": at,
        "feedbackId": "0100-complaint", "userAgent": "Mozilla/5.0", "complaintFeedbackType": "abuse",
        "arrivalDate": at}}


def delivery(message_id: str, *recipients: str, at: str = "2026-12-01T12:00:00.500Z") -> dict[str, Any]:
    return {"eventType": "Delivery", "mail": mail(message_id, list(recipients)), "delivery": {
        "timestamp": at, "processingTimeMillis": 546, "recipients": list(recipients),
        "smtpResponse": "250 2.6.0 Message received", "reportingMTA": "a8-70.smtp-out.amazonses.com"}}


def reject(message_id: str, *recipients: str) -> dict[str, Any]:
    return {"eventType": "Reject", "mail": mail(message_id, list(recipients)), "reject": {"reason": "Bad content"}}


def rendering_failure(message_id: str, *recipients: str) -> dict[str, Any]:
    return {"eventType": "Rendering Failure", "mail": mail(message_id, list(recipients)), "failure": {
        "errorMessage": "Attribute 'login' is not present in the rendering data.", "templateName": "activationv1"}}


def delivery_delay(message_id: str, *recipients: str) -> dict[str, Any]:
    return {"eventType": "DeliveryDelay", "mail": mail(message_id, list(recipients)), "deliveryDelay": {
        "timestamp": "2026-12-01T12:05:00.000Z", "delayType": "TransientCommunicationFailure",
        "expirationTime": "2026-12-01T18:00:00.000Z",
        "delayedRecipients": [{"emailAddress": r, "status": "4.4.1", "diagnosticCode": "smtp; 421 4.4.1 timed out"}
                              for r in recipients]}}


def sns(event: dict[str, Any], sns_id: str = "sns-1") -> str:
    """The SNS envelope an SQS subscription without raw delivery receives."""
    return json.dumps({"Type": "Notification", "MessageId": sns_id, "TopicArn": "arn:aws:sns:us-east-1:1:ses",
                       "Message": json.dumps(event), "Timestamp": T, "SignatureVersion": "1"})


def raw(event: dict[str, Any]) -> str:
    return json.dumps(event)
