"""Protecting the SES account: pause claims past a bounce or complaint rate (DESIGN.md 11).

SES reviews an account at a 5 % bounce rate or a 0.1 % complaint rate over its
last 24 hours of sends and may pause it at 10 % / 0.5 %.  With
``MAILROOM_PAUSE_BOUNCE_RATE`` / ``MAILROOM_PAUSE_COMPLAINT_RATE`` set (off by
default; ``0.04`` / ``0.0008`` keep a margin below the review), the supervisor
stops claiming by itself before SES stops the account.

The rates come from the ledger, read by the events worker (the supervisor holds no
database connection) and carried in its heartbeats as
:func:`mailroom.ledger.report.deliverability`: deliveries sent, bounced for good
and complained over the last 24 h, and the id of the newest bounce or complaint
event.  :class:`AccountGuard` only judges them:

- Nothing is judged below ``MAILROOM_PAUSE_MIN_SENDS`` sends (default 1,000) in
  the window: three bounces out of ten sends do not stop a new system.
- Past a limit, :meth:`AccountGuard.judge` gives the reason once; the operator
  pauses claims (the same pause as ``ctl pause claims``) and says why once: a log
  line, an ``account.paused`` event, the monitor's banner (``status['guard']``).
- ``ctl resume`` resumes.  The numbers a person resumed on do not pause again: the
  guard remembers the newest bounce or complaint event it had seen and pauses again
  only once a newer one arrives while a rate is still past its limit.  Rates that
  merely stay high (the window has not moved on yet) leave the operator's decision
  alone; a new bounce or complaint on top of them is new information.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AccountGuard"]


class AccountGuard:
    """The automatic pause's memory (see the module docstring)."""

    def __init__(self, bounce_limit: float | None, complaint_limit: float | None, min_sends: int) -> None:
        self.bounce_limit = bounce_limit
        self.complaint_limit = complaint_limit
        self.min_sends = min_sends
        #: Why claims are paused by the guard; None when it did not pause them
        #: (or a person resumed since).
        self.reason: str | None = None
        #: The newest bounce or complaint event id a person resumed on.
        self.resumed_on = 0
        self._seen = 0  # the newest such id in the latest deliverability

    @property
    def enabled(self) -> bool:
        return self.bounce_limit is not None or self.complaint_limit is not None

    def judge(self, deliverability: dict[str, Any]) -> str | None:
        """The reason to pause claims now, once; None otherwise (below the limits,
        too few sends, already paused by the guard, or nothing new since a resume)."""
        self._seen = int(deliverability.get("last_bad_event") or 0)
        if not self.enabled or self.reason is not None:
            return None
        sent = int(deliverability.get("sent") or 0)
        if sent < self.min_sends or self._seen <= self.resumed_on:
            return None
        past = []
        for name, limit in (("bounce", self.bounce_limit), ("complaint", self.complaint_limit)):
            rate = deliverability.get(f"{name}_rate")
            if limit is not None and rate is not None and rate >= limit:
                count = deliverability.get("bounced" if name == "bounce" else "complained")
                past.append(f"{name} rate {rate * 100:.2f} % ({count} of {sent} sent in 24 h)"
                            f" reached MAILROOM_PAUSE_{name.upper()}_RATE {limit * 100:g} %")
        if not past:
            return None
        self.reason = "; ".join(past)
        return self.reason

    def resumed(self) -> None:
        """A person resumed claims: forget the reason; only a newer bounce or
        complaint pauses again."""
        self.reason = None
        self.resumed_on = self._seen

    def as_status(self) -> dict[str, Any]:
        return {"pause_bounce_rate": self.bounce_limit, "pause_complaint_rate": self.complaint_limit,
                "min_sends": self.min_sends, "paused_reason": self.reason}
