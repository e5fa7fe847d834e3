"""Screen 4, Processes: the supervisor's workers (live) and the fleet (from the ledger)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Label

from mailroom.monitor.ledger_source import LedgerUnavailable
from mailroom.monitor.model import MonitorState, as_float, as_int, as_str
from mailroom.monitor.widgets import age, num, when

if TYPE_CHECKING:
    from mailroom.monitor.app import MonitorApp

__all__ = ["ProcessesPane"]


class ProcessesPane(Vertical):
    """Processes of this supervisor, then every consumer of the queue on any host."""

    DEFAULT_CSS = """
    ProcessesPane #workers { height: auto; max-height: 8; }
    ProcessesPane #fleet { height: 1fr; }
    ProcessesPane Label { padding: 0 1; text-style: bold; }
    """

    app: MonitorApp

    def compose(self) -> ComposeResult:
        yield Label("processes (this supervisor)", id="workers-info")
        workers: DataTable[Any] = DataTable(id="workers", cursor_type="row")
        workers.add_columns("process", "pid", "state", "uptime", "restarts", "last heartbeat", "RSS")
        yield workers
        yield Label("fleet: consumers of the queue on every host", id="fleet-info")
        fleet: DataTable[Any] = DataTable(id="fleet", cursor_type="row", zebra_stripes=True)
        fleet.add_columns("host", "pid", "started", "last seen", "batches", "rows", "status")
        yield fleet

    def render_from(self, state: MonitorState) -> None:
        """Show the workers the live feed knows."""
        table = self.query_one("#workers", DataTable)
        rows = []
        for w in sorted(state.workers.values(), key=lambda w: w.name):
            rss = f"{w.rss / 1048576:.0f} MiB" if w.rss else "-"
            now = time.time()
            uptime = "-" if w.started is None else age(now - w.started)
            beat = "-" if w.last_heartbeat is None else age(now - w.last_heartbeat) + " ago"
            rows.append((w.name, "-" if w.pid is None else str(w.pid), w.state, uptime,
                         num(w.restarts), beat, rss))
        if rows != getattr(self, "_rows", None):
            self._rows = rows
            table.clear()
            for row in rows:
                table.add_row(*row)

    def load(self) -> None:
        """Refresh the fleet from the ledger, off the UI thread."""
        if self.app.ledger is None:
            self.query_one("#fleet-info", Label).update("fleet: MAILROOM_DATABASE_URL is not set")
            return
        self._load()

    @work(thread=True, exclusive=True, group="ledger-fleet")
    def _load(self) -> None:
        try:
            result: Any = self.app.ledger.consumers()  # type: ignore[union-attr]
        except LedgerUnavailable as exc:
            result = exc
        self.app.call_from_thread(self._show, result)

    def _show(self, result: Any) -> None:
        if not self.is_attached:
            return  # the result of a thread worker arrived as the app closed
        info = self.query_one("#fleet-info", Label)
        if isinstance(result, Exception):
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
        info.update(f"fleet: {live} live consumers of {self.app.queue}"
                    f" ({len(rows) - live} stale) on {len({r.get('host') for r in rows})} hosts")
