"""Small widgets and formatting shared by the panes: the header, the banner, big numbers."""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from rich.text import Text
from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import Footer, Static
from textual.widgets._footer import FooterKey

from mailroom.monitor.feed import ControlFeed
from mailroom.monitor.model import MonitorState

__all__ = ["Banner", "BigNumber", "HeaderBar", "HeaderSource", "History", "KeyFooter", "age", "bar", "num", "when"]


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


class History(Widget):
    """A sparkline of per-second samples, newest on the right.

    Not Textual's ``Sparkline``: that one stretches whatever samples there are over
    the whole width (one sample is a solid block from edge to edge) and scales from
    the smallest sample to the largest, so a steady 31 -> 19/s looks like a collapse.
    Here each column is one sample (the largest of a few when the history is wider
    than the widget), columns with no sample yet are blank, and heights are scaled
    from zero to the peak (which the caption states).  A zero is a dim baseline.
    """

    DEFAULT_CSS = """
    History { height: 2; color: $primary; }
    """
    BARS = " ▁▂▃▄▅▆▇█"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._data: list[float] = []

    def show(self, data: list[float]) -> float:
        """Draw ``data`` (oldest first); returns the peak the heights are scaled to."""
        if data != self._data:
            self._data = data
            self.refresh()
        return max(data, default=0.0)

    def columns(self, width: int) -> list[float]:
        """The samples shown in ``width`` columns: the newest ``width``, or the maxima of
        equal slices of all of them when there are more samples than columns."""
        data = self._data
        if len(data) <= width:
            return data
        step = len(data) / width
        return [max(data[int(i * step):max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]

    def render(self) -> Text:
        width, height = self.size.width, max(1, self.size.height)
        cols = self.columns(width)
        peak = max(cols, default=0.0)
        levels = [0 if peak <= 0 or v <= 0 else max(1, round(v / peak * height * 8)) for v in cols]
        text = Text(no_wrap=True)
        for row in reversed(range(height)):  # the top line first
            text.append(" " * (width - len(cols)))
            for value, level in zip(cols, levels, strict=True):
                if level == 0 and row == 0 and value == 0:
                    text.append("▁", style="dim")  # a sample of zero: data, but nothing sent
                else:
                    text.append(self.BARS[max(0, min(8, level - row * 8))])
            if row:
                text.append("\n")
        return text


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
    #: Narrower than this, the header says the same in fewer words.
    WIDE = 120

    def render_from(self, app: HeaderSource) -> None:
        """Rebuild the line from the app's state."""
        state, feed = app.state, app.feed
        # Below WIDE columns the same facts in fewer words, so nothing is cut off at 80.
        short = 0 < self.size.width < self.WIDE
        gap = " " if short else "  "
        text = Text()
        text.append(" mailroom ", style="bold reverse")
        if feed is None:
            text.append(gap + ("live off" if short else "live: off"), style="dim")
        elif feed.connected:
            text.append(gap + ("●" if short else "● connected"), style="green")
        else:
            text.append(gap + "○ disconnected", style="bold red")
        role = app.role_label
        text.append(gap)
        text.append(role, style="bold magenta" if role == "OPERATOR" else "bold cyan")
        if app.operate:
            text.append("+op" if short else " (operate)", style="magenta")
        # The run state is the supervisor's word: while disconnected the last one heard
        # may no longer hold (a supervisor that stopped is not "running").
        run_state = state.run_state if feed is None or feed.connected else "?"
        text.append(f"{gap}{run_state}" if short else f"  state {run_state}")
        text.append(f"{gap}{state.queue or app.queue}" if short else f"  queue {state.queue or app.queue}")
        tick = state.tick
        limit = tick.rate_limit or tick.max_send_rate
        text.append(f"{gap}{num(tick.sent_per_s, 1)}/{num(limit, 1)}/s" if short
                    else f"  rate {num(tick.sent_per_s, 1)}/s of {num(limit, 1)}/s")
        text.append(f"{gap}SES " if short else "  SES 24h ")
        text.append(bar(tick.sent_last_24h, tick.max_24h_send, width=6 if short else 12))
        if app.frozen:
            text.append(gap + "FROZEN", style="bold reverse yellow")
        if text.plain != self._shown:
            self._shown = text.plain
            self.update(text, layout=False)  # one line, always: no layout pass


class KeyFooter(Footer):
    """Textual's footer, with shorter words below :attr:`WIDE` columns so that every key
    still fits (at 80 columns the full footer cut the operator keys off the right)."""

    #: The full footer needs about this many columns.
    WIDE = 160
    #: Action -> its word in a narrow footer ("" for the key alone; ``?`` and the
    #: screens' digits explain themselves, and ``?`` lists every key in full).
    SHORT = {
        "show('live')": "", "show('ledger')": "", "show('failures')": "", "show('processes')": "",
        "show('events')": "", "show('deliverability')": "screens", "help": "", "search": "",
        "set_rate": "Rate", "pause": "Pause", "command_palette": "", "freeze": "", "unsuppress": "Unsup",
    }

    def compose(self) -> ComposeResult:
        narrow = self.app.size.width < self.WIDE
        self.compact = narrow
        for widget in super().compose():
            if narrow and isinstance(widget, FooterKey):
                widget.description = self.SHORT.get(widget.action, widget.description)
            yield widget
