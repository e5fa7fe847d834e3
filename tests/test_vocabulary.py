"""One vocabulary: every part classifies a batch and names a state the same way."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailroom import tokens, wire
from mailroom.control import ctl, protocol
from mailroom.control.metrics import Metrics
from mailroom.monitor.model import BATCH_COUNTS, SES_NUMBERS, MonitorState
from mailroom.supervisor import messages as msg
from mailroom.supervisor.router import Router
from mailroom.vocabulary import (
    ACTION_NAMES,
    BATCH_RESULTS,
    BATCH_STATES,
    DELIVERY_STATUSES,
    Action,
    BatchState,
    Outcome,
    OutcomeKind,
    batch_state,
)

K = OutcomeKind

#: (sent, emitted, failed, retry, skipped) -> the state every part must agree on.
CASES = [
    ((10, 0, 0, 0, 0), BatchState.DONE),
    ((0, 4, 0, 0, 0), BatchState.DONE),       # debug mode: printed rows are done with
    ((7, 0, 0, 0, 3), BatchState.DONE),       # skipped rows were never due: nothing is wrong
    ((0, 0, 0, 0, 5), BatchState.DONE),
    ((6, 0, 1, 0, 0), BatchState.PARTIAL),
    ((6, 0, 0, 2, 0), BatchState.PARTIAL),    # the monitor once called this one partial ...
    ((0, 0, 0, 3, 0), BatchState.FAILED),     # ... and this one partial too; /metrics said failed
    ((0, 0, 4, 0, 0), BatchState.FAILED),
    ((0, 0, 2, 2, 1), BatchState.FAILED),
]


def _counts(numbers: tuple[int, ...]) -> Counter[OutcomeKind]:
    kinds = (K.SENT, K.EMITTED, K.FAILED, K.RETRY, K.SKIPPED)
    return Counter({kind: n for kind, n in zip(kinds, numbers, strict=True) if n})


@pytest.mark.parametrize(("numbers", "expected"), CASES)
def test_batch_state_of_the_counts(numbers: tuple[int, ...], expected: BatchState) -> None:
    assert batch_state(_counts(numbers)) is expected
    assert batch_state(_counts(numbers), released=True) is BatchState.RELEASED


@pytest.mark.parametrize(("numbers", "expected"), CASES)
def test_the_monitor_and_the_metrics_classify_a_batch_as_batch_state_does(
        numbers: tuple[int, ...], expected: BatchState) -> None:
    sent, emitted, failed, retry, skipped = numbers
    # The monitor, given a batch.done without a state (an older supervisor).
    state = MonitorState()
    state.apply_event({"event": "batch.done", "data": {"batch": "b-1", "rows": sum(numbers),
                                                       "sent": sent + emitted, "failed": failed,
                                                       "retry": retry, "skipped": skipped}})
    assert state.batches["b-1"].state == expected
    # /metrics, given the outcomes by action.
    metrics = Metrics()
    metrics.batch_done(Counter({(Action.ACTIVATION, kind): n for kind, n in _counts(numbers).items()}), 0.1)
    results = {sample.labels["result"]: sample.value
               for family in text_string_to_metric_families(metrics.render().decode())
               for sample in family.samples if sample.name == "mailroom_batches_total"}
    assert results == {result: float(result == expected) for result in BATCH_RESULTS}


def test_the_names_come_from_one_place() -> None:
    assert ACTION_NAMES == ("activation", "password_recovery")
    assert DELIVERY_STATUSES == ("queued", "claimed", "sent", "emitted", "failed", "skipped")
    assert set(BATCH_RESULTS) < set(BATCH_STATES)
    # The control socket accepts every batch state, and `mailroom ctl` offers them.
    batches = protocol.COMMANDS["batches"]
    assert protocol.check_args(batches, {"state": "released"}) == {"state": "released"}
    with pytest.raises(protocol.ControlError):
        protocol.check_args(batches, {"state": "finished"})
    assert ctl._parser().parse_args(["batches", "--state", "partial"]).state == "partial"


def test_an_action_is_its_wire_number_and_its_database_label() -> None:
    assert [int(a) for a in Action] == [1, 2]
    assert not hasattr(wire, "ACTIVATION") and not hasattr(wire, "RECOVERY")
    key = bytes(range(32))
    signer = wire.Signer(key)
    secret = bytes(32)
    token = signer.sign(Action.RECOVERY, secret, "12345")
    assert tokens.verify(key, token, "password_recovery", code="12345") == secret
    assert tokens.verify(key, token, Action.RECOVERY, code="12345") == secret
    assert tokens.verify(key, token, Action.ACTIVATION) is None
    with pytest.raises(ValueError, match="1 or 'activation', 2 or 'password_recovery'"):
        tokens.verify(key, token, "recovery")


# -- typed events: built once by the supervisor, read by the monitor by the same names


def _route() -> tuple[Router, list[msg.BatchEvent], list[str]]:
    events: list[msg.BatchEvent] = []
    released: list[str] = []
    router = Router(lambda role, message: True, on_event=events.append,
                    on_released=lambda batch: released.append(batch.batch_id))
    return router, events, released


def test_the_router_reports_each_batch_as_typed_events() -> None:
    router, events, _ = _route()
    router.on_claimed(msg.Claimed("b-1", b"line", [1, 2, 3], 2, 1, None))
    outcomes = [(1, Outcome(OutcomeKind.SENT, "m-1")), (2, Outcome(OutcomeKind.FAILED, error="bad")),
                (3, Outcome(OutcomeKind.RETRY, error="later"))]
    router.on_outcomes(msg.BatchOutcomes("b-1", outcomes))
    claimed, dispatched, done = events
    assert claimed == msg.BatchClaimed("b-1", 3, 2, 1) and dispatched == msg.BatchDispatched("b-1")
    assert isinstance(done, msg.BatchDone)
    assert (done.rows, done.sent, done.failed, done.retry, done.skipped) == (3, 1, 1, 1, 0)
    assert done.state is BatchState.PARTIAL and done.error == "bad"
    assert set(done.payload()) == {f.name for f in dataclasses.fields(msg.BatchDone)}


def test_a_released_batch_is_done_as_released_and_counted_once() -> None:
    router, events, released = _route()
    router.holding = True  # an operator paused sending: the claim is held, then released
    router.on_claimed(msg.Claimed("b-2", b"line", [4, 5], 2, 0, None))
    router.release("b-2")
    claimed, done = events
    assert isinstance(done, msg.BatchDone) and done.state is BatchState.RELEASED
    assert (done.rows, done.retry, done.sent) == (2, 2, 0) and released == ["b-2"]


def test_the_monitor_reads_the_supervisors_own_payloads() -> None:
    state = MonitorState()
    done = msg.BatchDone("b-3", 5, 4, 1, 3, 1, 1, 0, 0, 12.5, "MessageRejected", BatchState.PARTIAL)
    worker = msg.WorkerInfo("sender", 42, True, "running", 3.0, 1.7e9, 2, 0.4, 1.7e9, 123456)
    ses = msg.SesQuota(max_send_rate=14.0, max_24h_send=50_000.0, sent_last_24h=31_200.0, paused=True)
    tick = msg.Tick(7.5, 0.5, {"sender": worker}, 3, 120, 4.0, 14.0, 20.0, ses)
    for event in (done, tick):  # through JSON, as the control socket carries them
        state.apply_event(json.loads(json.dumps({"event": event.EVENT, "data": event.payload()})))
    batch = state.batches["b-3"]
    assert [getattr(batch, name) for name in BATCH_COUNTS] == [5, 4, 1, 3, 1, 1, 0, 0]
    assert (batch.state, batch.ms, batch.error) == ("partial", 12.5, "MessageRejected")
    t = state.tick
    assert (t.sent_per_s, t.failed_per_s, t.in_flight, t.queue_depth, t.oldest_queued_s, t.rate_limit,
            t.rate_cap) == (7.5, 0.5, 3, 120, 4.0, 14.0, 20.0)
    assert [getattr(t, name) for name in SES_NUMBERS] == [14.0, 50_000.0, 31_200.0] and t.ses_paused
    w = state.workers["sender"]
    assert (w.pid, w.state, w.restarts, w.rss) == (42, "running", 2, 123456)
