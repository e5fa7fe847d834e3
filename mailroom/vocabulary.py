"""The words every part of mailroom shares: actions, statuses, outcomes, states, rows.

One definition each, imported by the ledger, the collector, the sender, the
supervisor and the monitor alike, so a value that crosses a process boundary or
the control socket means the same on both sides.  This module imports nothing of
the package.  The tuples of names (:data:`ACTION_NAMES`, :data:`BATCH_STATES` ...)
are derived from the enums here, for the places that want plain strings
(argument choices, Prometheus labels, table columns).

The enums are ``str`` / ``int`` subclasses: a member compares equal to, and is
stored in the database as, its plain value (``OutcomeKind.SENT == "sent"``,
``Action.RECOVERY == 2``), which is also what the original's wire format and
schema use.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from typing import NamedTuple


class Action(enum.IntEnum):
    """What a token is for; the value is its number in the batch line format."""

    ACTIVATION = 1
    RECOVERY = 2

    @property
    def priority(self) -> int:
        """The ledger's ``priority`` of its rows (recovery is claimed first)."""
        return 0 if self is Action.RECOVERY else 1

    @property
    def db_name(self) -> str:
        """The ``token_action`` enum label in the database."""
        return "activation" if self is Action.ACTIVATION else "password_recovery"



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


class RateThresholds(NamedTuple):
    """Where SES acts on an account's rate over its last 24 hours of sends: it
    puts the account under review at ``review`` and may pause its sending at
    ``pause`` (AWS's published figures, DESIGN.md 11)."""

    review: float
    pause: float

    def verdict(self, rate: float | None) -> str:
        """``ok``, ``review`` or ``pause``: the monitor's green, amber and red."""
        if rate is None or rate < self.review:
            return "ok"
        return "review" if rate < self.pause else "pause"


#: SES's thresholds for the bounce rate (5 % / 10 %) and the complaint rate (0.1 % / 0.5 %).
SES_BOUNCE = RateThresholds(0.05, 0.10)
SES_COMPLAINT = RateThresholds(0.001, 0.005)


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
    #: not sent: the action's template is missing or does not render; the row
    #: goes back to the queue with its attempt given back (not the row's fault)
    HELD = "held"


class BatchState(enum.StrEnum):
    """Where a batch is, from its claim to its end (the live table, ``batches {state}``,
    ``mailroom_batches_total{result}`` for the last four)."""

    CLAIMED = "claimed"
    SENDING = "sending"
    DONE = "done"  # every row sent, emitted or skipped
    PARTIAL = "partial"  # some rows sent, some failed or waiting for a retry
    FAILED = "failed"  # nothing sent: every row failed or waits for a retry
    RELEASED = "released"  # handed back to the queue unsent (paused sending, shutdown)


def batch_state(counts: Mapping[OutcomeKind, int], *, released: bool = False) -> BatchState:
    """The state of a finished batch from how many of its rows ended each way.

    ``counts`` maps each :class:`OutcomeKind` to a number of rows, as
    ``collections.Counter(outcome.kind for ...)`` does.  The one classification
    the event log, the monitor and ``/metrics`` all use: ``done`` when nothing
    failed or waits (a retry, a held template), ``failed`` when nothing was sent,
    else ``partial``.
    """
    if released:
        return BatchState.RELEASED
    if not any(counts.get(kind, 0) for kind in (OutcomeKind.FAILED, OutcomeKind.RETRY, OutcomeKind.HELD)):
        return BatchState.DONE
    if not counts.get(OutcomeKind.SENT, 0) and not counts.get(OutcomeKind.EMITTED, 0):
        return BatchState.FAILED
    return BatchState.PARTIAL


class RunState(enum.StrEnum):
    """The supervisor's state, as ``status`` and ``state.changed`` report it."""

    RUNNING = "running"
    PAUSED = "paused"  # an operator paused claims or sending
    DRAINING = "draining"
    SES_PAUSED = "ses_paused"  # SES said the account cannot send
    STOPPING = "stopping"


class Role(enum.StrEnum):
    """A supervised worker process."""

    COLLECTOR = "collector"
    SENDER = "sender"
    EVENTS = "events"  # only when MAILROOM_SES_EVENTS_QUEUE_URL is set


class WorkerState(enum.StrEnum):
    """A worker slot's state, as ``status`` and the worker events report it."""

    RUNNING = "running"
    DOWN = "down"  # between an exit and the restart
    EXITED = "exited"


class RestartReason(enum.StrEnum):
    """Why a worker was started again (``mailroom_worker_restarts_total{reason}``,
    ``worker.exited``): a crash alert must not fire on a reload."""

    PLANNED = "planned"  # asked for: SIGHUP, ``ctl restart``
    CRASH = "crash"  # exited or was killed without being asked


class Pausable(enum.StrEnum):
    """What an operator can pause (``pause {what}``, ``mailroom_paused{what}``)."""

    CLAIMS = "claims"
    SENDING = "sending"


class BatchMode(enum.StrEnum):
    """``MAILROOM_BATCH_MODE``: when the collector claims a batch."""

    ADAPTIVE = "adaptive"  # as soon as rows are there, bigger under load
    FIXED = "fixed"  # full batches, or what is there at the batch timeout


class SesVerdict(enum.StrEnum):
    """What one SES attempt meant for one destination."""

    SENT = "sent"
    EMITTED = "emitted"  # printed by the debug client, not sent
    RETRY = "retry"  # worth another attempt (counts against send_max_attempts)
    PAUSE = "pause"  # the account cannot send now: hold, probe later, no attempt burnt
    FAIL = "fail"  # permanent for this destination
    #: SES has no such template: the action is held (worker mode) or it is a failure
    NO_TEMPLATE = "no_template"


class SesResult(enum.StrEnum):
    """How one SES call ended, as a whole (``mailroom_ses_requests_total{result}``)."""

    OK = "ok"  # SES answered (whatever it said of each destination)
    THROTTLED = "throttled"
    ERROR = "error"


class SesBlock(enum.StrEnum):
    """Why the sender is not calling SES (:mod:`mailroom.sender.health`)."""

    PAUSED = "paused"  # SES said the account cannot send
    CIRCUIT = "circuit"  # whole calls in a row failed


def _values(kind: type[enum.Enum]) -> tuple[str, ...]:
    return tuple(str(member.value) for member in kind)


#: ``token_action`` labels, in wire-number order.
ACTION_NAMES = tuple(action.db_name for action in Action)
#: ``delivery_status`` labels, in lifecycle order.
DELIVERY_STATUSES = _values(DeliveryStatus)
BATCH_STATES = _values(BatchState)
#: The states a batch ends in (``mailroom_batches_total{result}``).
BATCH_RESULTS = (BatchState.DONE.value, BatchState.PARTIAL.value, BatchState.FAILED.value,
                 BatchState.RELEASED.value)
RUN_STATES = _values(RunState)
ROLES = _values(Role)
PAUSABLE = _values(Pausable)
RESTART_REASONS = _values(RestartReason)
SES_RESULTS = _values(SesResult)
#: ``mailroom_ses_events_total{type}``: each feedback, and events that matched no
#: delivery or could not be parsed (OPERATIONS.md 3).
SES_EVENT_TYPES = (*_values(Feedback), "unmatched", "unparsable")


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
