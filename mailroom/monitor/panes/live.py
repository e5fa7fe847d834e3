"""Screen 1, Live: big numbers, 5-minute sparklines and the batches table."""

from __future__ import annotations

import time
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, Sparkline
from textual.widgets.data_table import RowDoesNotExist

from mailroom.monitor.model import Batch, MonitorState
from mailroom.monitor.widgets import BigNumber, age, num

__all__ = ["LivePane"]

COLUMNS = (
    ("batch", "batch"), ("state", "state"), ("rows", "rows"), ("act/rec", "mix"),
    ("sent", "sent"), ("failed", "failed"), ("retry", "retry"), ("skipped", "skipped"),
    ("age", "age"), ("SES ms", "ms"), ("first error", "error"),
)
STATE_STYLE = {"failed": "bold red", "partial": "yellow", "done": "green", "sending": "cyan"}


def _cells(batch: Batch, now: float) -> tuple[Any, ...]:
    from rich.text import Text

    return (
        batch.id, Text(batch.state, style=STATE_STYLE.get(batch.state, "")), batch.rows,
        f"{batch.activation}/{batch.recovery}", batch.sent, batch.failed, batch.retry,
        batch.skipped, age(now - batch.first_seen), num(batch.ms),
        (batch.error or "")[:60],
    )


#: Rows evicted in one repaint past which the table is rebuilt instead.
REBUILD_AFTER = 20

class LivePane(Vertical):
    """The live view of what the supervisor routes."""

    DEFAULT_CSS = """
    LivePane #bignums { height: 5; }
    LivePane #sparks { height: 4; }
    LivePane #sparks Vertical { width: 1fr; padding: 0 1; }
    LivePane Sparkline { height: 2; }
    LivePane DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal(id="bignums"):
            yield BigNumber("queued", id="big-queued")
            yield BigNumber("in flight", id="big-inflight")
            yield BigNumber("sent/min", id="big-sent")
            yield BigNumber("failed, 15 min", id="big-failed")
        with Horizontal(id="sparks"):
            with Vertical():
                yield Label("sent/s, 5 min", id="spark-sent-label")
                yield Sparkline([], id="spark-sent")
            with Vertical():
                yield Label("failed/s, 5 min", id="spark-failed-label")
                yield Sparkline([], id="spark-failed")
        table: DataTable[Any] = DataTable(id="batches", cursor_type="row", zebra_stripes=True)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        yield table
        # Cells as last shown, per batch: only changed cells are rewritten.
        self._shown: dict[str, tuple[Any, ...]] = {}

    @property
    def table(self) -> DataTable[Any]:
        """The batches table."""
        return self.query_one("#batches", DataTable)

    def selected_batch(self) -> str | None:
        """The id of the batch under the cursor, or None."""
        table = self.table
        if not table.row_count:
            return None
        try:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except (RowDoesNotExist, Exception):
            return None

    def render_from(self, state: MonitorState) -> None:
        """Bring the numbers, sparklines and table up to ``state``."""
        tick = state.tick
        self.query_one("#big-queued", BigNumber).show(num(tick.queue_depth))
        in_flight = tick.in_flight
        if in_flight is None:
            in_flight = sum(1 for b in state.batches.values() if b.state in ("claimed", "sending"))
        self.query_one("#big-inflight", BigNumber).show(num(in_flight))
        self.query_one("#big-sent", BigNumber).show(num(state.sent_per_min))
        self.query_one("#big-failed", BigNumber).show(num(state.failed_last_15min()))
        self.query_one("#spark-sent", Sparkline).data = list(state.sent_history) or [0.0]
        self.query_one("#spark-failed", Sparkline).data = list(state.failed_history) or [0.0]
        self._sync_table(state)

    def _sync_table(self, state: MonitorState) -> None:
        table = self.table
        selected = self.selected_batch()
        # Following the tail (cursor on the last row) keeps following it.
        follow = table.row_count == 0 or table.cursor_row >= table.row_count - 1
        now = time.monotonic()
        gone = [key for key in self._shown if key not in state.batches]
        if len(gone) > REBUILD_AFTER:
            # DataTable.remove_row costs O(rows) each: at full speed a repaint evicts
            # dozens, and removing them one by one took most of the monitor's CPU.
            # Starting over costs one add_row per row kept.
            table.clear()
            self._shown.clear()
            gone = []
        for key in gone:
            del self._shown[key]
            try:
                table.remove_row(key)
            except RowDoesNotExist:
                pass
        for key, batch in state.batches.items():
            cells = _cells(batch, now)
            before = self._shown.get(key)
            if before is None:
                table.add_row(*cells, key=key)
            elif before != cells:
                for (_, column), old, new in zip(COLUMNS, before, cells):
                    if old != new:
                        table.update_cell(key, column, new)
            self._shown[key] = cells
        if follow and table.row_count:
            table.move_cursor(row=table.row_count - 1, animate=False)
        elif selected is not None and selected in self._shown:
            # Rows above may have been evicted: keep the cursor on the same batch.
            index = table.get_row_index(selected)
            if index != table.cursor_row:
                table.move_cursor(row=index, animate=False)
