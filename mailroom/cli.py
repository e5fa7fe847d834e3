"""Console scripts: ``mailroom``, ``mailroom-collector``, ``mailroom-sender``, ``mailroom-supervisor``.

Each entry point validates its configuration first (one line on stderr and exit code
:data:`mailroom.config.EXIT_CONFIG` on a bad value), sets up logging, then hands over
to the module that does the work. Heavy modules are imported lazily so that, for
example, the supervisor never imports psycopg or boto3.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection, Sequence

from mailroom import config, log

PROG = "mailroom"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def _settings(require: Collection[str]) -> config.Settings:
    """Load settings or exit with the one-line configuration error."""
    try:
        settings = config.load(os.environ, require=require)
        # Choose the wire implementation now: MAILROOM_IMPL=c without the built
        # extension is a configuration error, not a traceback from a worker.
        from mailroom import wire  # noqa: F401
    except config.ConfigError as exc:
        sys.exit(_fail(str(exc), config.EXIT_CONFIG))
    except ImportError as exc:
        sys.exit(_fail(" ".join(str(exc).split()), config.EXIT_CONFIG))
    return settings


def collector_main() -> None:
    """``mailroom-collector``: print batch lines on stdout (compatibility mode)."""
    settings = _settings(require=(config.DATABASE, config.SECRET))
    log.setup("PG", settings.log_level)
    from mailroom import collector

    sys.exit(collector.run_stdout(settings))


def sender_main() -> None:
    """``mailroom-sender``: read batch lines on stdin and send them through SES."""
    settings = _settings(require=())
    log.setup("SES", settings.log_level)
    from mailroom import sender_stdin

    sys.exit(sender_stdin.run_stdin(settings))


def supervisor_main() -> None:
    """``mailroom-supervisor``: run collector and sender workers under one supervisor."""
    settings = _settings(require=(config.DATABASE, config.SECRET))
    log.setup("SUP", settings.log_level)
    from mailroom import supervisor

    sys.exit(supervisor.run(settings))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="mailroom administration")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate", help="apply or revert database migrations", add_help=False)
    migrate.add_argument("args", nargs=argparse.REMAINDER)
    status = sub.add_parser("status", help="delivery ledger counts for the queue")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``mailroom``: ``migrate up|down|status|force`` and ``status``."""
    args = _parser().parse_args(argv)
    settings = _settings(require=(config.DATABASE,))
    log.setup("PG", settings.log_level)
    if args.command == "migrate":
        from mailroom import migrate

        sys.exit(migrate.main(list(args.args), settings.database_url))
    from mailroom import status

    sys.exit(status.main(settings, as_json=args.json))


if __name__ == "__main__":
    main()
