"""The monitor's adapter (model.py) and backoff, without a UI: whatever arrives, no exception."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom._process import backoff
from mailroom.monitor.feed import BACKOFF_BASE_S, BACKOFF_CAP_S
from mailroom.monitor.model import MAX_BATCHES, MonitorState, as_epoch, as_int, destinations

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
EVENTS = st.sampled_from(["batch.claimed", "batch.dispatched", "batch.done", "worker.started",
                          "worker.exited", "state.changed", "tick", "audit", "x"])
FIELDS = st.sampled_from(["batch", "rows", "sent", "failed", "ms", "error", "state", "worker", "pid",
                          "paused", "ses", "sent_per_s", "queue_depth", "started", "rss"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    json_values,
    st.fixed_dictionaries({"event": EVENTS, "seq": json_values,
                           "data": st.dictionaries(FIELDS, json_values, max_size=6)}),
), max_size=20), json_values)
def test_any_event_or_snapshot_is_absorbed(messages: list, snapshot: object) -> None:
    state = MonitorState()
    state.apply_snapshot(snapshot)
    for message in messages:
        state.apply_event(message)
    state.failed_last_15min()
    # Whatever came before, a minute of well-formed ticks at 2.5 sent/s reads 150/min
    # (the mean is over the last 60 ticks, so the garbage ones have scrolled out).
    for _ in range(60):
        state.apply_event({"event": "tick", "data": {"sent_per_s": 2.5}})
    assert state.sent_per_min == 150.0
    destinations(snapshot)


def test_batches_are_capped_and_done_state_is_derived() -> None:
    state = MonitorState()
    for n in range(MAX_BATCHES + 20):
        state.apply_event({"event": "batch.claimed", "seq": n + 1, "data": {"batch": f"b{n}"}})
    assert len(state.batches) == MAX_BATCHES and next(iter(state.batches)) == "b20"
    state.apply_event({"event": "batch.done", "seq": 1000,
                       "data": {"batch": "b30", "sent": 0, "failed": 3}})
    assert state.batches["b30"].state == "failed" and state.failed_last_15min() == 3
    assert state.gap  # 520 -> 1000


def test_coercions() -> None:
    assert as_int("12") == 12 and as_int(True) is None and as_int(float("nan")) is None
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert as_epoch(when.isoformat()) == when.timestamp() == as_epoch(when.timestamp())
    assert as_epoch("yesterday") is None and as_epoch([1]) is None


def test_the_feeds_reconnect_backoff_is_jittered_and_capped() -> None:
    # The feed's delays are the house's backoff (_process.backoff) with its own bounds.
    assert backoff(0, BACKOFF_BASE_S, BACKOFF_CAP_S, jitter=False) == 0.25
    assert backoff(50, BACKOFF_BASE_S, BACKOFF_CAP_S, jitter=False) == BACKOFF_CAP_S
    first = [backoff(0, BACKOFF_BASE_S, BACKOFF_CAP_S) for _ in range(200)]
    late = [backoff(50, BACKOFF_BASE_S, BACKOFF_CAP_S) for _ in range(200)]
    assert all(0.125 <= d <= 0.25 for d in first) and len(set(first)) > 1
    assert all(BACKOFF_CAP_S / 2 <= d <= BACKOFF_CAP_S for d in late) and len(set(late)) > 1


def test_a_held_template_reaches_the_state_from_an_event_a_tick_and_a_snapshot():
    held = [{"template": "activationv1", "action": "activation", "ok": True, "reason": None},
            {"template": "passwordrecoveryv1", "action": "password_recovery", "ok": False,
             "reason": "template passwordrecoveryv1 does not exist in SES"}]
    state = MonitorState()
    state.apply_event({"event": "templates.changed", "seq": 1, "data": {"templates": held}})
    assert state.tick.templates_held == [("passwordrecoveryv1", "template passwordrecoveryv1 does not exist in SES")]
    state.apply_event({"event": "tick", "seq": 2, "data": {"templates": held[:1]}})
    assert state.tick.templates_held == []
    state.apply_snapshot({"state": "running", "tick": {"templates": held}})
    assert [name for name, _ in state.tick.templates_held] == ["passwordrecoveryv1"]
    state.apply_event({"event": "tick", "seq": 3, "data": {"templates": "garbage"}})  # tolerated, kept
    assert len(state.tick.templates_held) == 1
