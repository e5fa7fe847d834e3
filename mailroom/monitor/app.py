"""The Textual application: header, six panes, the coalescing flush, the key map."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from textual import events
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import ContentSwitcher, DataTable, Static

from mailroom.config import Settings
from mailroom.monitor.actions import OPERATOR_ACTIONS, OperatorActions
from mailroom.monitor.batch_table import BatchTable
from mailroom.monitor.dialogs import BatchDetail, HelpScreen
from mailroom.monitor.feed import ClientFactory, ControlFeed, default_client_factory
from mailroom.monitor.ledger_source import LedgerSource
from mailroom.monitor.model import MonitorState
from mailroom.monitor.panes.base import Pane
from mailroom.monitor.panes.deliverability import DeliverabilityPane
from mailroom.monitor.panes.events import EventsPane
from mailroom.monitor.panes.failures import FailuresPane
from mailroom.monitor.panes.ledger import LedgerCountsPane
from mailroom.monitor.panes.live import LivePane
from mailroom.monitor.panes.processes import ProcessesPane
from mailroom.monitor.widgets import Banner, HeaderBar, KeyFooter

log = logging.getLogger("mailroom.monitor")

__all__ = ["MIN_COLUMNS", "MIN_ROWS", "MonitorApp", "PANES"]

#: Pane ids in key order (`1`-`6`) with their titles.
PANES = (("live", "Live"), ("ledger", "Ledger"), ("failures", "Failures"),
         ("processes", "Processes"), ("events", "Events"), ("deliverability", "Deliverability"))
#: At most this many screen refreshes a second (OPERATIONS.md 4).
FLUSH_INTERVAL_S = 0.25
#: The smallest terminal the screens are laid out for (OPERATIONS.md 4: usable at 80x24).
MIN_COLUMNS, MIN_ROWS = 80, 20
#: Ledger screens re-query this often while shown.
LEDGER_REFRESH_S = 5.0


class _MainScreen(Screen[None]):
    """The app's screen; it hears of every resize (the app itself only of the first)."""

    def on_resize(self, event: events.Resize) -> None:
        app = self.app
        if isinstance(app, MonitorApp):
            app.refit()


class MonitorApp(OperatorActions):
    """``mailroom monitor``.

    Args:
        socket_path: the supervisor's control socket, or None for the ledger screens only.
        database_url: the ledger (``MAILROOM_DATABASE_URL``), or None for the live screens only.
        queue: the queue (``jobs.job_type``) whose ledger is shown.
        operate: enable the state-changing keys (still refused to a viewer).
        client_factory: builds the async control client for a path (tests pass their own).
    """

    TITLE = "mailroom monitor"
    CSS = """
    ContentSwitcher { height: 1fr; }
    #too-small { display: none; height: 1; }
    Screen.-too-small > * { display: none; }
    Screen.-too-small > #too-small { display: block; }
    """
    BINDINGS = [
        *(Binding(str(i), f"show('{pane}')", title, key_display=str(i))
          for i, (pane, title) in enumerate(PANES, 1)),
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("f", "freeze", "Freeze"),
        Binding("slash", "search", "Search", key_display="/"),
        # Not "back": that name is Textual's own App.action_back (pop a screen).
        Binding("escape", "close_search", show=False),
        Binding("j", "cursor('down')", show=False),
        Binding("k", "cursor('up')", show=False),
        # Each state-changing key twice: the real action (shown, disabled unless
        # allowed) and, behind it, a hidden refusal that only runs when the first
        # is disabled, so a refused key says why instead of doing nothing.
        *(b for key, action, title in OPERATOR_ACTIONS for b in (
            Binding(key, action, title),
            Binding(key, f"refuse('{action}')", show=False))),
    ]

    def __init__(self, socket_path: str | None, database_url: str | None, *,
                 queue: str = Settings.queue_name, channel: str = Settings.channel_name, operate: bool = False,
                 client_factory: ClientFactory | None = None) -> None:
        super().__init__()
        self.queue = queue
        self.operate = operate
        self.state = MonitorState()
        self.feed = (ControlFeed(socket_path, client_factory or default_client_factory)
                     if socket_path else None)
        self.ledger = LedgerSource(database_url, queue, channel) if database_url else None
        self.frozen = False
        self.current = "live"
        #: Flushes that changed something (tests wait on it).
        self.flushes = 0
        self._last_conn: tuple[Any, ...] = ()
        #: The six panes by id, as the app drives them (filled by compose).
        self.panes: dict[str, Pane] = {}

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static(id="too-small")
        yield HeaderBar(id="header")
        yield Banner(id="banner")
        with ContentSwitcher(initial="live"):
            yield from self._build_panes()
        yield KeyFooter()

    def _build_panes(self) -> list[Widget]:
        live, events = LivePane(id="live"), EventsPane(id="events")
        ledger = LedgerCountsPane(self.ledger, self.queue, id="ledger")
        failures = FailuresPane(self.ledger, self.queue, id="failures")
        processes = ProcessesPane(self.ledger, self.queue, id="processes")
        deliverability = DeliverabilityPane(self.ledger, self.queue, id="deliverability")
        # Typed as Pane: each is checked here against what the app calls.
        self.panes = {"live": live, "ledger": ledger, "failures": failures,
                      "processes": processes, "events": events, "deliverability": deliverability}
        return [live, ledger, failures, processes, events, deliverability]

    def on_mount(self) -> None:
        if self.feed is not None:
            self.run_worker(self.feed.run(), name="control-feed", group="feed", exclusive=True)
        elif self.ledger is not None:
            # No supervisor to watch: open on the ledger.
            self.current = "ledger"
            self.query_one(ContentSwitcher).current = "ledger"
        self.set_interval(FLUSH_INTERVAL_S, self._apply_buffered)
        self.set_interval(LEDGER_REFRESH_S, self.reload_ledger)
        self._fit()
        self._render(force=True)
        self.reload_ledger()
        self._focus_table(self.current)

    def get_default_screen(self) -> Screen[Any]:
        return _MainScreen(id="_default")

    def refit(self) -> None:
        """The terminal changed size: the too-small notice, the header's and the footer's words."""
        self._fit()
        self._render(force=True)
        self.query_one(KeyFooter).refresh(recompose=True)

    def _fit(self) -> None:
        """Below the minimum size, one line saying what is needed instead of a cut-off screen."""
        width, height = self.size
        small = width < MIN_COLUMNS or height < MIN_ROWS
        self.screen.set_class(small, "-too-small")
        if small:
            self.query_one("#too-small", Static).update(
                f"mailroom monitor needs {MIN_COLUMNS} columns x {MIN_ROWS} rows; this terminal is {width}x{height}")

    def on_unmount(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    @property
    def role_label(self) -> str:
        """What the header shows as the role."""
        role = self.feed.role if self.feed else None
        if role:
            return role.upper()
        return "NOT CONNECTED" if self.feed else "LEDGER ONLY"

    # ------------------------------------------------------------ the feed

    def _apply_buffered(self) -> None:
        """Apply what the feed buffered, then repaint once (at most 4 times a second)."""
        feed = self.feed
        changed = False
        if feed is not None:
            pending = feed.pending
            while pending:
                kind, payload = pending.popleft()
                changed = True
                try:
                    if kind == "snapshot":
                        self.state.apply_snapshot(payload)
                    else:
                        self.state.apply_event(payload)
                except Exception:  # the model is tolerant; this is the last net
                    self.state.ignored += 1
                    log.exception("monitor: could not apply a %s", kind)
            if self.state.gap and feed.connected:
                self.state.gap = False
                self.run_worker(feed.resync(), group="resync", exclusive=True)
            conn = (feed.connected, feed.error, feed.role)
            if conn != self._last_conn:
                self._last_conn, changed = conn, True
        if changed:
            self._render()

    def _render(self, force: bool = False) -> None:
        try:
            header = self.query_one(HeaderBar)
        except NoMatches:
            # A timer fired while the app closes (or before it composed): the
            # widgets are gone, and the state will not be shown again.
            return
        with self.batch_update():
            header.render_from(self)
            self._banner()
            if not self.frozen or force:
                self._render_pane(self.current)
                self.flushes += 1

    def _banner(self) -> None:
        banner = self.query_one(Banner)
        feed = self.feed
        if self.screen.has_class("-too-small"):
            banner.show(None)  # the one line of the too-small notice is all there is room for
        elif feed is not None and not feed.connected:
            reason = feed.error or "connecting"
            banner.show(f" DISCONNECTED from {feed.path}: {reason} (retrying)")
        elif self.state.tick.ses_paused or self.state.run_state == "ses_paused":
            banner.show(" SES PAUSED SENDING (account-level pause or quota): nothing is sent",
                        warning=True)
        elif self.state.paused_reason and self.state.paused_claims:
            banner.show(f" CLAIMS PAUSED TO PROTECT THE SES ACCOUNT: {self.state.paused_reason}"
                        " (find the cause, then resume claims)", warning=True)
        elif self.state.tick.templates_held:
            held = "; ".join(f"{name}: {reason}" for name, reason in self.state.tick.templates_held)
            banner.show(f" TEMPLATE HELD, its emails stay queued ({held}): mailroom templates push, then SIGHUP",
                        warning=True)
        else:
            banner.show(None)

    def _render_pane(self, pane: str) -> None:
        self.panes[pane].render_from(self.state)

    def reload_ledger(self) -> None:
        """Query the ledger again for the pane shown (a pane with nothing there ignores it)."""
        pane = self.panes.get(self.current)
        if pane is not None and not self.frozen:
            pane.load()  # a pane left by a closing app ignores it

    # ------------------------------------------------------------ keys

    def action_show(self, pane: str) -> None:
        """Switch to one of the six panes."""
        if pane not in dict(PANES):
            return
        self.current = pane
        self.query_one(ContentSwitcher).current = pane
        self._render(force=True)
        self.reload_ledger()
        self._focus_table(pane)

    def _focus_table(self, pane: str) -> None:
        """Give the keyboard to the pane's first table (the events pane has none)."""
        tables = self.query_one(f"#{pane}").query("BatchTable, DataTable")
        first = tables.first() if tables else None
        if first is not None:
            first.focus()

    def action_help(self) -> None:
        """Show the key map."""
        self.push_screen(HelpScreen())

    def action_freeze(self) -> None:
        """Stop (or resume) repainting; the state keeps up underneath."""
        self.frozen = not self.frozen
        self.notify("frozen: press f to resume" if self.frozen else "live again")
        self._render(force=True)

    def action_search(self) -> None:
        """`/`: the type filter on the Events screen, the suppression search on
        Deliverability, else the address lookup of the Ledger pane."""
        if self.current == "events":
            self.query_one(EventsPane).open_filter()
            return
        if self.current == "deliverability":
            self.query_one(DeliverabilityPane).open_search()
            return
        if self.current != "ledger":
            self.action_show("ledger")
        self.query_one(LedgerCountsPane).open_search()

    def action_close_search(self) -> None:
        """Esc on the main screen: close the search box (or leave the events filter)."""
        if self.current == "events":
            self._focus_table("events")
            return
        if self.current == "deliverability":
            self.query_one(DeliverabilityPane).close_search()
            return
        self.query_one(LedgerCountsPane).close_search()

    def action_cursor(self, direction: str) -> None:
        """`j`/`k`: move the cursor of the focused table."""
        table = self.focused
        if isinstance(table, (DataTable, BatchTable)):
            (table.action_cursor_down if direction == "down" else table.action_cursor_up)()

    def on_batch_table_selected(self, event: BatchTable.Selected) -> None:
        """Enter on a batch of the Live table opens its detail."""
        self.push_screen(BatchDetail(event.key, self.feed, self.ledger))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """The command palette: screens, freeze, help, and the operator actions."""
        yield from super().get_system_commands(screen)
        for pane, title in PANES:
            yield SystemCommand(f"Show {title}", f"switch to the {title} screen",
                                lambda pane=pane: self.action_show(pane))
        yield SystemCommand("Look up an address", "the Ledger search", self.action_search)
        yield SystemCommand("Freeze / unfreeze", "stop repainting", self.action_freeze)
        for key, action, title in OPERATOR_ACTIONS:
            yield SystemCommand(f"{title} ({key})", "needs --operate and an operator role",
                                lambda action=action: self.call_later(self.run_action, action))
