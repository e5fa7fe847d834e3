"""Console scripts: ``mailroom``, ``mailroom-collector``, ``mailroom-sender``, ``mailroom-supervisor``.

Each entry point parses its command line first, so ``-h/--help`` and ``--version``
answer without any configuration and start nothing; then it validates its
configuration (one line on stderr and exit code :data:`mailroom.config.EXIT_CONFIG`
on a bad value), sets up logging, and hands over to the module that does the work.
Heavy modules are imported lazily so that, for example, the supervisor never imports
psycopg or boto3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Collection, Sequence

from mailroom import config
from mailroom._process import add_version, name_process, one_line, setup_logging

PROG = "mailroom"
_CONFIGURED = ("Configured by MAILROOM_* environment variables (README, Configure); "
               "-h and --version need none of them.")


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


def _daemon_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_CONFIGURED)
    add_version(parser)
    return parser


def collector_main(argv: Sequence[str] | None = None) -> None:
    """``mailroom-collector``: print batch lines on stdout (compatibility mode)."""
    _daemon_parser("mailroom-collector", "Claim due deliveries from PostgreSQL and print them as batch"
                   " lines on stdout (the original's pipe; pipe into mailroom-sender).").parse_args(argv)
    name_process("mailroom-collector")
    settings = _settings((config.DATABASE, config.SECRET), "PG")
    from mailroom.collector.stdout import run_stdout

    sys.exit(run_stdout(settings))


def sender_main(argv: Sequence[str] | None = None) -> None:
    """``mailroom-sender``: read batch lines on stdin and send them through SES."""
    _daemon_parser("mailroom-sender", "Read batch lines on stdin (from mailroom-collector) and send"
                   " each through AWS SES.").parse_args(argv)
    name_process("mailroom-sender")
    settings = _settings((), "SES")
    from mailroom.sender.stdin import run_stdin

    sys.exit(run_stdin(settings))


def supervisor_main(argv: Sequence[str] | None = None) -> None:
    """``mailroom-supervisor``: run collector and sender workers under one supervisor."""
    _daemon_parser("mailroom-supervisor", "Run the collector and sender workers under one supervisor,"
                   " with the control socket and metrics.").parse_args(argv)
    name_process("mailroom-supervisor")
    settings = _settings((config.DATABASE, config.SECRET), "SUP")
    from mailroom.supervisor import arbiter

    sys.exit(arbiter.run(settings))


# Subcommands with a parser of their own (they need no database before parsing, or
# bring their own): ``mailroom NAME ...`` hands them the rest of the command line.
_DELEGATED = {
    "migrate": "apply or revert database migrations (mailroom migrate --help)",
    "ctl": "talk to a running supervisor (mailroom ctl --help)",
    "demo": "everything on this machine (mailroom demo --help)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="mailroom administration", epilog=_CONFIGURED)
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in _DELEGATED.items():  # listed in --help; main() hands them over first
        sub.add_parser(name, help=text, add_help=False)
    status = sub.add_parser("status", help="delivery ledger counts for the queue",
                            description="Counts of the queue's deliveries by status and action.")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add_version(status)
    from mailroom.ledger import commands

    for name, (text, description) in commands.COMMANDS.items():
        one = sub.add_parser(name, help=text, description=description)
        commands.add_arguments(name, one)
        add_version(one)
    from mailroom.ledger import suppression_commands

    suppression_commands.add_arguments(sub.add_parser(
        "suppression", help="addresses never sent to again: list, add, remove, check",
        description="The suppression list: addresses that bounced for good, complained, or were added by hand"
                    " (DESIGN.md 11). A claimed email to one of them is skipped, never sent."))
    monitor = sub.add_parser("monitor", help="the Textual monitor (live batches and the ledger)",
                             description="Watch and steer mailroom: the supervisor's socket and the ledger.")
    from mailroom.monitor import add_arguments

    add_arguments(monitor)
    add_version(monitor)
    tokens = sub.add_parser("tokens", help="check a link's token (mailroom tokens verify --help)",
                            description="Signed tokens, for support staff.")
    add_version(tokens)
    verify = tokens.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND").add_parser(
        "verify", help="which key signed a link's token, and what the token is",
        description="Check TOKEN (or a whole link holding it) against MAILROOM_SECRET_KEY and"
        " MAILROOM_SECRET_KEY_FALLBACKS; with MAILROOM_DATABASE_URL, also show its action, account"
        " and expiry. Prints no secret. Exit 0 authentic, 1 not.")
    verify.add_argument("token", metavar="TOKEN", help="the 86-character token, or the link that holds it")
    verify.add_argument("--code", help="the 5-digit code of a password recovery token (needed without"
                        " the database)")
    add_version(verify)
    from mailroom.templates import commands as template_commands

    template_commands.add_arguments(sub.add_parser(
        "templates", help="SES templates as files: push, pull, diff, check (mailroom templates --help)",
        description="SES templates as files (MAILROOM_TEMPLATES_DIR, one folder per template)"))
    from mailroom.events import setup as ses_setup

    ses_setup.add_arguments(sub.add_parser(
        "ses", help="wire SES to mailroom: setup-events (mailroom ses --help)",
        description="Set up what SES needs around mailroom"))
    return parser


def _token_last(args: list[str]) -> list[str]:
    """``tokens verify``'s arguments with the token after ``--``: a token is base64url,
    and one in 64 begins with ``-``, which argparse would take for an unknown option."""
    options = ("-h", "--help", "--version", "--code")
    for word in args:
        if word.startswith("-") and word != "--" and word.split("=", 1)[0] not in options:
            return [a for a in args if a is not word] + ["--", word]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """``mailroom``: ``migrate``, ``status``, ``ctl``, ``deliveries``, ``retry``, ``skip``, ``unskip``,
    ``suppression``, ``monitor``, ``templates``, ``ses setup-events``, ``tokens verify``, ``demo``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:  # its own parser; needs no database
        from mailroom.control import ctl

        sys.exit(ctl.main(argv[1:], os.environ))
    if argv[:1] == ["demo"]:  # its own parser; brings its own database (the demo extra)
        from mailroom.demo.app import main as demo_main

        sys.exit(demo_main(argv[1:]))
    if argv[:1] == ["migrate"]:  # its own parser, parsed before the database URL is needed
        from mailroom.ledger import migrate

        parsed = migrate.parse(argv[1:])
        if isinstance(parsed, int):
            sys.exit(parsed)
        sys.exit(migrate.run(parsed, _settings((config.DATABASE,), "PG").database_url))
    if argv[:2] == ["tokens", "verify"]:
        argv = argv[:2] + _token_last(argv[2:])
    args = _parser().parse_args(argv)
    if args.command == "monitor":
        # Needs neither database nor secret: either the socket or the ledger will do.
        from mailroom.monitor import run

        sys.exit(run(args))
    if args.command == "templates":
        # Needs SES (the sender's endpoint and credentials), no database.
        from mailroom.templates import commands as template_commands

        sys.exit(template_commands.main(args, _settings((), "SES")))
    if args.command == "ses":
        # SES with the sender's settings; SNS and SQS by boto3's own configuration. No database.
        from mailroom.events import setup as ses_setup

        sys.exit(ses_setup.main(args, _settings((), "SES")))
    if args.command == "tokens":
        sys.exit(_tokens_verify(args, _settings((config.SECRET,), "PG")))
    settings = _settings((config.DATABASE,), "PG")
    if args.command == "status":
        from mailroom.ledger import report

        sys.exit(report.main(settings, as_json=args.json))
    if args.command == "suppression":
        from mailroom.ledger import suppression_commands

        sys.exit(suppression_commands.main(args, settings))
    from mailroom.ledger import commands

    sys.exit(commands.main(args.command, args, settings))


def _tokens_verify(args: argparse.Namespace, settings: config.Settings) -> int:
    """``mailroom tokens verify TOKEN``: which key signed it, and (from the database,
    when configured) what it is. Never prints the token, its secret or a key."""
    import re
    import time

    from mailroom import tokens

    # A whole pasted link will do: the token is its one run of 86 base64url characters.
    found = re.findall(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{86}(?![A-Za-z0-9_-])", args.token)
    secret = tokens.token_secret(found[0]) if len(found) == 1 else None
    if secret is None:
        print("not a mailroom token: expected 86 base64url characters")
        return config.EXIT_FAILURE
    token = found[0]
    row = None
    if settings.database_url:
        import psycopg

        from mailroom.ledger import admin
        try:
            with psycopg.connect(settings.database_url, connect_timeout=10) as conn:
                row = admin.token_by_secret(conn, secret)
        except psycopg.Error as exc:
            return _fail(f"cannot read the tokens table: {config.redact(one_line(exc), settings.database_url)}",
                         config.EXIT_CONFIG)
    action, code = ("password_recovery", args.code) if args.code is not None else ("activation", None)
    if row is not None:
        action, code = row["action"], row["code"]
    keys = [settings.secret_key, *settings.secret_key_fallbacks]
    matched = tokens.match(keys, token, action, code)
    if matched is None:
        print("NOT authentic: no configured key signed it"
              + ("" if row is not None or args.code is not None else
                 " as an activation token (a password recovery token needs --code or MAILROOM_DATABASE_URL)"))
    elif matched.index == 0:
        print("authentic: signed with the current key (MAILROOM_SECRET_KEY)")
    else:
        print(f"authentic: signed with fallback key {matched.index} of {len(keys) - 1}"
              " (MAILROOM_SECRET_KEY_FALLBACKS): mailroom no longer signs with it")
    print(f"action: {action}")
    if row is None:
        print("token: " + ("not in the tokens table" if settings.database_url
                           else "not looked up (MAILROOM_DATABASE_URL is not set)"))
    else:
        print(f"token: id {row['id']}, account {row['account']} {row['email']} ({row['account_status']})")
        left = row["expires_at"] - row["now"]
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row["expires_at"]))
        print(f"expires: {when}, " + (f"in {left // 60} min {left % 60} s" if left > 0
                                      else f"EXPIRED {-left // 60} min {-left % 60} s ago"))
        consumed = row["consumed_at"]
        print("consumed: " + ("no" if consumed is None
                              else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(consumed))))
    return config.EXIT_OK if matched is not None else config.EXIT_FAILURE


if __name__ == "__main__":
    main()
