"""``mailroom status``: what the delivery ledger holds for this consumer's queue."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import psycopg

from mailroom import config, ledger
from mailroom.config import Settings
from mailroom.ledger import events
from mailroom.ledger.commands import database_failed
from mailroom.vocabulary import SES_BOUNCE, SES_COMPLAINT, RateThresholds


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def deliverability(health: events.Health) -> dict[str, Any]:
    """:class:`~mailroom.ledger.events.Health` as ``status`` shows it (here, on the
    control socket, in the monitor): counts, rates (None before any send) and
    SES's thresholds beside them."""
    return {
        "window_s": events.HEALTH_WINDOW_S,
        "sent": health.sent, "bounced": health.bounced, "complained": health.complained,
        "bounce_rate": health.bounce_rate, "complaint_rate": health.complaint_rate,
        "bounce_thresholds": SES_BOUNCE._asdict(), "complaint_thresholds": SES_COMPLAINT._asdict(),
        "last_bad_event": health.last_bad_event, "suppressions": health.suppressions,
    }


def report(raw: dict[str, Any], queue: str, health: events.Health | None = None) -> dict[str, Any]:
    """Shape :func:`ledger.status`'s flat result as ``{queue, counts, oldest_queued_s, last_seq}``
    and, given ``health``, ``deliverability`` (:func:`deliverability`)."""
    shaped = {
        "queue": queue,
        "counts": {name: raw[name] for name in ledger.STATUSES},
        "oldest_queued_s": raw["oldest_queued_s"],
        "last_seq": raw["last_seq"],
    }
    if health is not None:
        shaped["deliverability"] = deliverability(health)
    return shaped


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f} %"


def rate_lines(d: dict[str, Any]) -> list[str]:
    """The rates of :func:`deliverability` beside SES's thresholds, one line each."""
    lines = []
    for name, count, limits in (("bounce", "bounced", SES_BOUNCE), ("complaint", "complained", SES_COMPLAINT)):
        rate = d[f"{name}_rate"]
        verdict = {"ok": "", "review": "  PAST SES'S REVIEW THRESHOLD",
                   "pause": "  PAST SES'S PAUSE THRESHOLD"}[limits.verdict(rate)]
        lines.append(f"  {name + ' rate':<15} {_percent(rate):>8}  ({d[count]:,} of {d['sent']:,} sent;"
                     f" SES reviews at {_limit(limits, 'review')}, may pause at {_limit(limits, 'pause')}){verdict}")
    return lines


def _limit(limits: RateThresholds, which: str) -> str:
    return f"{getattr(limits, which) * 100:g} %"


def render(shaped: dict[str, Any]) -> str:
    """The human-readable form of :func:`report`."""
    lines = [f"queue {shaped['queue']}"]
    for name, count in shaped["counts"].items():
        lines.append(f"  {name:<8} {count:>10}")
    lines.append(f"oldest queued: {_age(shaped['oldest_queued_s'])}")
    lines.append(f"jobs.last_seq: {shaped['last_seq']}")
    if "deliverability" in shaped:
        d = shaped["deliverability"]
        lines.append(f"last {d['window_s'] // 3600} h: {d['sent']:,} sent")
        lines.extend(rate_lines(d))
    return "\n".join(lines)


def main(settings: Settings, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """Print the queue's ledger counts; exit code for the console script."""
    try:
        with psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10) as conn:
            ledger.check_schema(conn)
            shaped = report(ledger.status(conn, settings.queue_name), settings.queue_name,
                            events.health(conn, settings.queue_name))
    except (ledger.SchemaError, psycopg.Error) as exc:  # ProgrammingError too: a URL libpq cannot parse
        # "database: ...", not "cannot connect": the server may have answered (an unknown queue).
        return database_failed(exc, settings)
    print(json.dumps(shaped) if as_json else render(shaped), file=out)
    return config.EXIT_OK
