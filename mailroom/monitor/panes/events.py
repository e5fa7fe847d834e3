"""Screen 5, Events: the live event log, audit lines included."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Log

from mailroom.monitor.model import MonitorState

__all__ = ["EventsPane"]


class EventsPane(Vertical):
    """Every event the socket delivered, newest at the bottom (the last 1000)."""

    DEFAULT_CSS = """
    EventsPane Log { height: 1fr; }
    EventsPane Label { padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Label("events", id="events-info")
        yield Log(id="event-log", max_lines=1000, auto_scroll=True)
        self._written = 0

    def load(self) -> None:
        """Nothing from the ledger: this pane is all live feed."""

    def render_from(self, state: MonitorState) -> None:
        """Append the events not written yet."""
        new = state.event_count - self._written
        if new <= 0:
            return
        log = self.query_one("#event-log", Log)
        lines = list(state.events)[-min(new, len(state.events)):]
        log.write_lines(f"{e.ts[:19]:19} {e.seq if e.seq is not None else '-':>7} "
                        f"{e.event:18} {e.text}" for e in lines)
        self._written = state.event_count
        self.query_one("#events-info", Label).update(
            f"events: {state.event_count} received, {state.ignored} malformed ignored")
