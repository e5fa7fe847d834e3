"""The command line as people meet it: the installed console scripts as processes, a real
database, the SES endpoint over HTTP (issue 19: help, safe bulk changes, addresses as typed,
ctl's output, process names)."""

from __future__ import annotations

import argparse
import os
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
               ["demo"], ["deliveries"], ["retry"], ["skip"], ["monitor"])


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
    version = run([*console_script("mailroom"), *words[:1], "--version"], bare_env())
    assert (version.returncode, version.stderr) == (0, ""), version
    assert version.stdout == f"mailroom {words[0]} {__version__}\n"


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
