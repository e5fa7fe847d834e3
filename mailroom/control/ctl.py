"""``mailroom ctl CMD [ARGS]``: the scriptable control socket client.

Exit codes: 0 ok, 1 refused by the supervisor, 2 usage or connection error;
every failure is one line on stderr. Results are printed for people
(:mod:`mailroom.control.show`); ``--json``, before or after the command, prints
the raw result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TextIO

from mailroom import config
from mailroom._process import add_version
from mailroom.control import show
from mailroom.control.client import ControlClient, ControlRefused, ControlUnavailable, trusted_uids
from mailroom.control.protocol import MAX_BATCHES, MAX_DRAIN_S, MAX_RATE, TOPICS
from mailroom.control.sockfile import default_socket_path
from mailroom.vocabulary import BATCH_STATES, PAUSABLE, ROLES

PROG = "mailroom ctl"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        raise _Usage(message)


def _positive(high: float) -> Any:
    """An argparse type: a finite number in (0, ``high``], as the protocol takes it (nan,
    inf or a negative number would fail in the client, not as a usage error)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(f"must be above 0 and at most {high:,.0f}, got {text}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="talk to a running mailroom-supervisor")
    parser.add_argument("--socket", metavar="PATH", help="control socket (default: as the supervisor's)")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    add_version(parser)
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")
    sub.add_parser("hello", help="version, protocol, your role")
    sub.add_parser("status", help="workers, run state, in flight, rates, SES quota")
    p = sub.add_parser("batches", help="recent batches")
    p.add_argument("--state", choices=BATCH_STATES, help="only batches in this state")
    p.add_argument("--limit", type=int, default=None, help=f"at most {MAX_BATCHES}")
    p = sub.add_parser("batch", help="one batch, row by row")
    p.add_argument("id", help="the batch id, as ctl batches shows it (19944-3)")
    for name in ("pause", "resume"):
        p = sub.add_parser(name, help=f"{name} claims or sending")
        p.add_argument("what", choices=PAUSABLE, help="claims (the collector) or sends (the sender)")
    p = sub.add_parser("drain", help="pause claims and wait until nothing is in flight")
    p.add_argument("--timeout", type=_positive(MAX_DRAIN_S), default=None, metavar="SECONDS",
                   help="answer after at most SECONDS even if work is still in flight (default 300)")
    p = sub.add_parser("set-rate", help="send-rate limit in recipients/s, capped at the send quota"
                       " (MAILROOM_SES_MAX_SEND_RATE, else SES MaxSendRate); kept across sender restarts")
    p.add_argument("per_second", type=_positive(MAX_RATE), metavar="PER_SECOND",
                   help="recipients per second (0 < PER_SECOND <= the send quota)")
    p = sub.add_parser("restart", help="restart a worker")
    p.add_argument("worker", choices=ROLES, help="which worker process")
    p = sub.add_parser("shutdown", help="stop the supervisor (graceful unless --now)")
    p.add_argument("--now", action="store_true",
                   help="do not wait for the batches in flight (like a second SIGTERM, but the"
                        " supervisor exits 0: asked for, not a failure)")
    p = sub.add_parser("subscribe", help="print events as JSON lines until interrupted")
    p.add_argument("--topic", action="append", choices=sorted(TOPICS), dest="topics",
                   help="only this topic's events (repeatable; default all)")
    # --json also after the command (`ctl status --json`): each command's own flag,
    # SUPPRESSed so that, when absent, it leaves the one given before the command alone.
    for child in sub.choices.values():
        child.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="print the raw result as JSON")
        add_version(child)
    return parser


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The protocol command and arguments for parsed command-line ``args``."""
    cmd = args.cmd
    if cmd == "batches":
        return cmd, {k: v for k, v in (("state", args.state), ("limit", args.limit)) if v is not None}
    if cmd == "batch":
        return cmd, {"id": args.id}
    if cmd in ("pause", "resume"):
        return cmd, {"what": args.what}
    if cmd == "drain":
        return cmd, {} if args.timeout is None else {"timeout_s": args.timeout}
    if cmd == "set-rate":
        return "set_rate", {"per_second": args.per_second}
    if cmd == "restart":
        return cmd, {"worker": args.worker}
    if cmd == "shutdown":
        return cmd, {"mode": "now" if args.now else "graceful"}
    return cmd, {}


def summary(cmd: str, result: Mapping[str, Any]) -> str:
    """A human rendering of a result (the supervisor's shapes, tolerated loosely)."""
    if cmd in ("pause", "resume"):
        changed = result.get("changed")
        state = result.get("state", "")
        return f"{cmd} {result.get('what', '')}: {'done' if changed else 'no change'} {state}".rstrip()
    if cmd == "hello":
        return (f"mailroom {result.get('version', '?')}, protocol {result.get('protocol', '?')}, "
                f"you are {result.get('role', '?')}")
    if cmd == "status":
        return show.status(result)
    if cmd == "batches":
        return show.batches(result)
    if cmd == "batch":
        return show.batch(result)
    return "\n".join(f"{key}: {show.flat(value)}" for key, value in result.items()) or "ok"


def _socket_path(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.socket:
        return str(args.socket)
    try:
        settings = config.load(environ)
    except config.ConfigError as exc:
        raise _Usage(str(exc)) from None
    path = default_socket_path(environ, settings.queue_name)
    if path is None:
        raise _Usage("the control socket is off (MAILROOM_CONTROL_SOCKET=off); pass --socket PATH")
    return path


def _subscribe(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    snapshot = client.subscribe(args.topics)
    if args.json:
        print(json.dumps({"snapshot": snapshot}), file=out, flush=True)
    try:
        for event in client.events():
            print(json.dumps(event), file=out, flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    print(f"{PROG}: the supervisor closed the connection", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str], environ: Mapping[str, str], out: TextIO | None = None) -> int:
    """Run ``mailroom ctl``; returns the exit code."""
    out = out or sys.stdout
    try:
        args = _parser().parse_args(list(argv))
        path = _socket_path(args, environ)
        cmd, request_args = _request(args)
    except _Usage as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # drain replies when nothing is in flight: wait as long as asked, and then some.
    timeout = (args.timeout or 600.0) + 10.0 if cmd == "drain" else 10.0
    try:
        # Nothing is sent to a socket served by anyone but root, us or MAILROOM_CONTROL_OWNER.
        with ControlClient(path, timeout=timeout, trusted=trusted_uids(environ)) as client:
            if cmd == "subscribe":
                return _subscribe(client, args, out)
            result = client.request(cmd, **request_args)
    except ControlRefused as exc:
        print(f"{PROG}: {cmd} refused: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except ControlUnavailable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_USAGE
    print(json.dumps(result) if args.json else summary(cmd, result), file=out, flush=True)
    return EXIT_OK
