"""``mailroom deliveries|retry|skip``: the ledger commands of :mod:`mailroom.ledger.admin`
on the command line. Each prints what it found or changed."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from typing import Any, TextIO

import psycopg

from mailroom import config
from mailroom._process import one_line
from mailroom.addresses import normalise
from mailroom.config import Settings
from mailroom.ledger import admin, connection

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``2024-04-20T13:37``, ``2024-04-20 13:37:00+02:00`` (no zone = UTC) or a duration
    back from now: ``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``. ``ValueError`` otherwise."""
    raw = text.strip()
    if re.fullmatch(r"(\d+(?:\.\d+)?[smhdw])+", raw):
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(raw))
        try:
            return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds)
        except OverflowError:  # 9999999999h: before year 1
            raise ValueError(f"{text!r} reaches back before the year 1") from None
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"expected an ISO time (2024-04-20T13:37) or a duration (2h, 30m), got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


#: ``mailroom NAME``: (one line for the command list, the description of its own --help).
COMMANDS = {
    "deliveries": ("every delivery of an address",
                   "Every delivery of one address, newest first: status, attempts, MessageId, last error, what SES"
                   " said of it (feedback), and its story: queued, claimed, sent, each SES event."),
    "retry": ("put failed deliveries back in the queue",
              "Put failed deliveries back in the queue with a fresh attempt budget (never a sent row)."),
    "skip": ("mark queued deliveries skipped",
             "Mark queued deliveries skipped and take them off the queue (not those being sent)."),
    "unskip": ("put deliveries skipped by an operator back in the queue",
               "Undo mailroom skip: rows it skipped are queued again, due now."),
}
#: What each changing command changes: (rows it picks, would-verb, verb).
_CHANGES = {"retry": ("failed", "would queue again", "queued again"),
            "skip": ("queued", "would skip", "skipped"),
            "unskip": ("operator-skipped", "would queue again", "queued again")}


def positive_limit(text: str) -> int:
    """``--limit N`` of the ledger's commands: a positive whole number."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return int(text)


def nonblank(text: str) -> str:
    """A filter's value: never empty or blank (``--since "$UNSET"`` would otherwise be
    no filter at all, and ``--error ""`` matches every error: the whole ledger)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """The arguments of ``mailroom <name>``."""
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    if name == "deliveries":
        parser.add_argument("email", type=nonblank,
                            help="the address as typed (the domain's case and IDNA form do not matter)")
        parser.add_argument("--limit", type=positive_limit, default=100, metavar="N",
                            help="at most N deliveries, the newest (default 100)")
        return
    parser.add_argument("--since", type=nonblank, metavar="WHEN",
                        help="created at or after WHEN: an ISO time (no zone = UTC) or a duration back (2h, 1d)")
    if name != "unskip":  # an operator skip's last error is the skip's own mark
        parser.add_argument("--error", type=nonblank, metavar="TEXT", help="the last error contains TEXT")
    parser.add_argument("--email", type=nonblank,
                        help="this address only, as typed (the domain's case and IDNA form do not matter)")
    parser.add_argument("--token", type=int, action="append", dest="tokens", metavar="ID",
                        help="this token (repeatable)")
    parser.add_argument("--all", action="store_true",
                        help="no filter: every row this command changes (refused without a filter or --all)")
    parser.add_argument("--dry-run", action="store_true", help="count, change nothing")
    parser.add_argument("--yes", action="store_true",
                        help="do not ask on a terminal before changing more than one row (for scripts)")


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row for ``--json``: times as ISO strings, its ``events`` likewise."""
    return {k: [jsonable(e) for e in v] if k == "events" else v.isoformat() if isinstance(v, dt.datetime) else v
            for k, v in row.items()}


def _story(r: dict[str, Any]) -> list[tuple[dt.datetime, str]]:
    """What happened to one delivery, in time order: queued -> claimed -> sent
    (MessageId) or failed -> each SES event (type, subtype, diagnostic)."""
    steps = [(r["created_at"], "queued")]
    if r["claimed_at"] is not None:
        steps.append((r["claimed_at"], f"claimed (attempt {r['attempts']})"))
    if r["sent_at"] is not None:
        steps.append((r["sent_at"], f"sent, MessageId {r['message_id']}" if r["message_id"] else "sent"))
    for e in r.get("events", ()):
        said = " ".join(one_line(p) for p in (e["subtype"], e["diagnostic"]) if p)
        steps.append((e["event_at"], f"{e['type']}{f' ({said})' if said else ''}"))
    return steps


def _show_deliveries(rows: list[dict[str, Any]], email: str, out: TextIO) -> None:
    if not rows:
        print(f"no deliveries for {normalise(email)}", file=out)
        return
    for r in rows:
        when = r["sent_at"] or r["claimed_at"] or r["created_at"]
        line = (f"{r['token']:>10}  {r['action']:<17} {r['status']:<8} attempts {r['attempts']}"
                f"  created {r['created_at']:%Y-%m-%d %H:%M:%S}  last {when:%Y-%m-%d %H:%M:%S}")
        if r["message_id"]:
            line += f"  message {r['message_id']}"
        if r.get("feedback"):
            line += f"  feedback {r['feedback']}"
        if r["last_error"]:
            line += f"  error: {one_line(r['last_error'])}"
        print(line, file=out)
        for at, what in _story(r):
            print(f"{'':>12}{at:%Y-%m-%d %H:%M:%S}  {what}", file=out)


def database_failed(exc: connection.SchemaError | psycopg.Error, settings: Settings) -> int:
    """One line for a ledger command that could not run; its exit code (the URL's
    password never printed)."""
    if isinstance(exc, connection.SchemaError):
        print(f"mailroom: {exc}", file=sys.stderr)
        return config.EXIT_SCHEMA
    print(f"mailroom: database: {config.redact(one_line(exc), settings.database_url)}", file=sys.stderr)
    return config.EXIT_FAILURE


def _filtered(args: argparse.Namespace) -> bool:
    return any(getattr(args, key, None) is not None for key in ("since", "error", "email", "tokens"))


def _confirm(question: str) -> bool:
    """Ask on the terminal; only ``y``/``yes`` goes ahead (end of input is a no)."""
    print(question, end=" ", file=sys.stderr, flush=True)
    try:
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    except KeyboardInterrupt:
        return False


def main(name: str, args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    """Run ``mailroom deliveries|retry|skip|unskip``; returns the exit code."""
    since = None
    try:
        if getattr(args, "since", None):
            since = parse_since(args.since)
    except ValueError as exc:
        print(f"mailroom: --since: {exc}", file=sys.stderr)
        return config.EXIT_CONFIG
    queue = settings.queue_name
    if name in _CHANGES and not (_filtered(args) or args.all):
        # Without a filter these change every row of their kind: never by accident.
        filters = "--since, --email, --token" + (", --error" if name != "unskip" else "")
        print(f"mailroom: {name} needs a filter ({filters}) or --all", file=sys.stderr)
        return config.EXIT_CONFIG
    try:
        with psycopg.connect(settings.database_url, connect_timeout=10) as conn:
            connection.check_schema(conn)
            if name == "deliveries":
                rows = admin.deliveries(conn, queue, args.email, args.limit)
                if args.json:
                    print(json.dumps([jsonable(r) for r in rows]), file=out)
                else:
                    _show_deliveries(rows, args.email, out)
                return config.EXIT_OK
            def change(dry_run: bool) -> int:
                if name == "retry":
                    return admin.retry(conn, queue, since=since, error=args.error, email=args.email,
                                       tokens=args.tokens, dry_run=dry_run, channel=settings.channel_name)
                if name == "skip":
                    return admin.skip(conn, queue, since=since, error=args.error, email=args.email,
                                      tokens=args.tokens, dry_run=dry_run)
                return admin.unskip(conn, queue, since=since, email=args.email, tokens=args.tokens,
                                    dry_run=dry_run, channel=settings.channel_name)

            dry_run = args.dry_run
            if not dry_run and not args.yes and sys.stdin.isatty():
                n = change(dry_run=True)
                conn.rollback()  # no transaction left open while a person reads the question
                if n > 1 and not _confirm(f"mailroom: {name} {n:,} {_CHANGES[name][0]} deliveries"
                                          f" of queue {queue}? [y/N]"):
                    print(f"mailroom: {name}: nothing changed", file=sys.stderr)
                    return config.EXIT_FAILURE
            n = change(dry_run=dry_run)
            conn.commit()
    except (connection.SchemaError, psycopg.Error) as exc:
        return database_failed(exc, settings)
    what, would, did = _CHANGES[name]
    if args.json:
        print(json.dumps({"command": name, "dry_run": args.dry_run, "rows": n}), file=out)
    else:
        print(f"{would if args.dry_run else did} {n:,} {what} deliveries of queue {queue}", file=out)
    return config.EXIT_OK
