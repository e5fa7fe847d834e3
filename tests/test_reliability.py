"""Issue 14: the faults a hostile operator found, each against real processes.

The real ``mailroom-supervisor`` (console script), real PostgreSQL, and the
scripted SES stub over HTTP: duplicates are counted at the SES endpoint,
statuses read from the ledger.
"""

from __future__ import annotations

import collections
import os
import signal
import stat
import subprocess
import time

import psycopg
import pytest
from collector_util import insert_accounts, wait_for
from pgutil import console_script
from psycopg import conninfo
from ses_emulator import Reply, SesStub, account_paused, server_error, success
from supervisor_util import ledger, supervisor_env


def sends(stub: SesStub) -> collections.Counter[str]:
    """How many times each address reached the SES endpoint."""
    return collections.Counter(a for request in stub.bulk for a in request.addresses)


def deliveries(url: str) -> list[tuple[str, int, str | None]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT status::text, attempts, last_error FROM deliveries ORDER BY token").fetchall()


# -- 1: a lease outlives a slow sender --------------------------------------------

def test_leases_of_batches_in_flight_are_renewed_under_a_rate_limited_sender(db, base_env, supervisors, stub):
    # 200 rows claimed at once (4 batches of 50) at 20 recipients/s: 10 s of
    # sending under a 3 s lease.  Without renewal the last batches expire and go twice.
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=50, claim_timeout=3000,
                                     ses_max_send_rate=20))
    insert_accounts(db, 200, "lease_")
    wait_for(lambda: ledger(db).get("sent") == 200, timeout=60, what="200 sent")
    assert sup.stop() == 0
    counts = sends(stub)
    assert len(counts) == 200 and max(counts.values()) == 1, counts.most_common(3)
    assert all(attempts == 1 for _, attempts, _ in deliveries(db))


# -- 2: outcomes of a collector killed while it could not record them ------------

def test_outcomes_held_by_a_stopped_collector_reach_the_next_one(db, base_env, supervisors, stub):
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=50, worker_timeout=2000,
                                     claim_timeout=15000))
    collector = sup.worker("collector")
    stub.gate.clear()  # the call waits at the endpoint
    insert_accounts(db, 40, "stopped_")
    stub.wait_for(1)
    os.kill(collector, signal.SIGSTOP)  # as silent as a collector stuck on a lock
    stub.gate.set()  # SES accepts: the outcomes go to the stopped collector's pipe
    wait_for(lambda: "silent for" in sup.log(), timeout=20, what="the watchdog")
    wait_for(lambda: ledger(db).get("sent") == 40, timeout=60, what="40 sent")
    assert sup.stop() == 0
    counts = sends(stub)
    assert len(counts) == 40 and max(counts.values()) == 1, counts.most_common(3)


def test_a_lock_wait_is_a_logged_retried_error_not_a_silent_worker(db, base_env, supervisors, stub):
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=50, worker_timeout=3000,
                                     claim_timeout=20000))
    stub.gate.clear()
    insert_accounts(db, 20, "locked_")
    stub.wait_for(1)
    with psycopg.connect(db) as operator:  # an operator's transaction holds the queue rows
        operator.execute("SELECT * FROM delivery_queue FOR UPDATE")
        stub.gate.set()
        wait_for(lambda: sup.log().count("gave up waiting") >= 2, timeout=30, what="lock timeouts")
        operator.rollback()
    wait_for(lambda: ledger(db).get("sent") == 20, timeout=30, what="20 sent")
    assert sup.stop() == 0
    assert "silent for" not in sup.log()
    assert max(sends(stub).values()) == 1


# -- 3: a paused account -----------------------------------------------------------

def test_a_paused_account_holds_without_burning_attempts_and_resumes(db, base_env, supervisors, stub):
    stub.script(account_paused())
    # One attempt allowed: any attempt burnt by the pause fails the row.
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=50, send_max_attempts=1))
    insert_accounts(db, 30, "paused_")
    wait_for(lambda: ledger(db).get("sent") == 30, timeout=60, what="30 sent after the probe")
    assert sup.stop() == 0
    assert {(status, attempts) for status, attempts, _ in deliveries(db)} == {("sent", 1)}
    assert len(stub.bulk) == 2  # the paused call, then the probe that sent them
    assert sup.log().count("SES sending is paused") == 1
    assert "SES sending resumed" in sup.log()


# -- 4: an SES outage of seconds ---------------------------------------------------

def test_an_outage_of_ten_seconds_fails_nothing(db, base_env, supervisors, stub):
    ends = time.monotonic() + 10.0
    ok, down = success(), server_error()
    stub.default = lambda request: down(request) if time.monotonic() < ends else ok(request)
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=20, send_retry_backoff=1000))
    insert_accounts(db, 100, "outage_")
    wait_for(lambda: ledger(db).get("sent") == 100, timeout=120, what="100 sent after the outage")
    assert sup.stop() == 0
    rows = deliveries(db)
    assert {status for status, _, _ in rows} == {"sent"}
    assert max(attempts for _, attempts, _ in rows) <= 5
    accepted = collections.Counter(a for r in stub.bulk if r.time >= ends for a in r.addresses)
    assert len(accepted) == 100 and max(accepted.values()) == 1
    assert "circuit open" in sup.log()
    # The circuit stopped the calls: far fewer than 100 rows x 5 attempts' worth.
    assert len([r for r in stub.bulk if r.time < ends]) < 30


# -- 5: a 200 that is not SES's XML --------------------------------------------------

def test_a_200_that_is_not_xml_is_a_retryable_call_failure(db, base_env, supervisors, stub):
    body = b"<html><body>proxy says hello\nsecond line</body></html>"
    stub.script(lambda request: Reply(200, body))
    env = supervisor_env(base_env, db, stub.url, batch_limit=50)
    sup = supervisors(env)
    insert_accounts(db, 10, "garbled_")
    wait_for(lambda: ledger(db).get("sent") == 10, timeout=60, what="10 sent on the retry")
    assert sup.stop() == 0
    assert all(error is None or "proxy" not in error for _, _, error in deliveries(db))
    log = sup.log()
    assert "proxy says hello" not in log and "second line" not in log
    assert len([line for line in log.splitlines() if "not the expected XML" in line and "failed" in line]) == 1
    [raw] = os.listdir(env["MAILROOM_SES_OUTPUT_PATH"])
    assert body in open(os.path.join(env["MAILROOM_SES_OUTPUT_PATH"], raw), "rb").read()


# -- 6, 7: bad settings and the password ---------------------------------------------

def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cmd[-1]} did not stop within 30 s (a restart loop)")


@pytest.mark.parametrize(("variable", "value", "code", "fragment"), [
    ("QUEUE_NAME", "nosuchqueue", 3, "queue 'nosuchqueue' is not in jobs"),
    ("BATCH_LIMIT", "10000000000000000000", 2, "MAILROOM_BATCH_LIMIT: must be at most"),
    ("CLAIM_TIMEOUT", "99999999999999", 2, "MAILROOM_CLAIM_TIMEOUT: must be at most"),
    ("SES_CONCURRENCY", "100000", 2, "MAILROOM_SES_CONCURRENCY: must be at most"),
    ("DATABASE_URL", "port", 2, "MAILROOM_DATABASE_URL: port must be 1 to 65535"),
])
def test_settings_that_used_to_loop_stop_with_one_line(db, base_env, stub, variable, value, code, fragment):
    env = supervisor_env(base_env, db, stub.url)
    if variable == "DATABASE_URL":
        # Whatever server the session uses (the local one on 5432, an embedded one on a
        # port of its own): the same URL with a port no server can have.
        params = conninfo.conninfo_to_dict(env["MAILROOM_DATABASE_URL"])
        assert params.get("port"), "the test URL names its port"
        value = conninfo.make_conninfo(**{**params, "port": "99999"})
    env[f"MAILROOM_{variable}"] = value
    done = _run(console_script("mailroom-supervisor"), env)
    assert done.returncode == code, done.stderr
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["mailroom-supervisor"], ["mailroom", "migrate", "up"],
                                     ["mailroom", "status"]])
def test_no_command_prints_the_database_password(base_env, command):
    env = dict(base_env, MAILROOM_DATABASE_URL="postgresql://app:hunter2secret@127.0.0.1:5432/app db",
               MAILROOM_CONTROL_SOCKET="off")
    done = _run(console_script(command[0]) + command[1:], env)
    assert done.returncode in (1, 2, 3)
    assert "hunter2secret" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "DATABASE_URL" in line or "database" in line]
    assert len(errors) == 1, done.stderr
    if command[0] == "mailroom":
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- 9: raw response files ------------------------------------------------------------

def test_raw_responses_are_private_and_capped(db, base_env, supervisors, stub):
    stub.default = server_error()
    env = supervisor_env(base_env, db, stub.url, batch_limit=5, ses_output_max_files=3)
    output = env["MAILROOM_SES_OUTPUT_PATH"]
    sup = supervisors(env)
    insert_accounts(db, 20, "raw_")
    stub.wait_for(6, timeout=30)
    wait_for(lambda: len(os.listdir(output)) >= 3, what="raw files")
    sup.stop()
    files = os.listdir(output)
    assert len(files) <= 3
    for name in files:
        assert stat.S_IMODE(os.stat(os.path.join(output, name)).st_mode) == 0o600
