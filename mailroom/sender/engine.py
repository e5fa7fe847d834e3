"""The sender: batches of decoded rows in, one outcome per token out.

:class:`Sender` is the engine shared by the two ways of running it: the sender
worker forked by the supervisor (outcomes go back over its pipe to the ledger), and
:func:`mailroom.sender.stdin.run_stdin`, the compatibility mode of ``mailroom-collector | mailroom-sender``.

How a batch travels: :meth:`Sender.submit` splits it by action into calls of at most
50 destinations and queues them; sending threads take calls from a time-ordered
queue, wait for the rate limit, call ``SendBulkTemplatedEmail`` and resolve each
destination.  How many calls are in flight follows the rate limit and the measured
latency (:class:`~mailroom.sender.pacing.Concurrency`), within ``ses_concurrency``.
With ``fill_calls`` (the supervisor's sender) a thread that takes a call fills it
up to 50 destinations with the queued calls of the same action, whatever their
batch: under load every call is full; each destination's outcome still goes to
its own batch.  A retryable destination goes back into the queue with a
jittered exponential delay (a waiting retry never holds a thread); a paused account
holds or hands back what it cannot send, and one call probes later.
"""

# Longer than the house's ~400 lines on purpose: every method below shares one lock
# and the batches' bookkeeping (fill, attempt, apply, retry, hold, resolve, close);
# the parts that stand alone are already out (calls, health, pacing, raw, warm).

from __future__ import annotations

import collections
import concurrent.futures
import logging
import sys
import threading
import time
from typing import Any, TextIO

from mailroom._process import backoff
from mailroom.config import Settings
from mailroom.sender import health, pacing, raw, ses, warm
from mailroom.sender.calls import AUTO_CONCURRENCY, Batch, Call, SendPolicy
from mailroom.sender.template_hold import HELD_RETRY_AFTER, TemplateHold
from mailroom.vocabulary import Action, Outcome, OutcomeKind, SesResult, SesVerdict
from mailroom.wire import WireFields

log = logging.getLogger("mailroom.sender")

#: SES calls kept for the next heartbeat at most (one heartbeat a second).
CALL_LOG = 100_000

_PROBE = object()  # queue marker: time to probe a paused account


class Sender:
    """Sends batches through SES with retries, a rate limit and bounded concurrency.

    Nothing is created until :meth:`start` (no client, no thread), so an instance can
    be built before a fork.  :meth:`submit` never blocks; :meth:`close` finishes or
    hands back what is in flight.  ``stdout`` receives the requests in debug mode.
    """

    def __init__(
        self, settings: Settings, *, stdout: TextIO | None = None, policy: SendPolicy | None = None
    ) -> None:
        self.settings = settings
        self.policy = policy or SendPolicy()
        self._stdout = stdout
        self._client: Any = None
        self._bucket: pacing.TokenBucket | None = None
        self._raw: raw.RawResponseWriter | None = None
        self._schedule = pacing.Schedule()
        self._concurrency: pacing.Concurrency | None = None
        self._warm: warm.KeepWarm | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards the fields below
        self._batches: set[Batch] = set()
        self._idle = threading.Condition(self._lock)
        self._started = False
        self._closing = False
        self._defer_retries = False
        self.health = health.Health(
            lambda at: self._schedule.put(_PROBE, at),
            pause_base=self.policy.pause_base, pause_cap=self.policy.pause_cap,
            circuit_base=self.policy.circuit_base, circuit_cap=self.policy.circuit_cap,
            circuit_after=self.policy.circuit_after)
        self._stopping = threading.Event()  # wakes every wait when close() gives up
        #: SES calls made and not yet reported (:meth:`take_calls`): how each ended
        #: and how long it took.  Bounded, for a sender nobody asks (stdin mode).
        self._calls: collections.deque[tuple[SesResult, float]] = collections.deque(maxlen=CALL_LOG)
        #: Actions held for their template (None: not checked, see SendPolicy.hold_templates).
        self.templates: TemplateHold | None = None

    @property
    def concurrency(self) -> int:
        """SES calls allowed in flight now (0 before :meth:`start`)."""
        return self._concurrency.target() if self._concurrency else 0

    @property
    def rate(self) -> float | None:
        """The recipients-per-second limit in force (None: unlimited or not started)."""
        return self._bucket.rate if self._bucket else None

    @property
    def client(self) -> Any:
        """The SES client (or debug mode's printing client); None before :meth:`start`."""
        return self._client

    @property
    def bucket(self) -> pacing.TokenBucket | None:
        """The rate limit in force; None before :meth:`start`."""
        return self._bucket

    def set_rate(self, rate: float | None) -> None:
        """Limit sending to ``rate`` recipients/s (None: no limit) from now on.

        Calls already waiting for tokens or for a slot are woken to go at the new
        rate: none keeps sleeping for a wait computed at the old one."""
        if self._bucket is None:
            return
        self._bucket.set_rate(rate)
        if self._concurrency is not None:
            self._concurrency.rate_changed()

    @property
    def paused(self) -> bool:
        """True while SES says the account cannot send (a probe will tell when it can)."""
        return self.health.kind is not None

    def take_calls(self) -> list[tuple[SesResult, float]]:
        """The SES calls finished since the last time, ``(result, seconds)`` each
        (the worker's heartbeat carries them to ``/metrics``); thread-safe."""
        return [self._calls.popleft() for _ in range(len(self._calls))]

    def start(self) -> None:
        """Create the SES client and the sending threads, and read the send quota.

        In debug mode nothing is created and SES is never called.
        """
        if self._started:
            return
        self._started = True
        if self.settings.debug:
            # The same path as real sending, with a client that prints instead of
            # calling SES: one thread, so requests print in submission order.
            log.info("debug mode: printing each request on stdout, sending nothing")
            self._client = ses.PrintingClient(self._stdout or sys.stdout)
            concurrency, rate = 1, None
        else:
            concurrency = self.settings.ses_concurrency or AUTO_CONCURRENCY
            self._client = ses.make_client(
                self.settings,
                connect_timeout=self.policy.connect_timeout,
                read_timeout=self.policy.read_timeout,
                pool_size=concurrency,
            )
            self._raw = raw.RawResponseWriter(self.settings.ses_output_path,
                                              self.settings.ses_output_max_files,
                                              self.settings.ses_output_max_bytes)
            self._raw.attach(self._client)
            # Reading the quota also opens the first connection and has botocore
            # load its models: the first email does not pay for either.  With the
            # rate set by hand, the same call is made for the warm-up alone.
            self._warm = warm.KeepWarm(self._client, self._stopping, warm.IDLE_AFTER)
            rate = self.settings.ses_max_send_rate
            if rate is None:
                rate = ses.read_send_rate(self._client)
            else:
                self._warm.ping()
            self._warm.start()
            if self.policy.hold_templates:
                # Before the first batch: a template that does not render holds its
                # action from the start instead of after SES dropped its emails.
                self.templates = TemplateHold(self.settings)
                self.templates.check(self._client)
                self.templates.start()
        self._bucket = pacing.TokenBucket(rate)
        self._concurrency = pacing.Concurrency(concurrency, self._bucket, ses.MAX_DESTINATIONS)
        if not self.settings.debug:
            log.info(
                "sending through SES%s with %d calls in flight (at most %d), %s",
                f" at {self.settings.ses_endpoint_url}" if self.settings.ses_endpoint_url else "",
                self._concurrency.target(),
                concurrency,
                f"at most {rate:g} recipients/s" if rate else "no rate limit",
            )
        for number in range(concurrency):
            # Daemon threads: a call stuck past the shutdown deadline must not keep
            # the process alive; its tokens were already handed back as "retry".
            thread = threading.Thread(target=self._work, name=f"ses-send-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # --- submitting -----------------------------------------------------------------------

    def submit(self, rows: list[WireFields]) -> concurrent.futures.Future[list[Outcome]]:
        """Queue a batch; the future gives one :class:`Outcome` per row, in row order."""
        if not self._started or self._closing:
            raise RuntimeError("Sender.submit() needs start() and must come before close()")
        batch = Batch(len(rows))
        groups: dict[int, tuple[list[int], list[dict[str, Any]]]] = {}
        for index, (action, email, login, token, code) in enumerate(rows):
            if action not in (Action.ACTIVATION, Action.RECOVERY):
                self._resolve(batch, index, Outcome(OutcomeKind.FAILED, error=f"unknown action {action!r}"))
                continue
            try:
                address = ses.normalize_address(email)
            except ses.AddressError as exc:
                self._resolve(batch, index, Outcome(OutcomeKind.FAILED, error=f"bad address: {exc}"))
                continue
            held = self.templates.reason(action) if self.templates is not None else None
            if held is not None:
                outcome = Outcome(OutcomeKind.HELD, error=f"held: {held}", retry_after=HELD_RETRY_AFTER)
                self._resolve(batch, index, outcome)
                continue
            indices, destinations = groups.setdefault(action, ([], []))
            indices.append(index)
            destinations.append(ses.destination(address, ses.template_data(action, login, token, code)))
        size = ses.MAX_DESTINATIONS
        calls = [
            Call(batch, action, indices[i : i + size], destinations[i : i + size])
            for action, (indices, destinations) in groups.items()
            for i in range(0, len(indices), size)
        ]
        if calls:
            with self._lock:
                if not batch.done:
                    self._batches.add(batch)
            for call in calls:
                self._schedule.put(call)
        if not rows:
            self._finish(batch)
        return batch.future

    # --- sending --------------------------------------------------------------------------

    def _work(self) -> None:
        assert self._concurrency is not None
        while self._concurrency.enter():
            try:
                item = self._schedule.get()
                if item is None:
                    return
                try:
                    if item is _PROBE:
                        self._probe()
                    else:
                        self._send(item)
                except Exception:  # a bug must not kill the thread and strand the batch
                    log.exception("unexpected error in the sending thread")
                    if item is not _PROBE:
                        self._give_back(item, "sender error", 60.0)
            finally:
                self._concurrency.leave()

    def _fill(self, call: Call) -> list[Call]:
        """Queued calls of ``call``'s action that fit in the same SES call, due now."""

        def size(item: object) -> int | None:
            if isinstance(item, Call) and item.action == call.action and not item.batch.done:
                return len(item.destinations)
            return None

        return self._schedule.take_due(size, ses.MAX_DESTINATIONS - len(call.destinations))

    def _probe(self) -> None:
        call = self.health.take_probe()
        if call is not None:
            self._send(call, probe=True)

    def _send(self, call: Call, probe: bool = False) -> None:
        if call.batch.done:
            return  # given up at shutdown
        if not probe and self._hold_if_paused(call):
            return
        calls = [call, *self._fill(call)] if self.policy.fill_calls and not probe else [call]
        count = sum(len(c.destinations) for c in calls)
        if not self._bucket or not self._bucket.acquire(count, self._stopping):
            for each in calls:
                self._give_back(each, "sender stopping")
            return
        started = time.monotonic()
        if len(calls) == 1:
            verdicts, whole_call = self._attempt(call)
        else:
            # One request for all; each call gets the verdicts of its destinations.
            merged = [d for c in calls for d in c.destinations]
            verdicts, whole_call = self._attempt(Call(call.batch, call.action, [], merged, call.attempts))
        assert self._concurrency is not None
        self._concurrency.observe(time.monotonic() - started)
        if whole_call and any(v.kind == SesVerdict.RETRY for v in verdicts):
            # One SES call failed as a whole: the circuit counts it once, whatever it carried.
            reason = verdicts[0].detail or "retryable"
            if self.health.call_failed(reason, probe):
                # The circuit is open: these calls wait for the probe, no attempt counted.
                for each in calls:
                    self._hold_or_give_back(each, reason, probe)
                return
            if probe:  # no circuit: a probe that got no answer still ends the pause
                self._on_not_paused()
        offset = 0
        for each in calls:
            end = offset + len(each.destinations)
            self._apply(each, verdicts[offset:end], whole_call, probe)
            offset = end

    def _apply(self, call: Call, verdicts: list[ses.Verdict], whole_call: bool, probe: bool) -> None:
        """Resolve, retry or hold each destination of ``call`` by its verdict."""
        by_kind: dict[SesVerdict, list[int]] = {kind: [] for kind in SesVerdict}
        for position, verdict in enumerate(verdicts):
            by_kind[verdict.kind].append(position)
        # The pause state first: whoever sees the outcomes sees the state that led to them.
        if by_kind[SesVerdict.PAUSE]:
            reason = verdicts[by_kind[SesVerdict.PAUSE][0]].detail or "paused"
            self._on_paused(call.subset(by_kind[SesVerdict.PAUSE]), reason, probe)
        elif not (whole_call and by_kind[SesVerdict.RETRY]):  # a failed whole call: _send decided
            self._on_not_paused()
        for position in by_kind[SesVerdict.SENT]:
            outcome = Outcome(OutcomeKind.SENT, message_id=verdicts[position].detail)
            self._resolve(call.batch, call.indices[position], outcome)
        for position in by_kind[SesVerdict.EMITTED]:
            self._resolve(call.batch, call.indices[position], Outcome(OutcomeKind.EMITTED))
        if by_kind[SesVerdict.NO_TEMPLATE]:
            reason = verdicts[by_kind[SesVerdict.NO_TEMPLATE][0]].detail or "template does not exist"
            if self.templates is not None:
                self.templates.missing_at_send(call.action, reason)
                held = f"held: {self.templates.reason(call.action) or reason}"
                for position in by_kind[SesVerdict.NO_TEMPLATE]:
                    outcome = Outcome(OutcomeKind.HELD, error=held, retry_after=HELD_RETRY_AFTER)
                    self._resolve(call.batch, call.indices[position], outcome)
            else:
                by_kind[SesVerdict.FAIL] += by_kind[SesVerdict.NO_TEMPLATE]
        for position in by_kind[SesVerdict.FAIL]:
            outcome = Outcome(OutcomeKind.FAILED, error=verdicts[position].detail)
            self._resolve(call.batch, call.indices[position], outcome)
        if by_kind[SesVerdict.RETRY]:
            self._retry(call, by_kind[SesVerdict.RETRY], verdicts)

    def _attempt(self, call: Call) -> tuple[list[ses.Verdict], bool]:
        """One SendBulkTemplatedEmail call; one verdict per destination, and
        whether the call failed as a whole (no answer for any destination)."""
        request = ses.bulk_request(self.settings, call.action, call.destinations)
        count = len(call.destinations)
        if self._warm is not None:
            self._warm.touch()
        counted = not isinstance(self._client, ses.PrintingClient)  # debug mode calls no SES
        started = time.monotonic()
        try:
            response = self._client.send_bulk_templated_email(**request)
        except Exception as exc:  # noqa: BLE001 - classified below, bugs included
            if counted:
                self._calls.append((ses.call_result(exc), time.monotonic() - started))
            verdict = ses.classify_exception(exc)
            path = self._raw.write_last() if self._raw and ses.is_service_error(exc) else None
            log.warning(
                "SendBulkTemplatedEmail for %d destinations failed (attempt %d): %s%s",
                count,
                call.attempts + 1,
                verdict.detail,
                f"; raw response in {path}" if path else "",
            )
            return [verdict] * count, True
        if counted:
            self._calls.append((ses.call_result(None), time.monotonic() - started))
        statuses = response.get("Status") or []
        verdicts = [ses.classify_status(entry) for entry in statuses[:count]]
        # Fewer statuses than destinations should not happen; losing an email is
        # worse than sending one twice, so the missing ones are retried.
        missing = ses.Verdict(SesVerdict.RETRY, "no status for this destination in the response")
        verdicts += [missing] * (count - len(verdicts))
        return verdicts, False

    def _retry(self, call: Call, positions: list[int], verdicts: list[ses.Verdict]) -> None:
        attempts = call.attempts + 1
        here = self.policy.in_process_attempts
        if here is not None and attempts >= here:
            # Back to the ledger, which counts the attempt and waits by its count.
            reason = verdicts[positions[0]].detail or "retryable"
            self._give_back(call.subset(positions), f"{reason} ({attempts} tries in this claim)")
            return
        if attempts >= self.settings.send_max_attempts:
            for position in positions:
                error = f"{verdicts[position].detail} (gave up after {attempts} attempts)"
                self._resolve(call.batch, call.indices[position], Outcome(OutcomeKind.FAILED, error=error))
            return
        reason = verdicts[positions[0]].detail or "retryable"
        delay = backoff(attempts - 1, self.policy.backoff_base, self.policy.backoff_cap)
        again = call.subset(positions)
        with self._lock:  # against close(defer_retries=True) emptying the queue meanwhile
            defer = self._defer_retries
            if not defer:
                self._schedule.put(again, time.monotonic() + delay)
        if defer:
            self._give_back(again, reason, delay)
        else:
            log.info("retrying %d destinations in %.2f s (attempt %d: %s)",
                     len(positions), delay, attempts, reason)

    # --- paused account ----------------------------------------------------------------

    def _hold_if_paused(self, call: Call) -> bool:
        """Keep or hand back ``call`` while SES is not being called; False to call."""
        wait = self.health.wait()
        if wait is None:
            return False
        self._hold_or_give_back(call, self.health.describe(), False)
        return True

    def _hold_or_give_back(self, call: Call, reason: str, probe: bool) -> None:
        with self._lock:
            hold = self.policy.hold_when_paused and not self._defer_retries
            if hold:
                # A probe's destinations go first when sending resumes.
                self.health.hold(call, first=probe)
        if not hold:
            self._give_back(call, reason, self.health.wait() or 0.0)

    def _on_paused(self, call: Call, reason: str, probe: bool) -> None:
        # The paused destinations keep their attempt count: a pause is not their fault.
        call.attempts -= 1
        self.health.paused(reason, probe)
        self._hold_or_give_back(call, reason, probe)

    def _on_not_paused(self) -> None:
        for call in self.health.answered():
            self._schedule.put(call)

    # --- outcomes ------------------------------------------------------------------------

    def _give_back(self, call: Call, reason: str, retry_after: float | None = None) -> None:
        for index in call.indices:
            self._resolve(call.batch, index, Outcome(OutcomeKind.RETRY, error=reason, retry_after=retry_after))

    def _resolve(self, batch: Batch, index: int, outcome: Outcome) -> None:
        with batch.lock:
            if batch.done or batch.outcomes[index] is not None:
                return  # e.g. a call that returned after close() gave up on it
            batch.outcomes[index] = outcome
            batch.pending -= 1
            last = batch.pending == 0
        if last:
            self._finish(batch)

    def _finish(self, batch: Batch, fill: Outcome | None = None) -> None:
        with batch.lock:
            if batch.done:
                return
            batch.done = True
            outcomes = [o if o is not None else fill for o in batch.outcomes]
        # Result (and so the caller's callbacks) first, then "idle": close() must not
        # return while a callback still has to report the batch.
        batch.future.set_result(outcomes)  # type: ignore[arg-type]
        with self._lock:
            self._batches.discard(batch)
            if not self._batches:
                self._idle.notify_all()

    # --- closing -------------------------------------------------------------------------

    def close(self, timeout: float | None = None, *, defer_retries: bool = False) -> None:
        """Stop taking batches and finish those in flight, waiting at most ``timeout`` s.

        ``timeout=None`` waits for everything, retries and pauses included.  When the
        time is up, every token not yet resolved resolves to ``"retry"`` (a call still
        on the wire is abandoned: if SES accepted it, the token may go out twice, the
        usual crash window).  ``defer_retries`` hands back at once what waits for a
        retry or a paused account instead of waiting for it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closing = True
            if defer_retries:
                self._defer_retries = True
        held = self.health.take_held() if defer_retries else []
        if defer_retries:
            now = time.monotonic()
            for due, item in self._schedule.take_all():
                if item is _PROBE:
                    continue
                if due <= now:
                    self._schedule.put(item, due)  # due now: still worth sending
                else:
                    self._give_back(item, "not sent: sender stopping", due - now)
            for call in held:
                self._give_back(call, "not sent: sender stopping", self.health.wait() or 0.0)
        with self._lock:
            while self._batches:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._idle.wait(remaining)
            left = list(self._batches)
        if left:
            log.warning("shutdown: %d batches not finished in time; their tokens are handed back",
                        len(left))
        self._stopping.set()
        if self._bucket is not None:
            self._bucket.interrupt()  # a call waiting for tokens sees the stop now
        if self.templates is not None:
            self.templates.stop()
        if self._concurrency is not None:
            self._concurrency.close()
        for batch in left:
            self._finish(batch, Outcome(OutcomeKind.RETRY, error="not sent: sender stopped", retry_after=0.0))
        self._schedule.close()
