"""``mailroom monitor``: the Textual monitor of a supervisor (live) and its ledger.

:func:`main` parses the command line; :class:`~mailroom.monitor.app.MonitorApp`
is the application (importable for tests and for ``mailroom demo``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from mailroom.config import Settings

__all__ = ["SERVER_PID_VARIABLE", "bind_to_server", "main", "socket_path"]

DEFAULT_WEB_PORT = 8566
#: The --web server's pid, in each browser session's environment (web.py).
SERVER_PID_VARIABLE = "MAILROOM_WEB_SERVER_PID"


def socket_path(environ: Mapping[str, str], queue: str) -> str | None:
    """The control socket to watch (OPERATIONS.md 2); None when it is ``off``."""
    from mailroom.control.sockfile import default_socket_path

    return default_socket_path(environ, queue)


def parser() -> argparse.ArgumentParser:
    """The ``mailroom monitor`` options."""
    from mailroom._process import add_version

    p = argparse.ArgumentParser(prog="mailroom monitor", description="watch and steer mailroom")
    add_arguments(p)
    add_version(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the monitor's options to ``p`` (shared with ``mailroom monitor`` in cli.py)."""
    p.add_argument("--socket", help="control socket (default: as the supervisor computes it)")
    p.add_argument("--operate", action="store_true",
                   help="enable the state-changing keys (P, D, L, R, X)")
    p.add_argument("--web", action="store_true",
                   help="serve the monitor in a browser on 127.0.0.1 (textual-serve)")
    p.add_argument("--port", type=int, default=DEFAULT_WEB_PORT, help="port for --web")


def run(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    """Run the monitor (or its web server) with parsed ``args``; returns the exit code."""
    # The supervisor's defaults (config.Settings), read leniently: the monitor also
    # runs where the workers' other variables are not set.
    queue = environ.get("MAILROOM_QUEUE_NAME") or Settings.queue_name
    path = args.socket or socket_path(environ, queue)
    database_url = environ.get("MAILROOM_DATABASE_URL") or None
    channel = environ.get("MAILROOM_CHANNEL_NAME") or Settings.channel_name
    if args.web:
        return _serve(args, path)
    from mailroom.monitor.app import MonitorApp

    MonitorApp(path, database_url, queue=queue, channel=channel, operate=args.operate).run()
    return 0


def _serve(args: argparse.Namespace, path: str | None) -> int:
    try:
        from mailroom.monitor.web import MonitorServer
    except ImportError:
        print("mailroom monitor: --web needs textual-serve: pip install 'mailroom[web]'",
              file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "mailroom.monitor"]
    if path:
        command += ["--socket", path]
    if args.operate:
        command.append("--operate")
    # 127.0.0.1 only: the page is a terminal with the operator's rights; reach it
    # from elsewhere through an ssh tunnel, never an open port.
    MonitorServer(command, host="127.0.0.1", port=args.port, title="mailroom monitor").serve()
    return 0


def bind_to_server(environ: Mapping[str, str] = os.environ) -> None:
    """In a browser session's monitor: die with the ``--web`` server that started it.

    The kernel sends SIGTERM when the server goes (Textual quits on it); a server that
    died before the request was made is caught by comparing the parent's pid.
    """
    server = environ.get(SERVER_PID_VARIABLE)
    if not server:
        return
    from mailroom._process import die_with_parent

    die_with_parent(signal.SIGTERM)
    if str(os.getppid()) != server:
        sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mailroom.monitor [--socket PATH] [--operate] [--web] [--port N]``."""
    return run(parser().parse_args(argv))
