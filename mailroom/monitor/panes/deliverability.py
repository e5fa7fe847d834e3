"""Screen 6, Deliverability (OPERATIONS.md 4): what SES said of what was sent.

The bounce and complaint rates over the last 24 hours beside SES's review and
pause thresholds (green / amber / red), events by type over the same window, the
latest bounces and complaints with their diagnostic, and the suppression list
(the newest 200; ``/`` searches it, ``U`` takes the selected address off it).  All
from the ledger (:meth:`LedgerSource.deliverability`), so the screen works with no
supervisor running.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.widgets import DataTable, Input, Label

from mailroom.monitor.ledger_source import LedgerSource, LedgerUnavailable
from mailroom.monitor.model import as_int, as_str
from mailroom.monitor.panes.base import LedgerPane
from mailroom.monitor.widgets import num, when
from mailroom.vocabulary import SES_BOUNCE, SES_COMPLAINT, Feedback, RateThresholds

__all__ = ["DeliverabilityPane"]

_STYLE = {"ok": "bold green", "review": "bold yellow", "pause": "bold red"}


def rate_line(name: str, rate: Any, count: Any, sent: Any, limits: RateThresholds) -> Text:
    """``bounce rate 4.10 % (41 of 1,000 sent)`` coloured by SES's thresholds."""
    value = rate if isinstance(rate, (int, float)) else None
    verdict = limits.verdict(value)
    shown = "-" if value is None else f"{value * 100:.2f} %"
    line = Text(f"{name:<15}")
    line.append(f"{shown:>8}", style=_STYLE[verdict])
    line.append(f"  ({num(as_int(count))} of {num(as_int(sent))} sent in 24 h;"
                f" SES reviews at {limits.review * 100:g} %, may pause at {limits.pause * 100:g} %)")
    return line


class DeliverabilityPane(LedgerPane):
    """Rates against SES's thresholds, events by type, latest bad news, suppressions."""

    DEFAULT_CSS = """
    DeliverabilityPane Label { padding: 0 1; }
    DeliverabilityPane DataTable { height: 1fr; }
    DeliverabilityPane #suppression-search { display: none; }
    DeliverabilityPane #suppression-search.shown { display: block; }
    """

    def compose(self) -> ComposeResult:
        yield Label("deliverability: not loaded yet", id="deliverability-info")
        yield Label("", id="bounce-rate")
        yield Label("", id="complaint-rate")
        yield Label("", id="feedback-counts")
        latest: DataTable[Any] = DataTable(id="latest-bad", cursor_type="row", zebra_stripes=True)
        latest.add_columns("time", "type", "recipient", "subtype", "diagnostic")
        yield latest
        yield Input(placeholder="suppressed addresses containing (Enter; empty: all), Esc to close",
                    id="suppression-search")
        #: What the suppression list is searched for (None: the newest of all).
        self.search: str | None = None
        suppressed: DataTable[Any] = DataTable(id="suppressions", cursor_type="row", zebra_stripes=True)
        suppressed.add_columns("address", "reason", "detail", "since", "by")
        yield suppressed

    def no_ledger(self) -> None:
        self.query_one("#deliverability-info", Label).update("deliverability: MAILROOM_DATABASE_URL is not set")

    def queries(self, ledger: LedgerSource) -> None:
        search = self.search
        self.fetch("ledger-deliverability", lambda source: source.deliverability(search), self._show)

    # -- the suppression list's search and selection

    def open_search(self) -> None:
        """`/` on this screen: search the suppression list."""
        box = self.query_one("#suppression-search", Input)
        box.add_class("shown")
        box.focus()

    def close_search(self) -> None:
        self.query_one("#suppression-search", Input).remove_class("shown")
        self.query_one("#suppressions", DataTable).focus()

    @on(Input.Submitted, "#suppression-search")
    def _submitted(self, event: Input.Submitted) -> None:
        self.search = event.value.strip() or None
        self.close_search()
        self.load()

    def selected_address(self) -> str | None:
        """The suppressed address under the cursor, if any (what ``U`` acts on)."""
        table = self.query_one("#suppressions", DataTable)
        if table.row_count == 0 or table.cursor_row < 0:
            return None
        address = str(table.get_row_at(table.cursor_row)[0])
        return address if address and address != "-" else None

    def _show(self, result: dict[str, Any] | LedgerUnavailable) -> None:
        info = self.query_one("#deliverability-info", Label)
        if isinstance(result, LedgerUnavailable):
            info.update(Text(f"ledger unavailable: {result}", style="bold red"))
            return
        health = result.get("health") or {}
        sent = health.get("sent")
        self.query_one("#bounce-rate", Label).update(
            rate_line("bounce rate", health.get("bounce_rate"), health.get("bounced"), sent, SES_BOUNCE))
        self.query_one("#complaint-rate", Label).update(
            rate_line("complaint rate", health.get("complaint_rate"), health.get("complained"), sent, SES_COMPLAINT))
        counts = result.get("counts") or {}
        self.query_one("#feedback-counts", Label).update(
            "last 24 h: " + ", ".join(f"{num(as_int(counts.get(str(kind), 0)))} {kind}" for kind in reversed(Feedback)))
        latest = self.query_one("#latest-bad", DataTable)
        latest.clear()
        for e in result.get("latest") or []:
            latest.add_row(when(e.get("event_at")), as_str(e.get("type"), "-"), as_str(e.get("recipient"), "-"),
                           as_str(e.get("subtype"), "-"), (as_str(e.get("diagnostic"), "-") or "-")[:60])
        table = self.query_one("#suppressions", DataTable)
        table.clear()
        entries = result.get("suppressions") or []
        for s in entries:
            table.add_row(as_str(s.get("address"), "-"), as_str(s.get("reason"), "-"),
                          (as_str(s.get("detail"), "") or "")[:40], when(s.get("created_at")),
                          as_str(s.get("created_by"), "-"))
        shown = (f"{num(len(entries))} containing {self.search!r}" if self.search
                 else f"the newest {num(len(entries))}")
        info.update(f"suppression list: {num(health.get('suppressions'))} addresses, {shown}"
                    " below the latest bounces and complaints (/ searches, U unsuppresses)")
