"""The command line as people meet it: the installed console scripts as processes, a real
database, the SES endpoint over HTTP (issue 19: help, safe bulk changes, addresses as typed,
ctl's output, process names)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess

import psycopg
import pytest
from collector_util import wait_for
from pgutil import console_script
from supervisor_util import supervisor_env

from mailroom import __version__

SCRIPTS = ("mailroom", "mailroom-supervisor", "mailroom-collector", "mailroom-sender")
# Every `mailroom` subcommand, and a few of the levels below.
SUBCOMMANDS = (["migrate"], ["migrate", "up"], ["status"], ["ctl"], ["ctl", "status"], ["ctl", "set-rate"],
               ["demo"], ["deliveries"], ["retry"], ["skip"], ["unskip"], ["monitor"],
               ["templates"], ["templates", "push"], ["suppression"], ["suppression", "list"],
               ["suppression", "add"], ["suppression", "check"], ["ses"], ["ses", "setup-events"],
               ["tokens"], ["tokens", "verify"])


def run(argv: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run with stdin left open (a command that reads it would hang, and time out)."""
    with subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{argv} still running after {timeout}s: {err[-500:]}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def bare_env() -> dict[str, str]:
    """No mailroom configuration at all."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}


# -- 1: --help and --version never start anything -----------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_version_need_no_configuration(script):
    for flag in ("--help", "-h"):
        shown = run([*console_script(script), flag], bare_env())
        assert (shown.returncode, shown.stderr) == (0, ""), shown
        assert shown.stdout.startswith(f"usage: {script}")
    version = run([*console_script(script), "--version"], bare_env())
    assert (version.returncode, version.stdout, version.stderr) == (0, f"{script} {__version__}\n", "")


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_answers_help_and_version(words):
    shown = run([*console_script("mailroom"), *words, "--help"], bare_env())
    assert (shown.returncode, shown.stderr) == (0, ""), shown
    assert shown.stdout.startswith(f"usage: mailroom {' '.join(words)}")
    for level in (words[:1], words):  # `mailroom migrate up --version` too
        version = run([*console_script("mailroom"), *level, "--version"], bare_env())
        assert (version.returncode, version.stderr) == (0, ""), version
        assert version.stdout == f"mailroom {' '.join(level)} {__version__}\n"


def test_the_list_above_is_every_subcommand():
    from mailroom import cli

    (sub,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {words[0] for words in SUBCOMMANDS}


def test_help_with_a_full_configuration_starts_nothing(db, base_env, stub):
    """With everything configured, --help still connects to nothing: no consumer is
    registered, no socket appears, no request reaches SES."""
    env = supervisor_env(base_env, db, stub.url)
    for script in ("mailroom-supervisor", "mailroom-collector", "mailroom-sender"):
        for flag in ("--help", "--version"):
            done = run([*console_script(script), flag], env)
            assert (done.returncode, done.stderr) == (0, ""), done
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM consumers").fetchone() == (0,)
    assert not os.path.exists(env["MAILROOM_CONTROL_SOCKET"])
    assert stub.requests == []


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")
        else:
            yield path, action


def test_every_argument_has_help_text():
    from mailroom import cli
    from mailroom.control import ctl
    from mailroom.demo import app
    from mailroom.ledger import migrate

    parsers = [("mailroom", cli._parser()), ("mailroom ctl", ctl._parser()), ("mailroom demo", app._parser()),
               ("mailroom migrate", migrate._parser())]
    parsers += [(name, cli._daemon_parser(name, "")) for name in SCRIPTS[1:]]
    missing = [f"{path}: {'/'.join(action.option_strings) or action.dest}"
               for name, parser in parsers for path, action in _walk(parser, name)
               if not action.help and action.help != argparse.SUPPRESS]
    assert missing == []


# -- 7: processes you can tell apart --------------------------------------------------

def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_processes_are_named(db, base_env, stub, supervisors):
    sup = supervisors(supervisor_env(base_env, db, stub.url))
    assert wait_for(lambda: cmdline(sup.proc.pid) == "mailroom-supervisor", what="the supervisor's name")
    for role in ("collector", "sender"):
        pid = sup.worker(role)
        # The supervisor logs the fork; the child names itself first thing after it.
        wait_for(lambda pid=pid, role=role: cmdline(pid) == f"mailroom: {role}", timeout=10,
                 what=f"{role} named: {cmdline(pid)!r}")
    assert sup.stop() == 0


# -- 2: a command cannot empty the queue by accident ----------------------------------

def mailroom(db: str, *args: str, stdin: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(bare_env(), MAILROOM_DATABASE_URL=db, MAILROOM_IMPL="python")  # no wire warning line
    return subprocess.run([*console_script("mailroom"), *args], env=env, stdin=stdin, capture_output=True,
                          text=True, timeout=timeout)


def add_accounts(db: str, n: int, prefix: str = "user") -> None:
    """n accounts, each with a queued activation (the schema's triggers)."""
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO accounts (email, login) SELECT %s || i || '@example.com', %s || i"
                     " FROM generate_series(1, %s) AS i", (prefix, prefix, n))


def statuses(db: str) -> dict[str, int]:
    with psycopg.connect(db) as conn:
        found = dict(conn.execute("SELECT status::text, count(*) FROM deliveries GROUP BY 1").fetchall())
        found["in queue"] = conn.execute("SELECT count(*) FROM delivery_queue").fetchone()[0]
    return found


def test_bulk_changes_need_a_filter_or_all(db):
    add_accounts(db, 3)
    before = statuses(db)
    for command in ("skip", "retry", "unskip"):
        refused = mailroom(db, command)
        assert refused.returncode == 2 and refused.stdout == "", refused
        assert refused.stderr.count("\n") == 1 and "--all" in refused.stderr, refused.stderr
    assert statuses(db) == before == {"queued": 3, "in queue": 3}


def test_an_empty_filter_is_refused_not_taken_as_no_filter(db):
    """`mailroom retry --since "$SINCE"` with SINCE unset used to pass the filter check and
    then filter nothing; `--error ""` matched every error: the whole ledger, unasked."""
    add_accounts(db, 3)
    before = statuses(db)
    for command, args in (("skip", ("--since", "")), ("skip", ("--email", " ")), ("retry", ("--error", "")),
                          ("retry", ("--since", "")), ("unskip", ("--email", "")), ("deliveries", ("",)),
                          ("suppression", ("add", "")), ("suppression", ("check", "  "))):
        refused = mailroom(db, command, *args)
        assert refused.returncode == 2 and refused.stdout == "", (command, args, refused)
        assert "must not be empty" in refused.stderr, refused.stderr
    assert statuses(db) == before == {"queued": 3, "in queue": 3}


def test_absurd_since_is_one_line(db):
    for command in ("skip", "retry", "unskip"):
        done = mailroom(db, command, "--since", "9999999999h")
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "--since" in done.stderr and "Traceback" not in done.stderr


def test_unskip_brings_back_only_what_an_operator_skipped(db):
    add_accounts(db, 4)
    with psycopg.connect(db) as conn:  # the collector's own skip of one (its token expired)
        token = conn.execute("UPDATE deliveries SET status = 'skipped', last_error = 'token expired'"
                             " WHERE token = (SELECT min(token) FROM deliveries) RETURNING token").fetchone()[0]
        conn.execute("DELETE FROM delivery_queue WHERE token = %s", (token,))
    skipped = mailroom(db, "skip", "--all")
    assert (skipped.returncode, skipped.stdout) == (0, "skipped 3 queued deliveries of queue mailroom\n")
    assert statuses(db) == {"skipped": 4, "in queue": 0}
    dry = mailroom(db, "unskip", "--all", "--dry-run")
    assert dry.stdout == "would queue again 3 operator-skipped deliveries of queue mailroom\n"
    back = mailroom(db, "unskip", "--email", "user2@example.com")
    assert back.stdout == "queued again 1 operator-skipped deliveries of queue mailroom\n", back
    back = mailroom(db, "unskip", "--all")
    assert (back.returncode, back.stdout) == (0, "queued again 2 operator-skipped deliveries of queue mailroom\n")
    assert statuses(db) == {"skipped": 1, "queued": 3, "in queue": 3}


def on_a_terminal(db: str, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``mailroom ARGS`` with a terminal as stdin, ``answer`` already typed into it (a
    command that asks when it should not blocks and times out)."""
    main, tty = os.openpty()
    try:
        os.write(main, answer.encode())
        return mailroom(db, *args, stdin=tty, timeout=30)
    finally:
        os.close(tty)
        os.close(main)


def test_on_a_terminal_a_bulk_change_asks_first(db):
    add_accounts(db, 3)
    declined = on_a_terminal(db, "n\n", "skip", "--all")
    assert declined.returncode == 1 and "skip 3 queued deliveries of queue mailroom? [y/N]" in declined.stderr
    assert statuses(db) == {"queued": 3, "in queue": 3}
    one = on_a_terminal(db, "", "skip", "--email", "user1@example.com")  # one row: no question
    assert (one.returncode, one.stdout) == (0, "skipped 1 queued deliveries of queue mailroom\n"), one
    accepted = on_a_terminal(db, "y\n", "skip", "--since", "1h")
    assert (accepted.returncode, accepted.stdout) == (0, "skipped 2 queued deliveries of queue mailroom\n")
    scripted = on_a_terminal(db, "", "unskip", "--all", "--yes")
    assert (scripted.returncode, scripted.stdout) == (0, "queued again 3 operator-skipped deliveries of queue"
                                                         " mailroom\n")
    assert statuses(db) == {"queued": 3, "in queue": 3}


# -- 3: addresses are looked up as people type them -----------------------------------

def test_address_spellings():
    from mailroom.addresses import normalise, spellings

    assert normalise("  Jane@Bücher.DE. ") == "Jane@xn--bcher-kva.de"
    assert normalise("no address") == "no address"
    tried = spellings("USER1@EXAMPLE.COM")
    assert tried[0] == "USER1@example.com" and "user1@example.com" in tried and "USER1@EXAMPLE.COM" in tried
    assert {"jane@bücher.de", "jane@xn--bcher-kva.de"} <= set(spellings("JANE@XN--BCHER-KVA.DE"))
    assert spellings("a@exa mple.com") == ["a@exa mple.com"]  # not IDNA: only lower-cased


def test_addresses_are_found_as_typed(db):
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO accounts (email, login) VALUES ('user1@example.com', 'u1'),"
                     " ('jane@bücher.de', 'jane'), ('Bob@Example.org', 'bob'), ('user2@example.com', 'u2')")
        token_of = dict(conn.execute("SELECT a.login, t.id FROM accounts a JOIN tokens t ON t.account = a.id"))
    for typed, login in (("USER1@EXAMPLE.COM", "u1"), (" user1@Example.Com ", "u1"),
                          ("jane@XN--BCHER-KVA.DE", "jane"), ("Jane@Bücher.de", "jane"),
                          ("Bob@EXAMPLE.ORG", "bob"), ("BOB@example.org", "bob")):  # the last two: by a scan
        shown = mailroom(db, "deliveries", "--json", typed)
        assert shown.returncode == 0, shown
        assert [row["token"] for row in json.loads(shown.stdout)] == [token_of[login]], (typed, shown.stdout)
    assert mailroom(db, "deliveries", "Nobody@EXAMPLE.org").stdout == "no deliveries for Nobody@example.org\n"
    skipped = mailroom(db, "skip", "--email", "USER1@EXAMPLE.COM")
    assert skipped.stdout == "skipped 1 queued deliveries of queue mailroom\n", skipped
    with psycopg.connect(db) as conn:
        conn.execute("UPDATE deliveries SET status = 'failed' WHERE token IN (SELECT t.id FROM tokens t"
                     " JOIN accounts a ON a.id = t.account WHERE a.login = 'jane')")
    retried = mailroom(db, "retry", "--email", "JANE@xn--bcher-kva.DE", "--dry-run")
    assert retried.stdout == "would queue again 1 failed deliveries of queue mailroom\n", retried


# -- 4: ctl speaks to people ----------------------------------------------------------

LOCAL_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


def ctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*console_script("mailroom"), "ctl", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_ctl_status_and_batch_for_people(db, base_env, moto, supervisors):
    env = supervisor_env(base_env, db, moto.url)
    sup = supervisors(env)
    sup.worker("sender")
    add_accounts(db, 3)
    wait_for(lambda: statuses(db).get("sent") == 3, what="3 sent")

    def heard_from_both() -> bool:  # RSS and the rate limit arrive with the workers' heartbeats
        raw = json.loads(ctl(env, "--json", "status").stdout)
        return raw["ses"]["rate_limit"] is not None and all(w["rss"] for w in raw["workers"].values())
    wait_for(heard_from_both, what="heartbeats of both workers")

    shown = ctl(env, "status")
    assert (shown.returncode, shown.stderr) == (0, ""), shown
    lines = shown.stdout.splitlines()
    assert not any(c in shown.stdout for c in "{}[]") and "tick" not in shown.stdout, shown.stdout
    fields_end = lines.index("")
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines[:fields_end])
    assert fields["state"] == "running" and fields["paused"] == "claims no, sending no"
    assert fields["sent"].endswith("3 since start") and fields["rate limit"] == "100,000 recipients/s"
    # Labels aligned: every value starts in the same column.
    assert len({len(line) - len(line.split("  ", 1)[1].lstrip()) for line in lines[:fields_end]}) == 1
    assert lines[fields_end + 1].split() == ["WORKER", "PID", "UP", "SINCE", "RESTARTS", "HEARTBEAT", "RSS"]
    workers = lines[fields_end + 2:]
    assert [w.split()[0] for w in workers] == ["collector", "sender"], shown.stdout
    for line in workers:
        role, pid, since, restarts, *_ = line.split()
        assert (int(pid), restarts) == (sup.worker(role), "0") and LOCAL_ISO.fullmatch(since), line
        assert re.search(r" \d+\.\d MiB$", line), line
    assert max(len(line) for line in lines) <= 80, shown.stdout

    for args in (["--json", "status"], ["status", "--json"]):
        assert json.loads(ctl(env, *args).stdout)["counters"]["sent"] == 3

    listed = json.loads(ctl(env, "batches", "--json").stdout)["batches"]
    batch_id = listed[-1]["batch"]
    assert batch_id in ctl(env, "batches").stdout
    one = ctl(env, "batch", batch_id)
    assert one.returncode == 0 and "{" not in one.stdout, one
    with psycopg.connect(db) as conn:
        sent = conn.execute("SELECT a.email, d.message_id FROM deliveries d JOIN tokens t ON t.id = d.token"
                            " JOIN accounts a ON a.id = t.account").fetchall()
    rows = {line.split()[0]: line.split()[1:] for line in one.stdout.splitlines() if "@" in line}
    shown_rows = {address: (cells[1], cells[2]) for address, cells in rows.items()}
    in_batch = len(listed[-1].get("destinations", [])) or listed[-1]["rows"]
    assert len(shown_rows) == in_batch > 0
    for address, message_id in sent:
        if address in shown_rows:
            assert shown_rows[address] == ("sent", message_id)


def test_ctl_without_a_supervisor_says_what_to_check(tmp_path):
    path = str(tmp_path / "control.sock")
    for args in (["status"], ["status", "--json"]):
        gone = ctl(dict(bare_env(), MAILROOM_CONTROL_SOCKET=path), *args)
        assert gone.returncode == 2 and gone.stdout == "" and gone.stderr.count("\n") == 1
        assert f"is mailroom-supervisor running? socket: {path}" in gone.stderr, gone.stderr
    import socket

    with socket.socket(socket.AF_UNIX) as bound:  # a socket file nobody listens on (a killed supervisor)
        bound.bind(path)
        refused = ctl(dict(bare_env(), MAILROOM_CONTROL_SOCKET=path), "status")
        assert refused.returncode == 2 and f"is mailroom-supervisor running? socket: {path}" in refused.stderr
