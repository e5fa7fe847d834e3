"""mailroom-supervisor end to end: real processes, real PostgreSQL, SES over HTTP."""

from __future__ import annotations

import collections
import json
import signal
import time

import psycopg
import pytest
from collector_util import backend_pids, insert_accounts, pid_alive, wait_for
from pgutil import SECRET_KEY_HEX
from ses_emulator import SesStub, moto_server, throttling
from supervisor_util import gone, ledger, supervisor_env

from mailroom import tokens


def stub_addresses(stub: SesStub) -> list[str]:
    return [a for request in stub.bulk for a in request.addresses]


def test_every_eligible_token_reaches_ses_once(db, base_env, supervisors):
    with moto_server() as ses:
        sup = supervisors(supervisor_env(base_env, db, ses.url, batch_limit=50))
        for chunk in range(6):
            insert_accounts(db, 200, f"c{chunk}_")
        with psycopg.connect(db) as conn:
            conn.execute("INSERT INTO accounts (email, login, status) SELECT 'r' || i || '@example.test',"
                         " 'r' || i, 'active' FROM generate_series(1, 200) AS i")
            conn.execute("INSERT INTO tokens (action, account) SELECT 'password_recovery', id"
                         " FROM accounts WHERE status = 'active'")
        wait_for(lambda: ledger(db).get("sent") == 1400, timeout=90, what="1400 sent")
        assert sup.stop() == 0
        calls = ses.bulk_calls()
    assert all(len(call.destinations) <= 50 for call in calls)
    with psycopg.connect(db) as conn:
        expected = {email: (action, login, bytes(secret), code) for email, action, login, secret, code in conn.execute(
            "SELECT a.email, t.action::text, a.login, t.secret, t.code"
            " FROM tokens t JOIN accounts a ON a.id = t.account")}
        unsent = conn.execute("SELECT count(*) FROM deliveries WHERE status <> 'sent' OR message_id IS NULL"
                              " OR sent_at IS NULL").fetchone()[0]
    assert unsent == 0
    seen = collections.Counter()
    for call in calls:
        for address, data in call.destinations:
            seen[address] += 1
            action, login, secret, code = expected[address]
            fields = json.loads(data)
            if action == "activation":
                assert call.template == "activationv1" and set(fields) == {"login", "secret"}
                assert tokens.verify(SECRET_KEY_HEX, fields["secret"], "activation") == secret
            else:
                assert call.template == "passwordrecoveryv1" and fields["code"] == code
                assert tokens.verify(SECRET_KEY_HEX, fields["secret"], "password_recovery", code) == secret
            assert fields["login"] == login
    assert set(seen) == set(expected) and max(seen.values()) == 1


def test_killed_workers_and_backend_lose_nothing(db, base_env, supervisors, stub):
    limit, window = 20, 2
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=limit, max_in_flight=window))
    first_sender, first_collector = sup.worker("sender"), sup.worker("collector")
    total = 0
    for chunk in range(10):
        insert_accounts(db, 40, f"k{chunk}_")
        total += 40
        if chunk == 2:
            wait_for(lambda: stub.bulk, what="first call")
            signal_pid(first_sender, signal.SIGKILL)
        if chunk == 5:
            signal_pid(first_collector, signal.SIGKILL)
        if chunk == 7:
            pids = wait_for(lambda: backend_pids(db), what="collector backend")
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    wait_for(lambda: ledger(db).get("sent") == total, timeout=90, what="all sent")
    got = collections.Counter(stub_addresses(stub))
    assert len(got) == total
    duplicates = sum(n - 1 for n in got.values())
    # Only batches in flight at the sender's kill may go out twice.
    assert duplicates <= limit * window
    new_sender, new_collector = sup.worker("sender"), sup.worker("collector")
    assert new_sender != first_sender and new_collector != first_collector
    assert pid_alive(new_sender) and pid_alive(new_collector)
    log = sup.log()
    assert f"sender worker (pid {first_sender}) exited: killed by SIGKILL" in log
    assert f"collector worker (pid {first_collector}) exited: killed by SIGKILL" in log
    assert sup.stop() == 0


def signal_pid(pid: int, signum: int) -> None:
    import os

    os.kill(pid, signum)


@pytest.mark.timing
def test_sigterm_with_batches_in_flight(db, base_env, supervisors, stub):
    stub.gate.clear()                                   # SES holds every call
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=10, shutdown_timeout=1500))
    workers = [sup.worker("collector"), sup.worker("sender")]
    insert_accounts(db, 30, "held")
    wait_for(lambda: ledger(db).get("claimed", 0) >= 10, what="batches in flight")
    started = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.proc.wait(30) == 0
    assert time.monotonic() - started < 1.5 + 5.0
    assert gone(workers)
    counts = ledger(db)
    assert counts.get("claimed", 0) == 0 and counts.get("queued") == 30, counts
    stub.gate.set()
    # The next run sends them (the retry time is honoured, then they go out).
    sup2 = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=10))
    wait_for(lambda: ledger(db).get("sent") == 30, timeout=90, what="resent after restart")
    assert sup2.stop() == 0


def test_a_collector_killed_while_stopping_is_started_again_to_record_what_was_sent(db, base_env, supervisors,
                                                                                   stub):
    """SIGTERM with a batch at SES, then the collector dies: the sender's outcomes have no
    collector to record them.  They used to be dropped (the rows stayed claimed, exit 0)
    and the next run sent all five again once the lease expired."""
    stub.gate.clear()                                   # the call waits at SES
    sup = supervisors(supervisor_env(base_env, db, stub.url, claim_timeout=20_000, shutdown_timeout=30_000))
    collector = sup.worker("collector")
    insert_accounts(db, 5, "stopkill")
    stub.wait_for(1, timeout=20)
    sup.signal(signal.SIGTERM)
    wait_for(lambda: "stopping: no new claims, 1 batches in flight" in sup.log(), what="the stop")
    signal_pid(collector, signal.SIGKILL)
    wait_for(lambda: "stopped: killed by SIGKILL" in sup.log(), what="the collector reaped")
    stub.gate.set()
    assert sup.proc.wait(60) == 0, sup.log()
    assert len(sup.started("collector")) == 2, sup.log()
    assert ledger(db) == {"sent": 5}, sup.log()
    assert "no collector recorded" not in sup.log()
    assert sorted(a for r in stub.bulk for a in r.addresses) == sorted(set(a for r in stub.bulk for a in r.addresses))


def test_supervisor_sigkill_workers_follow_and_lease_recovers(db, base_env, supervisors, stub):
    stub.gate.clear()
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=10, claim_timeout=2000))
    workers = [sup.worker("collector"), sup.worker("sender")]
    insert_accounts(db, 25, "orphan")
    wait_for(lambda: ledger(db).get("claimed", 0) >= 10, what="claimed rows")
    sup.proc.kill()
    sup.proc.wait(10)
    try:
        wait_for(lambda: gone(workers), timeout=10, what="workers exiting with their supervisor")
    except AssertionError:
        states = {pid: open(f"/proc/{pid}/status").read().split("\n")[1:3] for pid in workers if pid_alive(pid)}
        raise AssertionError(f"still running: {states}\n{sup.log()}") from None
    stub.gate.set()
    sup2 = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=10, claim_timeout=2000))
    wait_for(lambda: ledger(db).get("sent") == 25, timeout=60, what="everything sent by the next run")
    assert set(stub_addresses(stub)) >= {f"orphan{i}@example.test" for i in range(1, 26)}
    assert sup2.stop() == 0


def test_throttling_keeps_claims_inside_the_window(db, base_env, supervisors, stub):
    limit, window = 10, 2
    stub.script(*[throttling()] * 6)
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=limit, max_in_flight=window))
    insert_accounts(db, 100, "slow")
    peak = 0

    def all_sent() -> bool:
        nonlocal peak
        counts = ledger(db)
        peak = max(peak, counts.get("claimed", 0))
        return counts.get("sent") == 100

    wait_for(all_sent, timeout=90, interval=0.02, what="all sent after throttling")
    assert 0 < peak <= limit * window
    # The six throttled calls, then calls that carried every address (the sender may
    # merge batches into fuller calls, so the number of those calls varies).
    calls = [r for r in stub.bulk if r.addresses]
    assert len(calls) > 6
    assert len({a for r in calls[6:] for a in r.addresses}) == 100
    assert sup.stop() == 0


def test_bad_configuration_exits_2_with_one_line(db, base_env):
    from pgutil import console_script
    from supervisor_util import run

    env = supervisor_env(base_env, db, "http://127.0.0.1:9", max_in_flight="zero")
    proc = run(console_script("mailroom-supervisor"), env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "MAILROOM_MAX_IN_FLIGHT" in proc.stderr


def test_missing_schema_halts_with_a_named_code(fresh_db, base_env):
    from pgutil import console_script
    from supervisor_util import run

    env = supervisor_env(base_env, fresh_db, "http://127.0.0.1:9")
    started = time.monotonic()
    proc = run(console_script("mailroom-supervisor"), env=env)
    assert proc.returncode == 3, proc.stderr
    assert "mailroom migrate up" in proc.stderr
    assert time.monotonic() - started < 30
    assert "restarting" not in proc.stderr


def test_systemd_readiness_notification(db, base_env, supervisors, stub, tmp_path):
    import socket

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        sup = supervisors(dict(supervisor_env(base_env, db, stub.url), NOTIFY_SOCKET=path))
        assert sock.recv(256) == b"READY=1"
        sup.signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert sup.proc.wait(30) == 0


def test_silent_worker_is_killed_and_restarted(db, base_env, supervisors, stub):
    sup = supervisors(supervisor_env(base_env, db, stub.url, worker_timeout=2000))
    frozen = sup.worker("collector")
    signal_pid(frozen, signal.SIGSTOP)              # alive, but no more heartbeats
    wait_for(lambda: len(sup.started("collector")) == 2, timeout=30, what="a new collector")
    assert f"collector worker (pid {frozen}) silent for" in sup.log()
    assert not pid_alive(frozen)
    insert_accounts(db, 5, "after")
    wait_for(lambda: ledger(db).get("sent") == 5, timeout=30, what="sent by the new collector")
    assert sup.stop() == 0


def test_batch_in_flight_at_three_sender_deaths_goes_back_delayed(db, base_env, supervisors, stub):
    stub.gate.clear()                                   # the batch stays in flight
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=10))
    insert_accounts(db, 10, "poison")
    wait_for(lambda: ledger(db).get("claimed") == 10, what="one batch in flight")
    for death in range(3):
        pid = sup.worker("sender")
        wait_for(lambda death=death: len(stub.bulk) > death, what="the batch reaching the sender")
        signal_pid(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: pid not in sup.started("sender")[-1:], timeout=30, what="a new sender")
    wait_for(lambda: ledger(db).get("queued") == 10, timeout=30, what="the batch handed back")
    with psycopg.connect(db) as conn:
        errors = {r[0] for r in conn.execute("SELECT last_error FROM deliveries")}
        delay = conn.execute("SELECT min(next_attempt_at - now()) FROM deliveries").fetchone()[0]
    assert errors == {"sender worker died 3 times with this batch in flight"}
    assert delay.total_seconds() > 30
    stub.gate.set()
    assert sup.stop() == 0


def test_debug_mode_records_emitted_not_sent(db, base_env, supervisors, stub):
    """Debug mode prints instead of sending: an operator who turns it on in
    production must find those rows 'emitted', never 'sent' (they can be re-queued)."""
    sup = supervisors(supervisor_env(base_env, db, stub.url, debug="true"))
    insert_accounts(db, 12, "dbg")
    wait_for(lambda: ledger(db).get("emitted") == 12, timeout=60, what="12 emitted")
    assert sup.stop() == 0
    assert ledger(db).get("sent", 0) == 0
    assert stub.bulk == []  # SES was never called
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM deliveries WHERE message_id IS NOT NULL"
                            " OR sent_at IS NOT NULL").fetchone()[0] == 0


def test_what_a_worker_wrote_just_before_it_exited_is_read_not_dropped():
    """The loop reads the pipes that were ready, then reaps: a sender that wrote its last
    outcomes and exited in between (a planned restart, a stop) left them in the pipe, which
    reaping closed unread, and the next sender got the batch again.  Here in-process: the
    arbiter, and a real forked sender that writes its outcomes and exits."""
    import multiprocessing

    from mailroom import config
    from mailroom.supervisor import messages as msg
    from mailroom.supervisor.arbiter import Supervisor
    from mailroom.vocabulary import Outcome, OutcomeKind, Role

    settings = config.load({"MAILROOM_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                            "MAILROOM_SECRET_KEY": SECRET_KEY_HEX, "MAILROOM_CONTROL_SOCKET": "off"})
    sup = Supervisor(settings)
    sent: list[tuple[Role, object]] = []
    sup.send = sup.router.send = lambda role, message: sent.append((role, message)) or True
    sup.router.on_claimed(msg.Claimed("b-1", b"1,a@example.test,a,S,00000\n", [11], 1, 0, "t0"))

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    outcome = Outcome(OutcomeKind.SENT, message_id="m-1")
    process = ctx.Process(target=lambda pipe: pipe.send(msg.BatchOutcomes("b-1", [(11, outcome)])), args=(child,))
    process.start()
    child.close()
    sender = sup.workers[Role.SENDER]
    sender.process, sender.pipe, sender.exited, sender.restart_requested = process, parent, False, True
    process.join(10)
    assert parent.poll()                                 # the outcomes wait in the pipe, unread
    sent.clear()
    sup.reap()
    assert sup.router.batches == {}
    assert [(role, type(m).__name__) for role, m in sent] == [(Role.COLLECTOR, "RecordOutcomes")]
    sup.router.sender_started()
    assert not any(isinstance(m, msg.SendBatch) for _, m in sent)  # nothing to send again
