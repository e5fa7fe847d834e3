"""Screen 2, Ledger: counts by status x action, and `/` to look an address up."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.widgets import DataTable, Input, Label

from mailroom.monitor.ledger_source import LedgerSource, LedgerUnavailable
from mailroom.monitor.model import as_float, as_int, as_str
from mailroom.monitor.panes.base import LedgerPane
from mailroom.monitor.widgets import age, num, when
from mailroom.vocabulary import ACTION_NAMES, DELIVERY_STATUSES, DeliveryStatus

__all__ = ["LedgerCountsPane"]

DELIVERY_COLUMNS = ("token", "action", "status", "attempts", "created", "claimed",
                    "next attempt", "sent", "MessageId", "last error")


class LedgerCountsPane(LedgerPane):
    """The ledger's counts, and every delivery of one address."""

    DEFAULT_CSS = """
    LedgerCountsPane #counts { height: auto; max-height: 10; }
    LedgerCountsPane #search { display: none; }
    LedgerCountsPane #search.shown { display: block; }
    LedgerCountsPane #deliveries { height: 1fr; }
    LedgerCountsPane Label { padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Label("ledger: not loaded yet", id="ledger-info")
        counts: DataTable[Any] = DataTable(id="counts", cursor_type="none")
        counts.add_columns("status", *ACTION_NAMES, "total")
        yield counts
        yield Input(placeholder="address to look up (Enter), Esc to close", id="search")
        yield Label("press / to look up an address: did jane get her email?", id="search-info")
        table: DataTable[Any] = DataTable(id="deliveries", cursor_type="row", zebra_stripes=True)
        table.add_columns(*DELIVERY_COLUMNS)
        yield table
        self.email: str | None = None

    # -- counts

    def no_ledger(self) -> None:
        self.query_one("#ledger-info", Label).update(
            "ledger: MAILROOM_DATABASE_URL is not set (live screens only)")

    def queries(self, ledger: LedgerSource) -> None:
        """The counts, and the current lookup again."""
        self.fetch("ledger-counts", LedgerSource.counts, self._show_counts)
        if self.email:
            self._search(self.email)

    def _show_counts(self, result: dict[str, Any] | LedgerUnavailable) -> None:
        info = self.query_one("#ledger-info", Label)
        if isinstance(result, LedgerUnavailable):
            info.update(Text(f"ledger unavailable: {result}", style="bold red"))
            return
        result = result if isinstance(result, dict) else {}
        by = result.get("by_status_action")
        by = by if isinstance(by, dict) else {}
        table = self.query_one("#counts", DataTable)
        table.clear()
        for status in DELIVERY_STATUSES:
            row = by.get(status)
            row = row if isinstance(row, dict) else {}
            values = [as_int(row.get(action), 0) or 0 for action in ACTION_NAMES]
            table.add_row(status, *map(num, values), num(sum(values)))
        info.update(
            f"queue {self.queue}   oldest queued {age(as_float(result.get('oldest_queued_s')))}"
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
        if self.ledger is None:
            self.notify("no database: set MAILROOM_DATABASE_URL", severity="warning")
            return
        self.query_one("#search-info", Label).update(f"looking up {email} ...")
        self._search(email)

    def _search(self, email: str) -> None:
        self.fetch("ledger-search", lambda ledger: ledger.deliveries(email),
                   lambda result: self._show_deliveries(email, result))

    def _show_deliveries(self, email: str, result: list[dict[str, Any]] | LedgerUnavailable) -> None:
        info = self.query_one("#search-info", Label)
        if isinstance(result, LedgerUnavailable):
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
        sent = sum(1 for r in rows if r.get("status") in (DeliveryStatus.SENT, DeliveryStatus.EMITTED))
        info.update(f"{email}: {len(rows)} deliveries, {sent} sent"
                    + ("" if rows else " (no delivery for this address)"))
