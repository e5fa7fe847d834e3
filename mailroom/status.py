"""``mailroom status``: what the delivery ledger holds for this consumer's queue."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import psycopg

from mailroom import config, ledger
from mailroom.config import Settings


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render(report: dict, queue: str) -> str:
    """The human-readable form of :func:`ledger.status`'s report."""
    lines = [f"queue {queue}"]
    for name, count in report["counts"].items():
        lines.append(f"  {name:<8} {count:>10}")
    lines.append(f"oldest queued: {_age(report['oldest_queued_age'])}")
    lines.append(f"jobs.last_seq: {report['last_seq']}")
    return "\n".join(lines)


def main(settings: Settings, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """Print the queue's ledger counts; exit code for the console script."""
    try:
        with psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10) as conn:
            ledger.check_schema(conn)
            report = ledger.status(conn, settings.queue_name)
    except ledger.SchemaError as exc:
        print(f"mailroom: {exc}", file=sys.stderr)
        return config.EXIT_SCHEMA
    except psycopg.OperationalError as exc:
        print(f"mailroom: cannot connect to the database: {' '.join(str(exc).split())}", file=sys.stderr)
        return config.EXIT_FAILURE
    if as_json:
        print(json.dumps({"queue": settings.queue_name, **report}, sort_keys=True), file=out)
    else:
        print(render(report, settings.queue_name), file=out)
    return config.EXIT_OK
