"""One vocabulary: every part classifies a batch and names a state the same way."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailroom import tokens, wire
from mailroom.control import ctl, protocol
from mailroom.control.metrics import Metrics
from mailroom.monitor.model import MonitorState
from mailroom.vocabulary import (
    ACTION_NAMES,
    BATCH_RESULTS,
    BATCH_STATES,
    DELIVERY_STATUSES,
    Action,
    BatchState,
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
