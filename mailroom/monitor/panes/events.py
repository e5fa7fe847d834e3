"""Screen 5, Events: the live event log, audit lines included, filtered by type."""

from __future__ import annotations

from collections.abc import Iterable

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Label, Log

from mailroom.monitor.model import EventLine, MonitorState

__all__ = ["EventsPane"]

#: Hidden unless the filter asks for it: one a second would bury everything else.
TICK = "tick"


class EventsPane(Vertical):
    """Every event the socket delivered, newest at the bottom (the last 1000).

    The filter box (``/`` on this screen) keeps the events whose type contains what
    is typed (``batch``, ``worker.``, ``audit``); empty, it keeps all but the ticks.
    """

    DEFAULT_CSS = """
    EventsPane Log { height: 1fr; }
    EventsPane Label { padding: 0 1; }
    EventsPane #events-filter { height: 1; border: none; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Label("events", id="events-info")
        yield Input(placeholder="/ filter by type (batch, worker., audit, tick); empty: all but ticks",
                    id="events-filter")
        yield Log(id="event-log", max_lines=1000, auto_scroll=True)
        self._written = 0
        self._state: MonitorState | None = None

    @property
    def wanted(self) -> str:
        """The filter as typed (stripped, lower case)."""
        return self.query_one("#events-filter", Input).value.strip().lower()

    def shows(self, event: str) -> bool:
        """Whether an event of this type passes the filter."""
        wanted = self.wanted
        return wanted in event.lower() if wanted else event != TICK

    def load(self) -> None:
        """Nothing from the ledger: this pane is all live feed."""

    def open_filter(self) -> None:
        """`/` on this screen: type a filter."""
        self.query_one("#events-filter", Input).focus()

    def render_from(self, state: MonitorState) -> None:
        """Append the events not written yet (those the filter keeps)."""
        self._state = state
        new = state.event_count - self._written
        if new <= 0:
            return
        self._write(list(state.events)[-min(new, len(state.events)):])
        self._written = state.event_count
        self.query_one("#events-info", Label).update(
            f"events: {state.event_count} received, {state.ignored} malformed ignored"
            + ("" if self.wanted else "; ticks hidden (/ tick shows them)"))

    @on(Input.Changed, "#events-filter")
    def _refilter(self) -> None:
        """A new filter: the kept events again, from the oldest held."""
        self.query_one("#event-log", Log).clear()
        if self._state is not None:
            self._write(self._state.events)

    def _write(self, events: Iterable[EventLine]) -> None:
        self.query_one("#event-log", Log).write_lines(
            f"{e.ts[:19]:19} {e.seq if e.seq is not None else '-':>7} {e.event:18} {e.text}"
            for e in events if self.shows(e.event))
