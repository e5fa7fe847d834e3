"""Screen 1, Live: big numbers, 5-minute sparklines and the batches table."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label

from mailroom.monitor.batch_table import BatchTable, Column
from mailroom.monitor.model import Batch, MonitorState
from mailroom.monitor.widgets import BigNumber, History, age, num
from mailroom.vocabulary import BatchState

__all__ = ["LivePane"]

COLUMNS = (
    Column("batch", "batch"), Column("state", "state"), Column("rows", "rows", right=True),
    Column("act/rec", "mix", right=True), Column("sent", "sent", right=True),
    Column("failed", "failed", right=True), Column("retry", "retry", right=True),
    Column("skipped", "skipped", right=True), Column("age", "age", right=True),
    Column("SES ms", "ms", right=True), Column("first error", "error"),
)
STATE_STYLE: dict[str, str] = {BatchState.FAILED: "bold red", BatchState.PARTIAL: "yellow", BatchState.DONE: "green",
               BatchState.SENDING: "cyan", BatchState.RELEASED: "dim"}


def _cells(batch: Batch, now: float) -> tuple[str, ...]:
    return (
        batch.id, batch.state, str(batch.rows), f"{batch.activation}/{batch.recovery}",
        str(batch.sent), str(batch.failed), str(batch.retry), str(batch.skipped),
        age(now - (batch.heard if batch.claimed is None else batch.claimed)), num(batch.ms), (batch.error or "")[:60],
    )


class LivePane(Vertical):
    """The live view of what the supervisor routes."""

    DEFAULT_CSS = """
    LivePane #bignums { height: 5; }
    LivePane #sparks { height: 4; }
    LivePane #sparks Vertical { width: 1fr; padding: 0 1; }
    LivePane History { height: 2; }
    LivePane BatchTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        self._captions: dict[str, str] = {}
        with Horizontal(id="bignums"):
            yield BigNumber("queued", id="big-queued")
            yield BigNumber("in flight", id="big-inflight")
            yield BigNumber("sent/min", id="big-sent")
            yield BigNumber("failed, 15 min", id="big-failed")
        with Horizontal(id="sparks"):
            with Vertical():
                yield Label("sent/s, 5 min", id="spark-sent-label")
                yield History(id="spark-sent")
            with Vertical():
                yield Label("failed/s, 5 min", id="spark-failed-label")
                yield History(id="spark-failed")
        yield BatchTable(COLUMNS, styles={"state": STATE_STYLE}, id="batches")

    @property
    def table(self) -> BatchTable:
        """The batches table."""
        return self.query_one("#batches", BatchTable)

    def selected_batch(self) -> str | None:
        """The id of the batch under the cursor, or None."""
        return self.table.cursor_key

    def render_from(self, state: MonitorState) -> None:
        """Bring the numbers, sparklines and table up to ``state``."""
        tick = state.tick
        self.query_one("#big-queued", BigNumber).show(num(tick.queue_depth))
        in_flight = tick.in_flight
        if in_flight is None:
            in_flight = sum(1 for b in state.batches.values() if b.state in (BatchState.CLAIMED, BatchState.SENDING))
        self.query_one("#big-inflight", BigNumber).show(num(in_flight))
        self.query_one("#big-sent", BigNumber).show(num(state.sent_per_min))
        self.query_one("#big-failed", BigNumber).show(num(state.failed_last_15min()))
        for name, history in (("sent", state.sent_history), ("failed", state.failed_history)):
            peak = self.query_one(f"#spark-{name}", History).show(list(history))
            caption = f"{name}/s, 5 min" + (f", 0 to {num(peak, 1 if peak < 10 else 0)}" if peak else "")
            if self._captions.get(name) != caption:
                self._captions[name] = caption
                self.query_one(f"#spark-{name}-label", Label).update(caption)
        self._sync_table(state)

    def load(self) -> None:
        """Nothing from the ledger: this pane is all live feed."""

    def _sync_table(self, state: MonitorState) -> None:
        table = self.table
        selected = self.selected_batch()
        # Following the tail (cursor on the last row) keeps following it.
        follow = table.row_count == 0 or table.cursor_row >= table.row_count - 1
        now = time.time()  # ages count from the claim's wall-clock time
        # A copy: while the screen is frozen the state keeps evicting batches, and
        # the table may still draw any of the rows it was given (scrolling).
        batches = dict(state.batches)
        table.set_rows(list(batches), lambda key: _cells(batches[key], now))
        if follow and table.row_count:
            table.move_cursor(row=table.row_count - 1)
        elif selected is not None and selected in batches:
            # Rows above may have been evicted: keep the cursor on the same batch.
            table.move_cursor(row=table.get_row_index(selected))
