"""Screen 3, Failures: failed rows grouped by error."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Label

from mailroom.monitor.ledger_source import LedgerSource, LedgerUnavailable
from mailroom.monitor.model import as_int, as_str
from mailroom.monitor.panes.base import LedgerPane
from mailroom.monitor.widgets import num, when

__all__ = ["FailuresPane"]


class FailuresPane(LedgerPane):
    """Failure groups: error, count, first and last seen, a sample address."""

    DEFAULT_CSS = """
    FailuresPane DataTable { height: 1fr; }
    FailuresPane Label { padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Label("failures: not loaded yet", id="failures-info")
        table: DataTable[Any] = DataTable(id="failure-groups", cursor_type="row", zebra_stripes=True)
        table.add_columns("error", "count", "first seen", "last seen", "sample")
        yield table
        self.groups: list[dict[str, Any]] = []

    def selected_error(self) -> str | None:
        """The error text of the group under the cursor, or None."""
        table = self.query_one("#failure-groups", DataTable)
        if not self.groups or not 0 <= table.cursor_row < len(self.groups):
            return None
        return as_str(self.groups[table.cursor_row].get("error"), limit=10000)

    def no_ledger(self) -> None:
        self.query_one("#failures-info", Label).update("failures: MAILROOM_DATABASE_URL is not set")

    def queries(self, ledger: LedgerSource) -> None:
        self.fetch("ledger-failures", LedgerSource.failure_groups, self._show)

    def _show(self, result: list[dict[str, Any]] | LedgerUnavailable) -> None:
        info = self.query_one("#failures-info", Label)
        if isinstance(result, LedgerUnavailable):
            info.update(Text(f"ledger unavailable: {result}", style="bold red"))
            return
        groups = [g for g in result if isinstance(g, dict)] if isinstance(result, list) else []
        table = self.query_one("#failure-groups", DataTable)
        row = table.cursor_row
        table.clear()
        self.groups = groups
        for g in groups:
            table.add_row(
                (as_str(g.get("error"), "(none)") or "")[:70], num(as_int(g.get("count"))),
                when(g.get("first_seen")), when(g.get("last_seen")),
                (as_str(g.get("sample"), "") or "")[:40],
            )
        if groups:
            table.move_cursor(row=min(row, len(groups) - 1), animate=False)
        total = sum(as_int(g.get("count"), 0) or 0 for g in groups)
        info.update(f"{len(groups)} failure groups, {num(total)} failed rows"
                    "   R retry the group, X skip its queued rows (with --operate)")
