"""What the app asks of a pane, and the base of the panes the ledger feeds.

The app holds its six panes as :class:`Pane` and calls the two methods on
whichever is shown: :meth:`Pane.render_from` after a flush of the live feed,
:meth:`Pane.load` when the pane is shown and every few seconds after.  Panes get
what they need (the ledger, the queue's name) when they are built, so none of them
imports the app.

Three panes (the ledger's counts and lookup, the failures, the fleet) read the
ledger the same way: a query in a thread (psycopg blocks; the UI must not), then
the result, or the :class:`LedgerUnavailable` that stands for it, shown on the UI
thread, unless the pane went away meanwhile.  :class:`LedgerPane` is that way, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from textual.containers import Vertical

from mailroom.monitor.ledger_source import LedgerSource, LedgerUnavailable
from mailroom.monitor.model import MonitorState

__all__ = ["LedgerPane", "Pane"]

T = TypeVar("T")


class Pane(Protocol):
    """One of the app's screens, as the app drives it."""

    def render_from(self, state: MonitorState) -> None:
        """Show what the live feed knows now (at most four times a second)."""

    def load(self) -> None:
        """Query the ledger again, off the UI thread (shown, then every few seconds)."""


class LedgerPane(Vertical):
    """A pane whose numbers come from the ledger: :meth:`fetch` runs a query and shows it."""

    def __init__(self, ledger: LedgerSource | None, queue: str, *, id: str) -> None:  # noqa: A002 - Textual's keyword
        super().__init__(id=id)
        self.ledger = ledger
        self.queue = queue

    def render_from(self, state: MonitorState) -> None:
        """Nothing from the live feed (a pane that shows some overrides this)."""

    def load(self) -> None:
        """Run the pane's queries, or say there is no database to run them on."""
        if not self.is_attached:
            return  # a timer fired as the app closed
        if self.ledger is None:
            self.no_ledger()
            return
        self.queries(self.ledger)

    def no_ledger(self) -> None:
        """Say that MAILROOM_DATABASE_URL is not set (where the pane shows its state)."""
        raise NotImplementedError

    def queries(self, ledger: LedgerSource) -> None:
        """Start the pane's :meth:`fetch` calls."""
        raise NotImplementedError

    def fetch(self, group: str, query: Callable[[LedgerSource], T],
              show: Callable[[T | LedgerUnavailable], None]) -> None:
        """Run ``query`` in a thread, then ``show`` its result on the UI thread.

        One query per ``group`` at a time: a newer one cancels the older (a lookup
        typed while the previous one still runs).
        """
        ledger = self.ledger
        if ledger is None:
            return

        def run() -> None:
            result: T | LedgerUnavailable
            try:
                result = query(ledger)
            except LedgerUnavailable as exc:
                result = exc
            self.app.call_from_thread(self._shown, show, result)

        self.run_worker(run, name=group, group=group, exclusive=True, thread=True)

    def _shown(self, show: Callable[[T | LedgerUnavailable], None], result: T | LedgerUnavailable) -> None:
        if self.is_attached:  # else the result of the thread arrived as the app closed
            show(result)
