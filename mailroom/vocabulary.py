"""The words every part of mailroom shares: actions, delivery statuses, outcomes, rows.

One definition each, imported by the ledger, the collector, the sender and the
supervisor alike, so a value that crosses a process boundary means the same on
both sides.  This module imports nothing of the package.

The enums are ``str`` / ``int`` subclasses: a member compares equal to, and is
stored in the database as, its plain value (``OutcomeKind.SENT == "sent"``,
``Action.RECOVERY == 2``), which is also what the original's wire format and
schema use.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import NamedTuple


class Action(enum.IntEnum):
    """What a token is for; the value is its number in the batch line format."""

    ACTIVATION = 1
    RECOVERY = 2

    @property
    def db_name(self) -> str:
        """The ``token_action`` enum label in the database."""
        return "activation" if self is Action.ACTIVATION else "password_recovery"

    @classmethod
    def from_db(cls, name: str) -> Action:
        """The action whose ``token_action`` label is ``name``."""
        if name == "activation":
            return cls.ACTIVATION
        if name == "password_recovery":
            return cls.RECOVERY
        raise ValueError(f"unknown token action {name!r}")


class DeliveryStatus(enum.StrEnum):
    """A ``deliveries.status`` (the ``delivery_status`` type), in lifecycle order."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    SENT = "sent"
    EMITTED = "emitted"  # printed (compatibility mode's stdout, or debug mode), not sent
    FAILED = "failed"
    SKIPPED = "skipped"


class Feedback(enum.StrEnum):
    """What SES said became of a sent email (``deliveries.feedback``, the
    ``delivery_feedback`` type; DESIGN.md 11), in ascending precedence: a
    delivery shows the highest of its events, whatever order they came in."""

    DELAYED = "delayed"  # DeliveryDelay: SES still trying
    DELIVERED = "delivered"  # the receiving server accepted it
    SOFT_BOUNCED = "soft_bounced"  # Bounce, Transient or Undetermined
    RENDER_FAILED = "render_failed"  # Rendering Failure: the template did not render
    REJECTED = "rejected"  # Reject: SES refused it (virus)
    BOUNCED = "bounced"  # Bounce, Permanent: the address is suppressed
    COMPLAINED = "complained"  # Complaint: marked as spam; the address is suppressed


#: Feedback that puts the address on the suppression list.
SUPPRESSING = frozenset({Feedback.BOUNCED, Feedback.COMPLAINED})


class DeliveryEvent(NamedTuple):
    """One SES event for one recipient, as the events worker parsed it and
    :func:`mailroom.ledger.events.record_events` records it.

    ``message_id`` is SES's MessageId (what the ledger kept at ``sent``),
    ``recipient`` the address as SES reports it, ``subtype`` SES's own word
    (``Permanent``, ``Transient``, ``abuse``, ...), ``diagnostic`` a short
    reason (``5.1.1 user unknown``), ``raw`` the event's JSON, capped.
    """

    message_id: str
    recipient: str
    type: Feedback
    event_at: dt.datetime
    subtype: str | None = None
    diagnostic: str | None = None
    raw: str | None = None


class OutcomeKind(enum.StrEnum):
    """What became of one token of a batch the sender handled."""

    SENT = "sent"  # SES accepted it (``message_id`` set)
    EMITTED = "emitted"  # debug mode: the request was printed, nothing was sent
    FAILED = "failed"  # refused for good, or out of attempts (``error`` says why)
    RETRY = "retry"  # not sent now; may be queued again after ``retry_after`` s
    SKIPPED = "skipped"  # never handed to SES (no longer eligible)


class Outcome(NamedTuple):
    """The outcome of one token: a :class:`OutcomeKind` and its details.

    ``message_id`` is SES's MessageId for ``sent``; ``error`` the reason for
    anything else; ``retry_after`` (seconds) when a ``retry`` should wait.
    """

    kind: OutcomeKind
    message_id: str | None = None
    error: str | None = None
    retry_after: float | None = None


#: A claimed ledger row, as the claim returns it and the wire encoder reads it:
#: ``(action 1|2, email, login, token secret (32 bytes), code, token id)``.
#: A plain tuple rather than a class: a drain builds a million of them.
Row = tuple[int, str, str, bytes, str, int]

#: Outcomes of a batch, each with the token id it belongs to.
TokenOutcomes = list[tuple[int, Outcome]]
