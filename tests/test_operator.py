"""The supervisor's operator on its own: commands, held batches, drains, restarts.

A plain object stands in for the arbiter (the operator only sees it through
:class:`~mailroom.supervisor.view.SupervisorView`), with a real
:class:`~mailroom.supervisor.router.Router` wired to the operator as the arbiter
wires it.  No socket, no process: requests are answered into a list.  The same
commands over a real control socket are covered by tests/test_operating.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from typing import Any

import pytest

from mailroom import wire
from mailroom.config import Settings
from mailroom.supervisor import messages as msg
from mailroom.supervisor.operator import HOLD_SHARE_OF_LEASE, Operator
from mailroom.supervisor.router import POISON_DEATHS, Router
from mailroom.vocabulary import Outcome, OutcomeKind, RestartReason, Role

COLLECTOR, SENDER = Role.COLLECTOR, Role.SENDER

SIGNER = wire.Signer(bytes.fromhex("deadbeef" * 8))
LEASE_MS = 60_000
TOKEN_IDS = itertools.count(1)


@dataclasses.dataclass
class Slot:
    """A worker slot as the operator reads it."""

    up: bool = True
    process: Any = None
    started_at: float = dataclasses.field(default_factory=time.monotonic)
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    restarts: int = 0
    stats: msg.CollectorStats | msg.SenderStats | None = None


class Supervisor:
    """The arbiter as the operator sees it, recording what it was asked."""

    def __init__(self) -> None:
        self.settings = Settings(claim_timeout=LEASE_MS, control_socket="off")
        self.stopping = False
        self.workers = {COLLECTOR: Slot(), SENDER: Slot()}
        self.sent: list[tuple[str, Any]] = []
        self.asked: list[tuple[str, ...]] = []
        self.operator = Operator(self)
        self.router = Router(self.send, on_event=self.operator.on_router_event,
                             on_finished=self.operator.on_batch_finished)

    def send(self, role: str, message: object) -> bool:
        if not self.workers[role].up:
            return False
        self.sent.append((role, message))
        return True

    def take(self, role: str) -> list[Any]:
        taken = [m for r, m in self.sent if r == role]
        self.sent = [(r, m) for r, m in self.sent if r != role]
        return taken

    def request_restart(self, role: str) -> None:
        self.asked.append(("restart", role))

    def handle_term(self) -> None:
        self.asked.append(("term",))
        self.stopping = True

    def stop_now(self) -> None:
        self.asked.append(("now",))


class Request:
    """A control request whose answer is kept."""

    def __init__(self, cmd: str, **args: Any) -> None:
        self.cmd, self.args = cmd, args
        self.answers: list[tuple[str, Any]] = []

    def reply(self, result: dict[str, Any]) -> None:
        self.answers.append(("ok", result))

    def fail(self, code: str, message: str) -> None:
        self.answers.append((code, message))

    @property
    def answer(self) -> tuple[str, Any]:
        [answer] = self.answers
        return answer


@pytest.fixture
def sup() -> Supervisor:
    return Supervisor()


def ask(sup: Supervisor, cmd: str, **args: Any) -> Request:
    request = Request(cmd, **args)
    sup.operator.handle(request)  # a duck-typed stand-in for control.server.Request
    return request


def claim(sup: Supervisor, batch_id: str, *addresses: str) -> list[int]:
    tokens = [next(TOKEN_IDS) for _ in addresses]
    rows = [(1, address, "login", b"\x07" * 32, f"{n:05d}") for n, address in enumerate(addresses)]
    sup.router.on_claimed(msg.Claimed(batch_id, SIGNER.encode_batch(rows), tokens, len(tokens), 0, f"at-{batch_id}"))
    return tokens


# -- pausing, and a restarted collector ------------------------------------------------------

def test_pausing_claims_tells_the_collector_and_a_restarted_one_too(sup):
    assert ask(sup, "pause", what="claims").answer == ("ok", {"what": "claims", "changed": True, "state": "paused"})
    assert sup.take(COLLECTOR) == [msg.SetClaiming(False, seq=1)]
    assert ask(sup, "pause", what="claims").answer[1]["changed"] is False
    assert sup.take(COLLECTOR) == []

    # The collector restarts while claims are paused: the new one must not claim.
    sup.operator.on_collector_started()
    assert sup.take(COLLECTOR) == [msg.SetClaiming(False, seq=2)]

    assert ask(sup, "resume", what="claims").answer[1] == {"what": "claims", "changed": True, "state": "running"}
    assert sup.take(COLLECTOR) == [msg.SetClaiming(True, seq=3)]
    sup.operator.on_collector_started()
    assert sup.take(COLLECTOR) == []  # a new collector claims by default


def test_pausing_sending_holds_batches_and_resuming_sends_them(sup):
    ask(sup, "pause", what="sending")
    claim(sup, "b1", "a@example.test")
    assert sup.take(SENDER) == []
    assert sup.operator.status()["in_flight"] == {"batches": 1, "rows": 1}

    ask(sup, "resume", what="sending")
    assert [m.batch_id for m in sup.take(SENDER)] == ["b1"]


def test_a_held_batch_goes_back_to_the_queue_before_its_lease_runs_out(sup):
    ask(sup, "pause", what="sending")
    old = claim(sup, "old", "a@example.test")
    claim(sup, "new", "b@example.test")
    sup.take(COLLECTOR)
    # Held for longer than its share of the lease (the clock is moved, not waited for).
    sup.router.batches["old"].received_at -= LEASE_MS / 1000 * HOLD_SHARE_OF_LEASE + 1

    sup.operator.tick(time.monotonic())
    assert sup.take(COLLECTOR) == [msg.Release("old", old, "at-old")]
    assert list(sup.router.batches) == ["new"]
    assert sup.operator.recent["old"].data["retry"] == 1  # shown as given back, not lost

    ask(sup, "resume", what="sending")
    sup.operator.tick(time.monotonic())
    assert sup.take(COLLECTOR) == []
    assert [m.batch_id for m in sup.take(SENDER)] == ["new"]


def test_commands_that_change_the_run_are_refused_while_stopping(sup):
    sup.stopping = True
    for cmd, args in (("pause", {"what": "claims"}), ("resume", {"what": "sending"}),
                      ("drain", {}), ("restart", {"worker": SENDER})):
        code, _ = ask(sup, cmd, **args).answer
        assert code == "invalid_state", cmd
    assert sup.sent == [] and sup.asked == []


def test_restart_and_shutdown_are_asked_of_the_supervisor(sup):
    assert ask(sup, "restart", worker=SENDER).answer == ("ok", {"worker": SENDER, "restarting": True})
    assert ask(sup, "shutdown", mode="now").answer == ("ok", {"mode": "now"})
    assert ask(sup, "shutdown").answer == ("ok", {"mode": "graceful"})
    assert sup.asked == [("restart", SENDER), ("now",), ("term",)]
    ask(sup, "shutdown")  # already stopping: asked once
    assert sup.asked.count(("term",)) == 1


# -- drains: done only when every outcome is committed ----------------------------------------

def test_a_drain_waits_for_the_unconfirmed_outcomes(sup):
    tokens = claim(sup, "b1", "a@example.test")
    request = ask(sup, "drain", timeout_s=60.0)
    assert sup.take(COLLECTOR) == [msg.SetClaiming(False, seq=1)]
    assert request.answers == [] and sup.operator.state == "draining"
    sup.operator.on_claiming_set(msg.ClaimingSet(1))

    sup.router.on_outcomes(msg.BatchOutcomes("b1", [(tokens[0], Outcome(OutcomeKind.SENT, "m1"))]))
    sup.operator.tick(time.monotonic())
    assert request.answers == []  # sent, but the collector has not committed it yet
    assert [m.batch_id for m in sup.take(COLLECTOR)] == ["b1"]

    # The collector died before committing: its successor gets the outcomes again.
    sup.router.collector_started(draining=False)
    sup.operator.on_collector_started()
    [adopt, record, paused] = sup.take(COLLECTOR)
    assert adopt == msg.Adopt([], {})
    assert isinstance(record, msg.RecordOutcomes) and record.batch_id == "b1"
    assert paused == msg.SetClaiming(False, seq=2)  # the drain's pause holds for the new collector

    sup.router.on_recorded(msg.Recorded(["b1"]))
    sup.operator.tick(time.monotonic())
    assert request.answers == []  # the new collector has not confirmed the pause yet
    sup.operator.on_claiming_set(msg.ClaimingSet(2))
    sup.operator.tick(time.monotonic())
    code, result = request.answer
    assert code == "ok" and result["drained"] is True
    assert sup.operator.state == "paused"  # claims stay paused after a drain


def test_a_drain_waits_for_the_collector_to_confirm_the_pause(sup):
    """A claim the collector committed before it read the pause arrives after the drain
    began: "drained" must not be said before it (a review saw 8 drains in 40 answer
    early while tokens kept coming)."""
    request = ask(sup, "drain", timeout_s=60.0)
    sup.operator.tick(time.monotonic())
    assert request.answers == []                         # empty, but the pause is not confirmed
    tokens = claim(sup, "late", "a@example.test")        # committed before the collector paused
    sup.operator.on_claiming_set(msg.ClaimingSet(1))     # ... which it then confirms
    assert request.answers == []
    sup.router.on_outcomes(msg.BatchOutcomes("late", [(tokens[0], Outcome(OutcomeKind.SENT, "m1"))]))
    sup.router.on_recorded(msg.Recorded(["late"]))
    sup.operator.tick(time.monotonic())
    assert request.answer[0] == "ok" and request.answer[1]["drained"] is True


def test_a_drain_without_a_collector_does_not_wait_for_its_confirmation(sup):
    sup.workers[COLLECTOR].up = False                    # between a crash and its restart
    request = ask(sup, "drain", timeout_s=60.0)
    assert request.answer[0] == "ok" and request.answer[1]["drained"] is True


def test_a_drain_the_collector_never_confirms_says_so(sup):
    request = ask(sup, "drain", timeout_s=30.0)
    sup.operator.tick(time.monotonic() + 31.0)
    code, message = request.answer
    assert code == "invalid_state" and "the collector has not confirmed that claims are paused" in message


def test_a_drain_that_runs_out_of_time_fails_and_keeps_claims_paused(sup):
    claim(sup, "b1", "a@example.test")
    request = ask(sup, "drain", timeout_s=30.0)
    sup.operator.on_claiming_set(msg.ClaimingSet(1))
    sup.operator.tick(time.monotonic() + 31.0)
    code, message = request.answer
    assert code == "invalid_state" and "1 batches still in flight" in message
    assert sup.operator.claims_paused


# -- poison batches, rates, one batch's detail -------------------------------------------------

def test_a_poison_batch_is_counted_as_a_retry_not_lost(sup):
    claim(sup, "b1", "a@example.test", "b@example.test")
    for _ in range(POISON_DEATHS):
        sup.router.sender_died()
        sup.router.sender_started()
    assert len(sup.router) == 0
    [record] = [m for m in sup.take(COLLECTOR) if isinstance(m, msg.RecordOutcomes)]
    assert [o.kind for _, o in record.outcomes] == [OutcomeKind.RETRY] * 2
    assert sup.operator.counters["retry"] == 2 and sup.operator.counters["sent"] == 0
    [batch] = ask(sup, "batches").answer[1]["batches"]
    assert batch["batch"] == "b1" and batch["retry"] == 2
    assert "died" in batch["error"]


def test_set_rate_is_capped_by_the_account_and_needs_a_sender(sup):
    sup.workers[SENDER].stats = msg.SenderStats(ses=msg.SesQuota(max_send_rate=14.0))
    assert ask(sup, "set_rate", per_second=50.0).answer == (
        "ok", {"per_second": 14.0, "requested": 50.0, "capped": True})
    assert sup.take(SENDER) == [msg.SetRate(50.0)]  # the sender caps it too

    sup.workers[SENDER].up = False
    code, _ = ask(sup, "set_rate", per_second=5.0).answer
    assert code == "invalid_state"


def test_a_finished_batch_shows_its_destinations_without_secrets(sup):
    tokens = claim(sup, "b1", "a@example.test", "b@example.test")
    sup.router.on_outcomes(msg.BatchOutcomes("b1", [
        (tokens[0], Outcome(OutcomeKind.SENT, message_id="m-1")),
        (tokens[1], Outcome(OutcomeKind.FAILED, error="MessageRejected")),
    ]))
    code, result = ask(sup, "batch", id="b1").answer
    assert code == "ok"
    assert [(d["address"], d["token"], d["status"], d["message_id"], d["error"]) for d in result["destinations"]] == [
        ("a@example.test", tokens[0], "sent", "m-1", None),
        ("b@example.test", tokens[1], "failed", None, "MessageRejected"),
    ]
    assert not any(key.startswith("_") for key in result)
    assert "07070707" not in repr(result)  # the rows' secrets never leave the supervisor

    assert ask(sup, "batch", id="nope").answer[0] == "not_found"


# -- what the monitor shows: the claim's time and the supervisor's own row ------------------

def test_a_claimed_batch_carries_its_claim_time_and_status_describes_the_supervisor(sup):
    published: list[tuple[str, dict[str, Any]]] = []
    sup.operator.publish = lambda event, data: published.append((event, data))  # the control socket's place
    before = time.time()
    claim(sup, "b1", "a@example.test")
    [(event, data)] = [(e, d) for e, d in published if e == "batch.claimed"]
    assert before <= data["claimed"] <= time.time()
    [snapshot_batch] = [b for b in sup.operator.snapshot()["batches"] if b["batch"] == "b1"]
    assert snapshot_batch["claimed"] == data["claimed"]  # the same age after a reconnect

    status = sup.operator.status()
    assert status["pid"] > 0 and before - 60 < status["started"] <= time.time()
    assert status["rss"] is None or status["rss"] > 1 << 20


# -- the events as declared: every one a client may subscribe to ----------------------------

def test_every_declared_event_can_be_subscribed_to() -> None:
    """``account.paused`` went out without being in the protocol's list, so ``subscribe
    {topics: ["account"]}`` (and ``ctl events --topic account``) was refused."""
    from typing import get_args

    from mailroom.control.protocol import EVENTS, TOPICS

    declared = {event.EVENT for event in get_args(msg.Event)}
    assert declared == set(EVENTS) - {"audit"}  # audit is the control server's own
    assert {"account", "account.paused", "worker", "state"} <= TOPICS


def test_worker_events_go_out_as_declared_and_count_restarts_by_reason(sup):
    published: list[tuple[str, dict[str, Any]]] = []
    sup.operator.publish = lambda event, data: published.append((event, data))
    sup.operator.on_worker(msg.WorkerStarted(SENDER, 41, restarts=0, started=1e9))
    sup.operator.on_worker(msg.WorkerExited(SENDER, 41, "killed by SIGKILL", restarting=True,
                                            reason=RestartReason.CRASH))
    sup.operator.on_worker(msg.WorkerExited(SENDER, 42, "exit code 0", restarting=True,
                                            reason=RestartReason.PLANNED))
    sup.operator.on_worker(msg.WorkerExited(SENDER, 43, "exit code 0", restarting=False))
    assert published[0] == ("worker.started", {"worker": "sender", "pid": 41, "restarts": 0,
                                               "started": 1e9, "state": "running"})
    assert published[1] == ("worker.exited", {"worker": "sender", "pid": 41, "exit": "killed by SIGKILL",
                                              "restarting": True, "reason": "crash", "state": "exited"})
    assert json.loads(json.dumps(published[3][1])) == {"worker": "sender", "pid": 43, "exit": "exit code 0",
                                                        "restarting": False, "reason": None, "state": "exited"}
    text = sup.operator.metrics.render().decode()
    assert 'mailroom_worker_restarts_total{reason="crash",worker="sender"} 1.0' in text
    assert 'mailroom_worker_restarts_total{reason="planned",worker="sender"} 1.0' in text


def test_account_paused_and_state_changed_go_out_as_declared(sup):
    published: list[tuple[str, dict[str, Any]]] = []
    sup.operator.publish = lambda event, data: published.append((event, data))
    sup.operator.deliverability = {"bounce_rate": 0.2, "sent": 2000}
    sup.operator._protect("bounce rate 20.0 % over the last 24 h (limit 5.0 %)")
    events = dict(published)
    assert events["account.paused"] == {"reason": "bounce rate 20.0 % over the last 24 h (limit 5.0 %)",
                                        "deliverability": {"bounce_rate": 0.2, "sent": 2000}}
    assert events["state.changed"]["state"] == "paused"
    assert events["state.changed"]["paused"] == {"claims": True, "sending": False}
