"""The collector's batching rule (:class:`BatchTrigger`): plain numbers, no database, no clock."""

from __future__ import annotations

import pytest

from mailroom.collector.trigger import BatchTrigger


def fixed(limit: int = 10, timeout: float = 5.0) -> BatchTrigger:
    return BatchTrigger(limit, timeout, adaptive=False)


def adaptive(limit: int = 10, timeout: float = 5.0) -> BatchTrigger:
    return BatchTrigger(limit, timeout, adaptive=True)


@pytest.mark.parametrize("make", [fixed, adaptive])
def test_nothing_notified_is_never_due(make):
    trigger = make()
    assert not trigger.due(100.0, idle=True)
    assert trigger.deadline(100.0, idle=True) is None
    trigger.notified(0, 100.0)  # an empty read of the notifications changes nothing
    assert trigger.pending == 0 and trigger.deadline(100.0) is None


def test_fixed_waits_for_the_timeout_after_the_first_notification():
    trigger = fixed(limit=10, timeout=5.0)
    trigger.notified(1, 100.0)
    trigger.notified(2, 103.0)  # later ones do not move the deadline
    assert trigger.pending == 3 and trigger.first_at == 100.0
    assert trigger.deadline(103.0) == 105.0
    assert not trigger.due(104.999)
    assert trigger.due(105.0)
    assert trigger.deadline(106.0) == 106.0  # overdue: due now, never in the past


def test_fixed_ignores_an_idle_pipeline():
    trigger = fixed(timeout=5.0)
    trigger.notified(1, 100.0)
    assert not trigger.due(100.0, idle=True)
    assert trigger.deadline(100.0, idle=True) == 105.0


@pytest.mark.parametrize("make", [fixed, adaptive])
def test_the_limit_makes_a_batch_due_at_once(make):
    trigger = make(limit=10, timeout=5.0)
    trigger.notified(9, 100.0)
    assert not trigger.due(100.0)
    trigger.notified(1, 100.5)
    assert trigger.due(100.5, idle=False)
    assert trigger.deadline(100.5) == 100.5


def test_adaptive_claims_at_once_when_the_pipeline_is_idle():
    trigger = adaptive(limit=10, timeout=5.0)
    trigger.notified(1, 100.0)
    assert trigger.due(100.0, idle=True)
    assert trigger.deadline(100.0, idle=True) == 100.0


def test_adaptive_under_load_piles_up_until_the_timeout():
    trigger = adaptive(limit=10, timeout=5.0)
    trigger.notified(3, 100.0)
    assert not trigger.due(102.0, idle=False)
    assert trigger.deadline(102.0, idle=False) == 105.0
    assert trigger.due(105.0, idle=False)


def test_a_claim_starts_the_count_again():
    trigger = fixed(limit=10, timeout=5.0)
    trigger.notified(4, 100.0)
    trigger.claimed()
    assert trigger.pending == 0 and not trigger.due(200.0)
    assert trigger.deadline(200.0) is None
    trigger.notified(1, 300.0)  # the next first notification sets a new deadline
    assert trigger.deadline(300.0) == 305.0
