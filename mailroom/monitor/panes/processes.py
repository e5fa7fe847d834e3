"""Screen 4, Processes: the supervisor's workers (live) and the fleet (from the ledger)."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Label

from mailroom.monitor.ledger_source import LedgerSource, LedgerUnavailable
from mailroom.monitor.model import SUPERVISOR, MonitorState, as_float, as_int, as_str
from mailroom.monitor.panes.base import LedgerPane
from mailroom.monitor.widgets import age, num, when

__all__ = ["ProcessesPane"]


class ProcessesPane(LedgerPane):
    """Processes of this supervisor, then every consumer of the queue on any host."""

    DEFAULT_CSS = """
    ProcessesPane #workers { height: auto; max-height: 8; }
    ProcessesPane #fleet { height: 1fr; }
    ProcessesPane Label { padding: 0 1; text-style: bold; }
    """

    def compose(self) -> ComposeResult:
        yield Label("processes (this supervisor)", id="workers-info")
        workers: DataTable[Any] = DataTable(id="workers", cursor_type="row")
        workers.add_columns("process", "pid", "state", "uptime", "restarts", "last heartbeat", "RSS")
        yield workers
        yield Label("fleet: consumers of the queue on every host", id="fleet-info")
        fleet: DataTable[Any] = DataTable(id="fleet", cursor_type="row", zebra_stripes=True)
        fleet.add_columns("host", "pid", "started", "last seen", "batches", "rows", "status")
        yield fleet
        self._rows: list[tuple[str, ...]] | None = None

    def render_from(self, state: MonitorState) -> None:
        """Show the workers the live feed knows."""
        table = self.query_one("#workers", DataTable)
        rows: list[tuple[str, ...]] = []
        # The supervisor first (unless its snapshot already listed it among the workers).
        known = [state.supervisor] if state.supervisor.pid is not None and SUPERVISOR not in state.workers else []
        now = time.time()
        for w in known + sorted(state.workers.values(), key=lambda w: (w.name != SUPERVISOR, w.name)):
            rss = f"{w.rss / 1048576:.0f} MiB" if w.rss else "-"
            uptime = "-" if w.started is None else age(now - w.started)
            beat = "-" if w.last_heartbeat is None else age(now - w.last_heartbeat) + " ago"
            rows.append((w.name, "-" if w.pid is None else str(w.pid), w.state, uptime,
                         num(w.restarts), beat, rss))
        if rows != self._rows:
            self._rows = rows
            table.clear()
            for row in rows:
                table.add_row(*row)

    def no_ledger(self) -> None:
        self.query_one("#fleet-info", Label).update("fleet: MAILROOM_DATABASE_URL is not set")

    def queries(self, ledger: LedgerSource) -> None:
        self.fetch("ledger-fleet", LedgerSource.consumers, self._show)

    def _show(self, result: list[dict[str, Any]] | LedgerUnavailable) -> None:
        info = self.query_one("#fleet-info", Label)
        if isinstance(result, LedgerUnavailable):
            info.update(Text(f"fleet: ledger unavailable: {result}", style="bold red"))
            return
        rows = [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []
        table = self.query_one("#fleet", DataTable)
        table.clear()
        for r in rows:
            stale = bool(r.get("stale"))
            table.add_row(
                as_str(r.get("host"), "-"), as_str(as_int(r.get("pid")), "-"), when(r.get("started_at")),
                age(as_float(r.get("seen_s_ago"))) + " ago", num(as_int(r.get("batches"))),
                num(as_int(r.get("rows"))),
                Text("stale", style="bold red") if stale else Text("live", style="green"),
            )
        live = sum(1 for r in rows if not r.get("stale"))
        info.update(f"fleet: {live} live consumers of {self.queue}"
                    f" ({len(rows) - live} stale) on {len({r.get('host') for r in rows})} hosts")
