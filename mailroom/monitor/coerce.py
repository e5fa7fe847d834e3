"""Tolerant conversions of values that arrived over the control socket (or from the ledger).

Each returns the converted value or a default, never raises: the monitor must
survive any JSON a peer sends.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

__all__ = ["as_bool", "as_dict", "as_epoch", "as_float", "as_int", "as_str"]



def as_int(value: Any, default: int | None = None) -> int | None:
    """``value`` as an int, or ``default`` when it is not a number (bools are not)."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value and abs(value) < 1e18 else default
    if isinstance(value, str):
        try:
            return int(float(value.strip()))
        except (ValueError, OverflowError):
            return default
    return default


def as_float(value: Any, default: float | None = None) -> float | None:
    """``value`` as a finite float, or ``default``."""
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            return default
    else:
        return default
    return f if f == f and abs(f) != float("inf") else default


def as_str(value: Any, default: str | None = None, limit: int = 500) -> str | None:
    """``value`` as a one-line string of at most ``limit`` characters, or ``default``."""
    if value is None:
        return default
    if isinstance(value, (dict, list)):
        return default
    text = (value if isinstance(value, str) else str(value))[:limit]
    # Control characters would break the table layout (and could be markup
    # tricks from a hostile peer): one line, printable.  The common case, already
    # printable, is checked in C (the character loop was a third of the model's time).
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text


def as_bool(value: Any, default: bool | None = None) -> bool | None:
    """``value`` as a bool (true/false, 1/0, "true"/"false"), or ``default``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    return default


def as_epoch(value: Any) -> float | None:
    """A time as epoch seconds: a number is taken as is, a string as ISO-8601; else None."""
    number = as_float(value)
    if number is not None and not isinstance(value, str):
        return number
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return number
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return when.timestamp()
    return None


def as_dict(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}
