"""``mailroom suppression list|add|remove|check``: the suppression list
(:mod:`mailroom.ledger.suppressions`) on the command line, each with ``--json``.

``add`` and ``remove`` are audited under the operating-system user who ran them
(``suppression_audit``).  ``check`` exits 0 when the address is suppressed and 1 when
it is not, so a script can ask.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any, TextIO

import psycopg

from mailroom import config
from mailroom._process import add_version, one_line
from mailroom.addresses import normalise
from mailroom.config import Settings
from mailroom.ledger import connection, suppressions
from mailroom.ledger.commands import database_failed, jsonable, nonblank, positive_limit

__all__ = ["CHECK_FAILED", "add_arguments", "main"]

#: ``suppression check``'s exit code when it could not tell (0: suppressed, 1: not).
CHECK_FAILED = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands of ``mailroom suppression``."""
    sub = parser.add_subparsers(dest="suppression", required=True, metavar="list|add|remove|check")
    listing = sub.add_parser("list", help="suppressed addresses, newest first",
                             description="Suppressed addresses, newest first: why, since when, by whom.")
    listing.add_argument("--search", metavar="TEXT", help="addresses containing TEXT (case-insensitive)")
    listing.add_argument("--reason", choices=("bounced", "complained", suppressions.OPERATOR),
                         help="only addresses suppressed for this reason")
    listing.add_argument("--limit", type=positive_limit, default=100, metavar="N",
                         help="at most N addresses (default 100)")
    for name, text in (("add", "suppress addresses by hand: mailroom never sends to them"),
                       ("remove", "take addresses off the list: their next email is sent again")):
        one = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + " (audited).")
        one.add_argument("addresses", nargs="+", type=nonblank, metavar="ADDRESS",
                         help="an address as typed (the domain's case and IDNA form do not matter)")
        one.add_argument("--note", metavar="TEXT", help="why, kept in the audit (and as the detail of an add)")
    check = sub.add_parser("check", help="whether an address is suppressed (exit 0 yes, 1 no)",
                           description="Whether an address is suppressed, and why: exit 0 if it is, 1 if"
                                       " not, 4 if the database could not be asked.")
    check.add_argument("address", type=nonblank,
                       help="the address as typed (the domain's case and IDNA form do not matter)")
    for one in sub.choices.values():
        one.add_argument("--json", action="store_true", help="machine-readable output")
        add_version(one)
    add_version(parser)


def _line(entry: dict[str, Any]) -> str:
    text = (f"{entry['address']}  {entry['reason']}  since {entry['created_at']:%Y-%m-%d %H:%M:%S}"
            f"  by {entry['created_by']}")
    return text + (f"  ({one_line(entry['detail'])})" if entry["detail"] else "")


def actor() -> str:
    """Who runs this command, for the audit: the operating-system user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a bare container)
        import os

        return f"uid {os.getuid()}"


def main(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    """Run ``mailroom suppression ...``; returns the exit code."""
    command = args.suppression
    try:
        with psycopg.connect(settings.database_url, connect_timeout=10) as conn:
            connection.check_schema(conn)
            if command == "list":
                found = suppressions.entries(conn, search=args.search, reason=args.reason, limit=args.limit)
                if args.json:
                    print(json.dumps([jsonable(e) for e in found]), file=out)
                else:
                    for listed in found:
                        print(_line(listed), file=out)
                    if not found:
                        print("no suppressed addresses" + (" match" if args.search or args.reason else ""),
                              file=out)
                return config.EXIT_OK
            if command == "check":
                entry = suppressions.check(conn, args.address)
                if args.json:
                    print(json.dumps({"address": normalise(args.address), "suppressed": entry is not None,
                                      **jsonable(entry or {})}), file=out)
                else:
                    print(_line(entry) if entry else f"{normalise(args.address)} is not suppressed", file=out)
                return config.EXIT_OK if entry else config.EXIT_FAILURE
            change = suppressions.add if command == "add" else suppressions.remove
            who = actor()
            changed = {a: change(conn, a, actor=who, note=args.note) for a in dict.fromkeys(args.addresses)}
            conn.commit()
    except (connection.SchemaError, psycopg.Error) as exc:
        code = database_failed(exc, settings)
        # check's 1 means "not suppressed": a script that sends when it sees 1 must not
        # take an unreachable database for that.
        return CHECK_FAILED if command == "check" and code == config.EXIT_FAILURE else code
    if args.json:
        print(json.dumps({"command": command, "by": who,
                          "changed": [normalise(a) for a, yes in changed.items() if yes],
                          "unchanged": [normalise(a) for a, yes in changed.items() if not yes]}), file=out)
    else:
        done, same = ("suppressed", "already suppressed") if command == "add" else ("removed", "was not suppressed")
        for address, yes in changed.items():
            print(f"{done if yes else same}: {normalise(address)}", file=out)
    return config.EXIT_OK
