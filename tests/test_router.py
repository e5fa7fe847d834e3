"""The supervisor's router on its own: batches in flight and where each message goes.

No process, no pipe: ``send`` records what would go to each worker and answers as
a worker that is up (or down) would.  What reaches the real workers end to end is
covered by tests/test_supervisor.py and tests/test_reliability.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from mailroom.supervisor import messages as msg
from mailroom.supervisor.router import POISON_DEATHS, POISON_RETRY_AFTER, Router
from mailroom.vocabulary import Outcome, OutcomeKind, Role

COLLECTOR, SENDER = Role.COLLECTOR, Role.SENDER


class Pipes:
    """What the router sent to each worker, and which workers are up."""

    def __init__(self) -> None:
        self.up = {COLLECTOR: True, SENDER: True}
        self.sent: list[tuple[str, Any]] = []

    def __call__(self, role: str, message: Any) -> bool:
        if not self.up[role]:
            return False
        self.sent.append((role, message))
        return True

    def take(self, role: str | None = None) -> list[Any]:
        """The messages sent (to ``role``) since the last take."""
        taken = [m for r, m in self.sent if role is None or r == role]
        self.sent = [(r, m) for r, m in self.sent if role is not None and r != role]
        return taken


@pytest.fixture
def pipes() -> Pipes:
    return Pipes()


@pytest.fixture
def router(pipes: Pipes) -> Router:
    return Router(pipes)


def claimed(batch_id: str = "b1", tokens: tuple[int, ...] = (1, 2), claimed_at: object = "t0") -> msg.Claimed:
    return msg.Claimed(batch_id, f"line {batch_id}\n".encode(), list(tokens), len(tokens), 0, claimed_at)


def sent(*tokens: int) -> msg.BatchOutcomes:
    return msg.BatchOutcomes("b1", [(t, Outcome(OutcomeKind.SENT, message_id=f"m{t}")) for t in tokens])


def test_a_claim_goes_to_the_sender_and_its_outcomes_to_the_collector(router, pipes):
    router.on_claimed(claimed("b1", (1, 2), claimed_at="t0"))
    assert pipes.take() == [msg.SendBatch("b1", b"line b1\n", [1, 2])]
    assert len(router) == 1

    router.on_outcomes(sent(1, 2))
    [record] = pipes.take(COLLECTOR)
    assert isinstance(record, msg.RecordOutcomes)
    assert (record.batch_id, record.claimed_at) == ("b1", "t0")  # the claim it belongs to
    assert [(t, o.kind) for t, o in record.outcomes] == [(1, OutcomeKind.SENT), (2, OutcomeKind.SENT)]
    assert len(router) == 0
    assert list(router.unconfirmed) == ["b1"]  # kept until the collector says it is committed

    router.on_recorded(msg.Recorded(["b1"]))
    assert router.unconfirmed == {}


def test_outcomes_of_an_untracked_batch_are_still_recorded(router, pipes):
    router.on_outcomes(sent(7))
    [record] = pipes.take(COLLECTOR)
    assert isinstance(record, msg.RecordOutcomes) and record.claimed_at is None
    assert [t for t, _ in record.outcomes] == [7]


def test_a_batch_waits_for_a_sender_and_goes_to_it_once(router, pipes):
    pipes.up[SENDER] = False
    router.on_claimed(claimed("b1"))
    assert pipes.take() == []
    assert not router.batches["b1"].dispatched

    pipes.up[SENDER] = True
    router.sender_started()
    assert [m.batch_id for m in pipes.take(SENDER)] == ["b1"]
    router.sender_started()  # the same sender: it has the batch already
    router.dispatch_all()
    assert pipes.take(SENDER) == []


def test_a_late_claim_after_the_drain_goes_back_to_the_queue(router, pipes):
    router.accepting = False
    router.on_claimed(claimed("b1", (1, 2), claimed_at="t0"))
    assert pipes.take() == [msg.Release("b1", [1, 2], "t0")]
    assert len(router) == 0
    assert list(router.unconfirmed) == ["b1"]


# -- poison batches ----------------------------------------------------------------

def test_a_batch_at_every_sender_death_is_given_back_as_a_delayed_retry(router, pipes):
    router.on_claimed(claimed("b1", (1, 2), claimed_at="t0"))
    pipes.take()
    for death in range(1, POISON_DEATHS):
        router.sender_died()
        assert router.batches["b1"].deaths == death
        router.sender_started()  # handed to the restarted sender at once
        assert [m.batch_id for m in pipes.take(SENDER)] == ["b1"]
    pipes.take()

    router.sender_died()
    assert len(router) == 0
    [record] = pipes.take(COLLECTOR)
    assert isinstance(record, msg.RecordOutcomes) and record.claimed_at == "t0"
    assert [t for t, _ in record.outcomes] == [1, 2]
    for _, outcome in record.outcomes:
        assert outcome.kind == OutcomeKind.RETRY
        assert outcome.retry_after == POISON_RETRY_AFTER
        assert f"died {POISON_DEATHS} times" in (outcome.error or "")
    router.sender_started()
    assert pipes.take(SENDER) == []  # never handed to a sender again


def test_deaths_count_only_for_batches_the_sender_had(router, pipes):
    pipes.up[SENDER] = False
    router.on_claimed(claimed("waiting"))
    for _ in range(POISON_DEATHS + 1):
        router.sender_died()
    assert router.batches["waiting"].deaths == 0
    assert pipes.take(COLLECTOR) == []


def test_a_restart_on_request_says_nothing_against_the_batches(router, pipes):
    router.on_claimed(claimed("b1"))
    for _ in range(POISON_DEATHS + 1):
        router.sender_died(asked=True)  # an operator's restart, SIGHUP
        router.sender_started()
    assert router.batches["b1"].deaths == 0
    assert pipes.take(COLLECTOR) == []
    assert [m.batch_id for m in pipes.take(SENDER)] == ["b1"] * (POISON_DEATHS + 2)


# -- a restarted collector: adoption and the unconfirmed hand-over -----------------------------

def test_a_new_collector_adopts_the_batches_in_flight(router, pipes):
    router.on_claimed(claimed("b1", (1, 2), claimed_at="t1"))
    router.on_claimed(claimed("b2", (3,), claimed_at="t2"))
    pipes.take()
    router.collector_started(draining=False)
    assert pipes.take() == [msg.Adopt(["b1", "b2"], {"b1": ([1, 2], "t1"), "b2": ([3], "t2")})]


def test_unconfirmed_outcomes_and_releases_go_to_the_next_collector_in_order(router, pipes):
    router.on_claimed(claimed("b1", (1,), claimed_at="t1"))
    router.on_claimed(claimed("b2", (2,), claimed_at="t2"))
    router.on_claimed(claimed("b3", (3,), claimed_at="t3"))
    router.on_outcomes(msg.BatchOutcomes("b1", [(1, Outcome(OutcomeKind.SENT))]))
    router.release("b2")  # the operator gives it back (held past half its lease)
    router.on_recorded(msg.Recorded(["b1"]))  # b1 committed: not handed over again
    router.on_outcomes(msg.BatchOutcomes("b3", [(3, Outcome(OutcomeKind.FAILED, error="no"))]))
    pipes.take()

    # The collector dies before confirming b2 and b3; its successor records them.
    router.collector_started(draining=False)
    adopt, release, record = pipes.take(COLLECTOR)
    assert adopt == msg.Adopt([], {})
    assert release == msg.Release("b2", [2], "t2")
    assert isinstance(record, msg.RecordOutcomes) and (record.batch_id, record.claimed_at) == ("b3", "t3")

    router.on_recorded(msg.Recorded(["b2", "b3"]))
    router.collector_started(draining=False)
    assert pipes.take(COLLECTOR) == [msg.Adopt([], {})]


def test_outcomes_that_found_no_collector_wait_for_the_next(router, pipes):
    router.on_claimed(claimed("b1", (1,), claimed_at="t1"))
    pipes.up[COLLECTOR] = False
    router.on_outcomes(msg.BatchOutcomes("b1", [(1, Outcome(OutcomeKind.SENT))]))
    assert pipes.take(COLLECTOR) == []

    pipes.up[COLLECTOR] = True
    router.collector_started(draining=True)
    adopt, record, drain = pipes.take(COLLECTOR)
    assert adopt == msg.Adopt([], {})
    assert isinstance(record, msg.RecordOutcomes) and record.batch_id == "b1"
    assert drain == msg.Drain()  # started during a shutdown: it claims nothing more


# -- holding and releasing ------------------------------------------------------------------

def test_held_batches_stay_claimed_and_go_out_on_resume(router, pipes):
    router.holding = True
    router.on_claimed(claimed("b1"))
    router.sender_started()
    assert pipes.take(SENDER) == []
    router.holding = False
    router.dispatch_all()
    assert [m.batch_id for m in pipes.take(SENDER)] == ["b1"]


def test_release_gives_one_batch_back_and_release_all_the_rest(router, pipes):
    for n in (1, 2, 3):
        router.on_claimed(claimed(f"b{n}", (n,), claimed_at=f"t{n}"))
    pipes.take()
    router.release("b2")
    router.release("unknown")  # nothing to give back
    assert pipes.take() == [msg.Release("b2", [2], "t2")]

    assert router.release_all() == 2
    assert pipes.take() == [msg.Release("b1", [1], "t1"), msg.Release("b3", [3], "t3")]
    assert len(router) == 0
    assert set(router.unconfirmed) == {"b1", "b2", "b3"}  # until the collector commits them
