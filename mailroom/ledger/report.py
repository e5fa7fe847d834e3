"""``mailroom status``: what the delivery ledger holds for this consumer's queue."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import psycopg

from mailroom import config, ledger
from mailroom._process import one_line
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


def report(raw: dict[str, Any], queue: str) -> dict[str, Any]:
    """Shape :func:`ledger.status`'s flat result as ``{queue, counts, oldest_queued_s, last_seq}``."""
    return {
        "queue": queue,
        "counts": {name: raw[name] for name in ledger.STATUSES},
        "oldest_queued_s": raw["oldest_queued_s"],
        "last_seq": raw["last_seq"],
    }


def render(shaped: dict[str, Any]) -> str:
    """The human-readable form of :func:`report`."""
    lines = [f"queue {shaped['queue']}"]
    for name, count in shaped["counts"].items():
        lines.append(f"  {name:<8} {count:>10}")
    lines.append(f"oldest queued: {_age(shaped['oldest_queued_s'])}")
    lines.append(f"jobs.last_seq: {shaped['last_seq']}")
    return "\n".join(lines)


def main(settings: Settings, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """Print the queue's ledger counts; exit code for the console script."""
    try:
        with psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10) as conn:
            ledger.check_schema(conn)
            shaped = report(ledger.status(conn, settings.queue_name), settings.queue_name)
    except ledger.SchemaError as exc:
        print(f"mailroom: {exc}", file=sys.stderr)
        return config.EXIT_SCHEMA
    except psycopg.Error as exc:  # ProgrammingError too: a URL libpq cannot parse
        message = config.redact(one_line(exc), settings.database_url)
        print(f"mailroom: cannot connect to the database: {message}", file=sys.stderr)
        return config.EXIT_FAILURE
    print(json.dumps(shaped) if as_json else render(shaped), file=out)
    return config.EXIT_OK
