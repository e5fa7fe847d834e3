"""Screen 2, Ledger: counts by status x action, and `/` to look an address up."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Label

from mailroom.monitor.ledger_source import LedgerUnavailable
from mailroom.monitor.model import as_float, as_int, as_str
from mailroom.monitor.widgets import age, num, when

if TYPE_CHECKING:
    from mailroom.monitor.app import MonitorApp

__all__ = ["LedgerPane"]

STATUSES = ("queued", "claimed", "sent", "emitted", "failed", "skipped")
ACTIONS = ("activation", "password_recovery")
DELIVERY_COLUMNS = ("token", "action", "status", "attempts", "created", "claimed",
                    "next attempt", "sent", "MessageId", "last error")


class LedgerPane(Vertical):
    """The ledger's counts, and every delivery of one address."""

    DEFAULT_CSS = """
    LedgerPane #counts { height: auto; max-height: 10; }
    LedgerPane #search { display: none; }
    LedgerPane #search.shown { display: block; }
    LedgerPane #deliveries { height: 1fr; }
    LedgerPane Label { padding: 0 1; }
    """

    app: MonitorApp

    def compose(self) -> ComposeResult:
        yield Label("ledger: not loaded yet", id="ledger-info")
        counts: DataTable[Any] = DataTable(id="counts", cursor_type="none")
        counts.add_columns("status", *ACTIONS, "total")
        yield counts
        yield Input(placeholder="address to look up (Enter), Esc to close", id="search")
        yield Label("press / to look up an address: did jane get her email?", id="search-info")
        table: DataTable[Any] = DataTable(id="deliveries", cursor_type="row", zebra_stripes=True)
        table.add_columns(*DELIVERY_COLUMNS)
        yield table
        self.email: str | None = None

    # -- counts

    def load(self) -> None:
        """Refresh the counts (and the current search) from the ledger, off the UI thread."""
        if self.app.ledger is None:
            self.query_one("#ledger-info", Label).update(
                "ledger: MAILROOM_DATABASE_URL is not set (live screens only)")
            return
        self._load_counts()
        if self.email:
            self._search(self.email)

    @work(thread=True, exclusive=True, group="ledger-counts")
    def _load_counts(self) -> None:
        try:
            result: Any = self.app.ledger.counts()  # type: ignore[union-attr]
        except LedgerUnavailable as exc:
            result = exc
        self.app.call_from_thread(self._show_counts, result)

    def _show_counts(self, result: Any) -> None:
        if not self.is_attached:
            return  # the result of a thread worker arrived as the app closed
        info = self.query_one("#ledger-info", Label)
        if isinstance(result, Exception):
            info.update(Text(f"ledger unavailable: {result}", style="bold red"))
            return
        result = result if isinstance(result, dict) else {}
        by = result.get("by_status_action")
        by = by if isinstance(by, dict) else {}
        table = self.query_one("#counts", DataTable)
        table.clear()
        for status in STATUSES:
            row = by.get(status)
            row = row if isinstance(row, dict) else {}
            values = [as_int(row.get(action), 0) or 0 for action in ACTIONS]
            table.add_row(status, *map(num, values), num(sum(values)))
        info.update(
            f"queue {self.app.queue}   oldest queued {age(as_float(result.get('oldest_queued_s')))}"
            f"   expired leases {num(as_int(result.get('expired_leases')))}")

    # -- search

    def open_search(self) -> None:
        """Show the address box and focus it."""
        box = self.query_one("#search", Input)
        box.add_class("shown")
        box.focus()

    def close_search(self) -> bool:
        """Hide the address box; False when it was not open."""
        box = self.query_one("#search", Input)
        if not box.has_class("shown"):
            return False
        box.remove_class("shown")
        self.query_one("#deliveries", DataTable).focus()
        return True

    @on(Input.Submitted, "#search")
    def _submitted(self, event: Input.Submitted) -> None:
        email = event.value.strip()
        self.close_search()
        if not email:
            return
        self.email = email
        if self.app.ledger is None:
            self.app.notify("no database: set MAILROOM_DATABASE_URL", severity="warning")
            return
        self.query_one("#search-info", Label).update(f"looking up {email} ...")
        self._search(email)

    @work(thread=True, exclusive=True, group="ledger-search")
    def _search(self, email: str) -> None:
        try:
            result: Any = self.app.ledger.deliveries(email)  # type: ignore[union-attr]
        except LedgerUnavailable as exc:
            result = exc
        self.app.call_from_thread(self._show_deliveries, email, result)

    def _show_deliveries(self, email: str, result: Any) -> None:
        if not self.is_attached:
            return  # the result of a thread worker arrived as the app closed
        info = self.query_one("#search-info", Label)
        if isinstance(result, Exception):
            info.update(Text(f"{email}: ledger unavailable: {result}", style="bold red"))
            return
        rows = [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []
        table = self.query_one("#deliveries", DataTable)
        table.clear()
        for r in rows:
            table.add_row(
                as_str(r.get("token"), "-"), as_str(r.get("action"), "-"),
                as_str(r.get("status"), "-"), num(as_int(r.get("attempts"))),
                when(r.get("created_at")), when(r.get("claimed_at")),
                when(r.get("next_attempt_at")), when(r.get("sent_at")),
                as_str(r.get("message_id"), "") or "", (as_str(r.get("last_error"), "") or "")[:80],
            )
        sent = sum(1 for r in rows if r.get("status") in ("sent", "emitted"))
        info.update(f"{email}: {len(rows)} deliveries, {sent} sent"
                    + ("" if rows else " (no delivery for this address)"))
