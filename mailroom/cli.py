"""Console scripts: ``mailroom``, ``mailroom-collector``, ``mailroom-sender``, ``mailroom-supervisor``.

Each entry point validates its configuration first (one line on stderr and exit code
:data:`mailroom.config.EXIT_CONFIG` on a bad value), sets up logging, then hands over
to the module that does the work. Heavy modules are imported lazily so that, for
example, the supervisor never imports psycopg or boto3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Collection, Sequence

from mailroom import config
from mailroom._process import one_line, setup_logging

PROG = "mailroom"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def _settings(require: Collection[str], tag: str) -> config.Settings:
    """Load settings (or exit with the one-line configuration error), then set up
    logging with ``tag`` and say once which wire implementation was chosen if it
    was not the expected one."""
    try:
        settings = config.load(os.environ, require=require)
        # Choose the wire implementation now: MAILROOM_IMPL=c without the built
        # extension is a configuration error, not a traceback from a worker.
        from mailroom import wire
    except config.ConfigError as exc:
        sys.exit(_fail(str(exc), config.EXIT_CONFIG))
    except ImportError as exc:
        sys.exit(_fail(one_line(exc), config.EXIT_CONFIG))
    setup_logging(tag, settings.log_level)
    if wire.FALLBACK:
        logging.getLogger("mailroom").warning("%s", wire.FALLBACK)
    return settings


def collector_main() -> None:
    """``mailroom-collector``: print batch lines on stdout (compatibility mode)."""
    settings = _settings((config.DATABASE, config.SECRET), "PG")
    from mailroom.collector.stdout import run_stdout

    sys.exit(run_stdout(settings))


def sender_main() -> None:
    """``mailroom-sender``: read batch lines on stdin and send them through SES."""
    settings = _settings((), "SES")
    from mailroom.sender.stdin import run_stdin

    sys.exit(run_stdin(settings))


def supervisor_main() -> None:
    """``mailroom-supervisor``: run collector and sender workers under one supervisor."""
    settings = _settings((config.DATABASE, config.SECRET), "SUP")
    from mailroom.supervisor import arbiter

    sys.exit(arbiter.run(settings))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="mailroom administration")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate", help="apply or revert database migrations", add_help=False)
    migrate.add_argument("args", nargs=argparse.REMAINDER)
    status = sub.add_parser("status", help="delivery ledger counts for the queue")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("ctl", help="talk to a running supervisor (mailroom ctl --help)", add_help=False)
    sub.add_parser("demo", help="everything on this machine (mailroom demo --help)", add_help=False)
    from mailroom.ledger import commands

    for name, text in (("deliveries", "every delivery of an address"),
                       ("retry", "put failed deliveries back in the queue"),
                       ("skip", "mark queued deliveries skipped")):
        commands.add_arguments(name, sub.add_parser(name, help=text))
    monitor = sub.add_parser("monitor", help="the Textual monitor (live batches and the ledger)")
    from mailroom.monitor import add_arguments

    add_arguments(monitor)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``mailroom``: ``migrate``, ``status``, ``ctl``, ``deliveries``, ``retry``, ``skip``, ``monitor``,
    ``demo``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:  # its own parser; needs no database
        from mailroom.control import ctl

        sys.exit(ctl.main(argv[1:], os.environ))
    if argv[:1] == ["demo"]:  # its own parser; brings its own database (the demo extra)
        from mailroom.demo.app import main as demo_main

        sys.exit(demo_main(argv[1:]))
    args = _parser().parse_args(argv)
    if args.command == "monitor":
        # Needs neither database nor secret: either the socket or the ledger will do.
        from mailroom.monitor import run

        sys.exit(run(args))
    settings = _settings((config.DATABASE,), "PG")
    if args.command == "migrate":
        from mailroom.ledger import migrate

        sys.exit(migrate.main(list(args.args), settings.database_url))
    if args.command in ("deliveries", "retry", "skip"):
        from mailroom.ledger import commands

        sys.exit(commands.main(args.command, args, settings))
    from mailroom.ledger import report

    sys.exit(report.main(settings, as_json=args.json))


if __name__ == "__main__":
    main()
