"""``mailroom suppression list|add|remove|check`` as a console script, on a real PostgreSQL."""

from __future__ import annotations

import getpass
import json
import os
import subprocess

import psycopg
from pgutil import console_script


def mailroom(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    env.update(MAILROOM_DATABASE_URL=db, MAILROOM_IMPL="python")
    return subprocess.run([*console_script("mailroom"), "suppression", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_add_check_list_remove(db: str) -> None:
    added = mailroom(db, "add", "Jane@Example.COM", "joe@bücher.de", "--note", "asked by phone")
    assert (added.returncode, added.stdout) == (0, "suppressed: Jane@example.com\nsuppressed: joe@xn--bcher-kva.de\n")
    again = mailroom(db, "add", "Jane@example.com", "--json")
    assert json.loads(again.stdout) == {"command": "add", "by": getpass.getuser(), "changed": [],
                                        "unchanged": ["Jane@example.com"]}

    yes = mailroom(db, "check", "joe@BÜCHER.de", "--json")
    assert yes.returncode == 0
    found = json.loads(yes.stdout)
    assert (found["address"], found["suppressed"], found["reason"], found["detail"]) == (
        "joe@xn--bcher-kva.de", True, "operator", "asked by phone")
    no = mailroom(db, "check", "nobody@example.com")
    assert (no.returncode, no.stdout) == (1, "nobody@example.com is not suppressed\n")

    listed = json.loads(mailroom(db, "list", "--json", "--search", "JANE").stdout)
    assert [e["address"] for e in listed] == ["Jane@example.com"]
    text = mailroom(db, "list").stdout.splitlines()
    assert len(text) == 2 and all(" operator  since " in line for line in text)

    removed = mailroom(db, "remove", "jane@EXAMPLE.com", "Jane@example.com")
    assert removed.stdout == "was not suppressed: jane@example.com\nremoved: Jane@example.com\n"
    with psycopg.connect(db) as conn:
        audit = conn.execute("SELECT action, address, actor FROM suppression_audit ORDER BY id").fetchall()
    me = getpass.getuser()
    assert audit == [("add", "Jane@example.com", me), ("add", "joe@xn--bcher-kva.de", me),
                     ("remove", "Jane@example.com", me)]
    assert mailroom(db, "list", "--reason", "bounced").stdout == "no suppressed addresses match\n"


def test_an_unmigrated_database_is_one_line(fresh_db: str) -> None:
    done = mailroom(fresh_db, "list")
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and "migrate up" in done.stderr


def test_check_against_an_unreachable_database_is_not_a_no() -> None:
    """`if mailroom suppression check "$a"; then skip; else send; fi` must not send because
    the database is down: 1 means "not suppressed", so a failure is 4."""
    from ses_emulator import free_port

    done = mailroom(f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/nope", "check", "jane@example.com")
    assert done.returncode == 4, done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("mailroom: database:"), done.stderr
    assert "s3cret" not in done.stderr and done.stdout == ""
