"""The send rate does what the operator said (issue 19 item 5), against a real supervisor.

Everything is real: the installed ``mailroom-supervisor``, PostgreSQL, moto's SES over
HTTP (whose GetSendQuota answers MaxSendRate 1/s, a sandbox account's quota) and the
control socket.  ``MAILROOM_SES_MAX_SEND_RATE`` is the effective quota where it is
set: ``set-rate`` is capped by it, not by what SES reports; an operator's rate
outlives the sender it was given to; and a rate raised while calls wait for tokens
at a lower one lets them go at once.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from collector_util import insert_accounts, wait_for
from pgutil import console_script
from supervisor_util import SupervisorProcess, ledger, start_operated, supervisor_env

from mailroom.control.client import ControlClient

Start = Callable[..., tuple[SupervisorProcess, ControlClient]]


@pytest.fixture
def operated(db, base_env, moto, tmp_path) -> Iterator[Start]:
    """Start a supervisor on moto's SES with a control socket; yield a client to it."""
    started: list[SupervisorProcess] = []
    clients: list[ControlClient] = []

    def start(**extra: str) -> tuple[SupervisorProcess, ControlClient]:
        path = os.path.join(str(tmp_path), f"ctl{len(started)}.sock")
        sup, client = start_operated(supervisor_env(base_env, db, moto.url, control_socket=path, **extra), started)
        clients.append(client)
        return sup, client

    yield start
    for client in clients:
        client.close()
    for sup in started:
        sup.kill()


def sender_rate(ctl: ControlClient) -> float | None:
    """The limit the sender reported in its last heartbeat."""
    return ctl.request("status")["ses"].get("rate_limit")


def test_set_rate_is_capped_at_the_configured_quota_not_at_what_ses_reports(operated):
    # moto says 1/s; the operator said 500/s: the cap is 500, as in the demo.
    sup, ctl = operated(ses_max_send_rate="500")
    wait_for(lambda: sender_rate(ctl) == 500, what="the sender at the configured 500/s")
    assert ctl.request("set_rate", per_second=2000) == {"per_second": 500, "requested": 2000, "capped": True}
    assert ctl.request("set_rate", per_second=300) == {"per_second": 300, "requested": 300, "capped": False}
    # The sender applies the same cap (it used to cap at SES's 1/s again).
    wait_for(lambda: sender_rate(ctl) == 300, what="the sender at 300/s")
    # `ctl status` shows how far set-rate may go.
    assert ctl.request("status")["ses"]["rate_cap"] == 500
    shown = subprocess.run([*console_script("mailroom"), "ctl", "status"], env=sup.env, capture_output=True,
                           text=True, timeout=60)
    assert "rate limit" in shown.stdout, shown
    [line] = [line for line in shown.stdout.splitlines() if line.startswith("rate limit")]
    assert line.split(None, 2)[2] == "300 recipients/s (the send quota allows 500)"


def test_raising_the_rate_frees_calls_already_waiting_at_the_old_one(operated, db, moto):
    _, ctl = operated(batch_limit="10")
    ctl.request("set_rate", per_second=0.01)
    wait_for(lambda: sender_rate(ctl) == 0.01, what="the sender at 0.01/s")
    insert_accounts(db, 120, "w")
    # The first call spends the bucket; the next ones wait for tokens at 0.01/s
    # (hours): their batches stay claimed.
    wait_for(lambda: moto.bulk_calls(), what="the first SES call")
    wait_for(lambda: ledger(db).get("claimed"), what="batches waiting for tokens")
    ctl.request("set_rate", per_second=10_000)
    # Each waiting call goes at the new rate: 120 recipients are a fraction of a
    # second's worth, seconds of slack for a loaded machine.
    wait_for(lambda: ledger(db).get("sent") == 120, timeout=15, what="all 120 sent after the rate was raised")
    assert sum(len(call.destinations) for call in moto.bulk_calls()) == 120


def test_the_operators_rate_outlives_a_sender_restart(operated, db, moto):
    sup, ctl = operated(batch_limit="10")
    first = sup.worker("sender")
    ctl.request("set_rate", per_second=0.01)
    applied = "send rate limit set to 0.01 recipients/s"
    wait_for(lambda: applied in sup.log(), what="the first sender at 0.01/s")
    ctl.request("restart", worker="sender")
    wait_for(lambda: len(sup.started("sender")) == 2, timeout=30, what="a new sender")
    assert sup.worker("sender") != first
    # The supervisor hands the new sender the operator's rate (it used to start at
    # the configured 100000/s and stay there).
    wait_for(lambda: sup.log().count(applied) >= 2, what="the new sender at 0.01/s")
    insert_accounts(db, 120, "r")
    wait_for(lambda: moto.bulk_calls(), what="the first SES call of the new sender")
    # At 0.01/s the first call leaves hours of debt: the rest stays claimed.  A
    # window, as nothing happening has no event to await.
    assert stays(lambda: ledger(db).get("sent", 0) < 120, 1.0), "the new sender ignored 0.01/s"
    ctl.request("set_rate", per_second=10_000)
    wait_for(lambda: ledger(db).get("sent") == 120, timeout=15, what="all 120 sent after the rate was raised")
    assert sup.stop() == 0


def stays(predicate: Callable[[], bool], seconds: float) -> bool:
    """``predicate`` holds for the whole window (a "nothing happens" observation)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.05)
    return True
