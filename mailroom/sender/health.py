"""Whether SES may be called now: a paused account, or an open circuit.

Two conditions stop the sender from calling SES, and both are handled the same
way: the calls that cannot go out are *held* (or, when the policy says so,
handed back), one call probes at a slowly growing interval, and the first
answer that is not the same condition again resumes everything held.

* **Paused**: SES said the account (or configuration set) cannot send, or the
  daily quota is spent.  Not the destinations' fault: no attempt is counted.
* **Circuit open**: ``circuit_after`` whole calls in a row failed with a
  retryable error (connection refused, throttling, HTTP 5xx, an unreadable
  answer).  Every further call would fail the same way and spend its
  destinations' attempts, so calling stops until a probe gets an answer.

:class:`Health` keeps that state and the held calls; the engine
(:mod:`mailroom.sender.engine`) asks it before each call and tells it each
result.  It logs one line when sending stops and one when it resumes; the
failed probes in between are DEBUG.  The sender worker's heartbeat reports
whether SES is being called (``paused`` of its quota stats).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mailroom._process import backoff
from mailroom.vocabulary import SesBlock

log = logging.getLogger("mailroom.sender")

class Health:
    """Pause and circuit state of one sender; thread-safe.

    ``schedule_probe(at)`` asks the engine to run :meth:`take_probe` at the
    monotonic time ``at``.  Delays: ``pause_base`` doubling up to ``pause_cap``
    for a paused account, ``circuit_base`` up to ``circuit_cap`` for an open
    circuit (an outage is usually shorter than a pause).
    """

    def __init__(self, schedule_probe: Callable[[float], None], *, pause_base: float,
                 pause_cap: float, circuit_base: float, circuit_cap: float,
                 circuit_after: int | None) -> None:
        self._schedule_probe = schedule_probe
        self._delays = {SesBlock.PAUSED: (pause_base, pause_cap), SesBlock.CIRCUIT: (circuit_base, circuit_cap)}
        self.circuit_after = circuit_after
        self._lock = threading.Lock()
        self.kind: SesBlock | None = None  # None: calling SES
        self.reason: str | None = None
        self.since = 0.0
        self.probe_at = 0.0
        self._level = 0
        self._failures = 0  # whole calls failed in a row
        self.held: list[Any] = []

    def describe(self) -> str:
        """Why a call is not being made, for the outcome of one handed back."""
        what = "SES account sending is paused" if self.kind == SesBlock.PAUSED else "SES circuit open"
        return f"{what} ({self.reason})" if self.reason else what

    def wait(self) -> float | None:
        """Seconds until the next probe when blocked, None when SES may be called."""
        with self._lock:
            if self.kind is None:
                return None
            return max(0.0, self.probe_at - time.monotonic())

    def hold(self, call: Any, first: bool = False) -> None:
        """Keep ``call`` until sending resumes (a probe's goes first)."""
        with self._lock:
            self.held.insert(0 if first else len(self.held), call)

    def take_held(self) -> list[Any]:
        """Every held call, no longer held (shutdown hands them back)."""
        with self._lock:
            held, self.held = self.held, []
        return held

    def take_probe(self) -> Any:
        """The call to probe with, or None: then nothing is held, and the next
        call that comes along is the probe (the block is lifted for it)."""
        with self._lock:
            if self.held:
                return self.held.pop(0)
            self.kind = None
            return None

    def paused(self, reason: str, probe: bool) -> float:
        """SES said the account cannot send; returns the seconds until the probe."""
        return self._block(SesBlock.PAUSED, reason, probe)

    def call_failed(self, reason: str, probe: bool) -> bool:
        """A whole call failed with a retryable error.  True when the circuit is
        (now, or still) open: the caller holds the call instead of retrying it."""
        with self._lock:
            self._failures += 1
            trips = self.circuit_after is not None and (
                self._failures >= self.circuit_after or (probe and self.kind is not None))
        if trips:
            self._block(SesBlock.CIRCUIT, f"{self._failures} calls in a row failed, the last: {reason}", probe)
        return trips

    def answered(self) -> list[Any]:
        """SES answered (whatever it said of each destination): resume; return
        the held calls to send now."""
        with self._lock:
            self._failures = 0
            if self.kind is None and not self._level:
                return []
            was, since = self.kind, self.since
            self.kind, self.reason, self._level = None, None, 0
            held, self.held = self.held, []
        if was is not None or held:
            log.warning("SES sending resumed after %.0f s; sending %d held calls",
                        time.monotonic() - since, len(held))
        return held

    def _block(self, kind: SesBlock, reason: str, probe: bool) -> float:
        with self._lock:
            now = time.monotonic()
            if self.kind is not None and not probe:
                return max(0.0, self.probe_at - now)  # already blocked, probe scheduled
            first = self.kind is None and not self._level
            if first:
                self.since = now
            self.kind, self.reason = kind, reason
            self._level += 1
            base, cap = self._delays[kind]
            delay = backoff(self._level - 1, base, cap)
            self.probe_at = now + delay
        self._schedule_probe(self.probe_at)
        if first:
            what = "paused" if kind == SesBlock.PAUSED else "stopped: circuit open"
            log.warning("SES sending is %s (%s); probing every %.3g s up to %.3g s, no attempt counted",
                        what, reason, base, cap)
        else:
            log.debug("SES still not sending (%s); next probe in %.3g s", reason, delay)
        return delay
