"""What ``mailroom ctl`` prints for people (``--json`` prints the supervisor's result as is).

Fields one per line with their labels aligned, numbers with their units, times as
local ISO 8601 (``2026-12-03T07:21:04+01:00``): what an operator reads at 3 a.m. The
shapes come from the supervisor (:mod:`mailroom.supervisor.operator`) and are read
loosely: a field that is missing shows as ``-``, never as a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from mailroom.vocabulary import SES_BOUNCE, SES_COMPLAINT

__all__ = ["batch", "batches", "local_time", "status"]

_MIB = 1024 * 1024


def local_time(epoch: Any) -> str:
    """An epoch time as local ISO 8601 to the second; ``-`` when there is none."""
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return "-"
    return dt.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _duration(seconds: Any) -> str:
    """``4.2 s``, ``12 min 5 s``, ``3 h 02 min``, ``2 d 4 h``; ``-`` when unknown."""
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def _count(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _rate(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:g}/s"


def _mib(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value / _MIB:.1f} MiB"


def _fields(rows: Sequence[tuple[str, str]], indent: str = "") -> list[str]:
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{indent}{label:<{width}}  {value}".rstrip() for label, value in rows]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [indent + "  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in (header, *rows)]


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _rate_limit(limit: Any, cap: Any) -> str:
    """The limit in force, and the send quota when it allows more (what set-rate may reach)."""
    if limit is None:
        return "none"
    text = f"{_count(limit)} recipients/s"
    if isinstance(cap, int | float) and isinstance(limit, int | float) and cap > limit:
        text += f" (the send quota allows {_count(cap)})"
    return text


def status(result: Mapping[str, Any]) -> str:
    """``ctl status``: the supervisor, its queue, rates and quota, then one line per worker."""
    paused = _dict(result.get("paused"))
    in_flight = _dict(result.get("in_flight"))
    rates = _dict(result.get("rates"))
    ses = _dict(result.get("ses"))
    counters = _dict(result.get("counters"))
    if ses.get("max_send_rate") is None:
        quota = "not read (yet)"
    else:
        quota = (f"{_count(ses.get('max_send_rate'))} recipients/s, {_count(ses.get('max_24h_send'))} per 24 h,"
                 f" {_count(ses.get('sent_last_24h'))} sent in the last 24 h")
    if ses.get("paused"):
        quota += " (SES paused sending for the account)"
    oldest = result.get("oldest_queued_s")
    lines = _fields([
        ("supervisor", f"pid {result.get('pid', '-')}, mailroom {result.get('version', '-')}"),
        ("state", str(result.get("state", "-"))),
        ("paused", ", ".join(f"{what} {'yes' if paused.get(what) else 'no'}" for what in ("claims", "sending"))),
        ("queue", f"{result.get('queue', '-')}: {_count(result.get('queue_depth'))} queued"
                  + (f", oldest {_duration(oldest)}" if oldest is not None else "")),
        ("in flight", f"{_count(in_flight.get('batches'))} batches, {_count(in_flight.get('rows'))} rows"),
        ("sent", f"{_rate(rates.get('sent_per_s'))} now, {_count(counters.get('sent', 0))} since start"),
        ("failed", f"{_rate(rates.get('failed_per_s'))} now, {_count(counters.get('failed', 0))} since start"),
        ("batches", f"{_count(counters.get('batches', 0))} done, {_count(counters.get('retry', 0))} rows"
                    f" given back to retry, {_count(counters.get('skipped', 0))} skipped"),
        ("rate limit", _rate_limit(ses.get("rate_limit"), ses.get("rate_cap"))),
        ("SES quota", quota),
        *_deliverability(result),
    ])
    workers = _dict(result.get("workers"))
    if workers:
        rows = []
        for role, w in workers.items():
            w = _dict(w)
            rows.append([role, str(w.get("pid") or "-"), local_time(w.get("started")) if w.get("up") else "down",
                         _count(w.get("restarts", 0)), _duration(w.get("last_heartbeat_s")), _mib(w.get("rss"))])
        # A table fits 80 columns; one line of labelled fields per worker did not.
        lines += ["", *_table(["WORKER", "PID", "UP SINCE", "RESTARTS", "HEARTBEAT", "RSS"], rows)]
    return "\n".join(lines)


def _deliverability(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """24-hour bounce and complaint rates beside SES's thresholds, and the automatic
    pause: present with an events worker (it reads them from the ledger)."""
    health, guard = result.get("deliverability"), _dict(result.get("guard"))
    rows = []
    if isinstance(health, Mapping):
        sent = health.get("sent")
        for name, count, limits in (("bounce", "bounced", SES_BOUNCE), ("complaint", "complained", SES_COMPLAINT)):
            rate = health.get(f"{name}_rate")
            shown = "-" if not isinstance(rate, (int, float)) else f"{rate * 100:.2f} %"
            verdict = {"ok": "", "review": ", PAST SES'S REVIEW", "pause": ", PAST SES'S PAUSE"}[
                limits.verdict(rate if isinstance(rate, (int, float)) else None)]
            rows.append((f"{name} rate", f"{shown} ({_count(health.get(count))} of {_count(sent)} sent in 24 h;"
                                         f" SES {limits.review * 100:g} % / {limits.pause * 100:g} %{verdict})"))
    limits_set = [f"{name} {guard[key] * 100:g} %" for name, key in
                  (("bounce", "pause_bounce_rate"), ("complaint", "pause_complaint_rate"))
                  if isinstance(guard.get(key), (int, float))]
    if limits_set:
        auto = f"past {' or '.join(limits_set)} (at least {_count(guard.get('min_sends'))} sent)"
        if guard.get("paused_reason"):
            auto = f"CLAIMS PAUSED: {guard['paused_reason']}"
        rows.append(("auto-pause", auto))
    return rows


def _outcome(entry: Mapping[str, Any]) -> str:
    parts = [f"{_count(entry.get(key))} {key}" for key in ("sent", "failed", "retry", "skipped")
             if entry.get(key)]
    return ", ".join(parts) or "-"


def _ms(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or not value else f"{value:,.0f} ms"


def batches(result: Mapping[str, Any]) -> str:
    """``ctl batches``: one line per batch, the latest last."""
    entries = [_dict(b) for b in result.get("batches") or []]
    if not entries:
        return "no batches"
    rows = [[str(b.get("batch", "-")), str(b.get("state", "-")), _count(b.get("rows")),
             local_time(b.get("claimed")), _ms(b.get("ms")), _outcome(b)] for b in entries]
    return "\n".join(_table(["BATCH", "STATE", "ROWS", "CLAIMED", "TOOK", "OUTCOME"], rows))


def batch(result: Mapping[str, Any]) -> str:
    """``ctl batch ID``: the batch, then each address with its status, MessageId and error."""
    lines = _fields([
        ("batch", str(result.get("batch", "-"))),
        ("state", str(result.get("state", "-"))),
        ("rows", f"{_count(result.get('rows'))} ({_count(result.get('activation'))} activation,"
                 f" {_count(result.get('recovery'))} password recovery)"),
        ("claimed", local_time(result.get("claimed"))),
        ("took", _ms(result.get("ms"))),
        ("outcome", _outcome(result)),
    ])
    destinations = [_dict(d) for d in result.get("destinations") or []]
    if destinations:
        rows = [[str(d.get("address") or "-"), str(d.get("action") or "-"), str(d.get("status") or "-"),
                 str(d.get("message_id") or "-"), " ".join(str(d.get("error") or "-").split())]
                for d in destinations]
        lines += ["", *_table(["ADDRESS", "ACTION", "STATUS", "MESSAGE ID", "ERROR"], rows)]
    else:
        lines.append("(the addresses are no longer kept for this batch)")
    return "\n".join(lines)


def flat(value: Any) -> str:
    """A value of a result the renderings above do not know, on one line."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return "-" if value is None else str(value)
