"""Small widgets and formatting shared by the panes: the header, the banner, big numbers."""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from rich.text import Text
from textual.widgets import Static

from mailroom.monitor.feed import ControlFeed
from mailroom.monitor.model import MonitorState

__all__ = ["Banner", "BigNumber", "HeaderBar", "HeaderSource", "age", "bar", "num", "when"]


class HeaderSource(Protocol):
    """What the header line shows (the app is one)."""

    state: MonitorState
    feed: ControlFeed | None
    operate: bool
    queue: str
    frozen: bool

    @property
    def role_label(self) -> str: ...


def num(value: Any, digits: int = 0) -> str:
    """A number with thousands separators; ``-`` for None."""
    if value is None or isinstance(value, bool):
        return "-"
    try:
        return f"{float(value):,.{digits}f}" if digits else f"{int(value):,}"
    except (TypeError, ValueError):
        return "-"


def age(seconds: float | None) -> str:
    """A coarse age: ``42s``, ``7m``, ``3h``, ``2d`` (coarse so table cells change rarely)."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def when(value: Any) -> str:
    """A timestamp from the ledger or the socket, compact; ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return str(value)[:25]


def bar(used: float | None, total: float | None, width: int = 12) -> Text:
    """A usage bar ``[████░░░░] 35%``, red above 90 %."""
    if not used and used != 0 or not total or total <= 0:
        return Text("n/a", style="dim")
    frac = max(0.0, min(1.0, used / total))
    filled = round(frac * width)
    style = "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"
    text = Text("[")
    text.append("█" * filled, style=style)
    text.append("░" * (width - filled), style="dim")
    text.append(f"] {frac:.0%}")
    return text


class BigNumber(Static):
    """One big number with a caption (the Live screen's top row)."""

    DEFAULT_CSS = """
    BigNumber { width: 1fr; height: 5; border: round $primary; content-align: center middle;
                text-style: bold; }
    """

    def __init__(self, caption: str, **kwargs: Any) -> None:
        super().__init__("-", **kwargs)
        self.border_title = caption
        self._shown: str | None = None

    def show(self, value: str) -> None:
        """Display ``value`` (only repaints when it changed)."""
        if value != self._shown:
            self._shown = value
            # Fixed size: a repaint without a layout pass (which repaints the screen).
            self.update(Text(value, style="bold"), layout=False)


class Banner(Static):
    """A one-line alarm under the header: disconnected, SES paused. Hidden when empty."""

    DEFAULT_CSS = """
    Banner { height: 1; background: $error; color: $text; text-style: bold; display: none; }
    Banner.warning { background: $warning; color: black; }
    """

    def show(self, message: str | None, warning: bool = False) -> None:
        """Show ``message``, or hide the banner when it is None."""
        self.display = bool(message)
        self.set_class(warning, "warning")
        if message:
            self.update(Text(message))


class HeaderBar(Static):
    """Connection, role, run state, queue, send rate vs limit, SES 24 h usage."""

    DEFAULT_CSS = """
    HeaderBar { height: 1; background: $panel; color: $text; }
    """

    _shown: str | None = None

    def render_from(self, app: HeaderSource) -> None:
        """Rebuild the line from the app's state."""
        state, feed = app.state, app.feed
        text = Text()
        text.append(" mailroom ", style="bold reverse")
        if feed is None:
            text.append("  live: off", style="dim")
        elif feed.connected:
            text.append("  ● connected", style="green")
        else:
            text.append("  ○ disconnected", style="bold red")
        role = app.role_label
        text.append("  ")
        text.append(role, style="bold magenta" if role == "OPERATOR" else "bold cyan")
        if app.operate:
            text.append(" (operate)", style="magenta")
        text.append(f"  state {state.run_state}")
        text.append(f"  queue {state.queue or app.queue}")
        tick = state.tick
        limit = tick.rate_limit or tick.max_send_rate
        text.append(f"  rate {num(tick.sent_per_s, 1)}/s of {num(limit, 1)}/s")
        text.append("  SES 24h ")
        text.append(bar(tick.sent_last_24h, tick.max_24h_send))
        if app.frozen:
            text.append("  FROZEN", style="bold reverse yellow")
        if text.plain != self._shown:
            self._shown = text.plain
            self.update(text, layout=False)  # one line, always: no layout pass
