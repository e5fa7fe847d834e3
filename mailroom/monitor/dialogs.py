"""Modal screens: batch detail, confirmation, a one-value prompt, help."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Static

from mailroom.monitor.feed import ControlFeed
from mailroom.monitor.ledger_source import LedgerSource, LedgerUnavailable
from mailroom.monitor.model import Destination, destinations

__all__ = ["BatchDetail", "Confirm", "HelpScreen", "Prompt", "KEYMAP"]

#: The key map, as shown by `?` and in the README.
KEYMAP = (
    ("1-6", "Live, Ledger, Failures, Processes, Events, Deliverability"),
    ("up/down, j/k", "move in a table"),
    ("Enter", "open the batch under the cursor (Live)"),
    ("Esc", "close a dialog, the search box or the detail"),
    ("/", "look up an address (Ledger), search suppressions (6)"),
    ("f", "freeze / unfreeze the screen"),
    ("?", "this help"),
    ("q", "quit"),
    ("ctrl+p", "command palette"),
    ("P", "pause / resume claims          (--operate, operator)"),
    ("D", "drain: pause claims, wait for in-flight batches"),
    ("L", "set the send-rate limit"),
    ("R", "retry the failure group (Failures) or the address (Ledger)"),
    ("X", "skip the queued rows of the group or the address"),
    ("U", "unsuppress the selected address (Deliverability)"),
)


class BatchDetail(ModalScreen[None]):
    """One row per destination of a batch, fetched with the ``batch`` command."""

    BINDINGS = [Binding("escape", "dismiss", "close"), Binding("j", "down", show=False),
                Binding("k", "up", show=False)]
    DEFAULT_CSS = """
    BatchDetail { align: center middle; }
    BatchDetail > Vertical { width: 95%; height: 80%; border: thick $primary; background: $surface; }
    BatchDetail DataTable { height: 1fr; }
    """

    def __init__(self, batch_id: str, feed: ControlFeed | None, ledger: LedgerSource | None) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.feed, self.ledger = feed, ledger

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(f"batch {self.batch_id}: loading ...", style="bold"), id="detail-info")
            table: DataTable[Any] = DataTable(id="destinations", cursor_type="row")
            table.add_columns("address", "action", "status", "MessageId", "attempts", "feedback", "error")
            yield table

    def on_mount(self) -> None:
        self._load()

    @work(exclusive=True, group="batch-detail")
    async def _load(self) -> None:
        info = self.query_one("#detail-info", Label)
        feed = self.feed
        try:
            if feed is None:
                raise ConnectionError("no control socket")
            result = await feed.request("batch", id=self.batch_id)
        except Exception as exc:  # noqa: BLE001 - refused, gone, not found: say so, stay open
            info.update(Text(f"batch {self.batch_id}: {exc}", style="bold red"))
            return
        rows = destinations(result)
        await self._attempts(rows)
        said = await self._feedback(rows)
        table = self.query_one("#destinations", DataTable)
        for d in rows:
            table.add_row(d.address, d.action, d.status, d.message_id,
                          "-" if d.attempts is None else str(d.attempts), said(d), d.error[:80])
        info.update(Text(f"batch {self.batch_id}: {len(rows)} destinations   (Esc to close)",
                         style="bold"))
        table.focus()

    async def _attempts(self, rows: list[Destination]) -> None:
        """Fill in attempts from the ledger (the supervisor does not count them)."""
        ledger = self.ledger
        tokens = [d.token for d in rows if d.token is not None and d.attempts is None]
        if ledger is None or not tokens:
            return
        try:
            found = await asyncio.to_thread(ledger.attempts, tokens)
        except LedgerUnavailable:
            return  # the column stays "-": the addresses and outcomes still show
        for d in rows:
            if d.token is not None and d.attempts is None:
                d.attempts = found.get(d.token)

    async def _feedback(self, rows: list[Destination]) -> Callable[[Destination], str]:
        """What SES said of each row, from the ledger (the supervisor's answer has
        only what it did): by token, else by MessageId and address."""
        ledger = self.ledger
        if ledger is None:
            return lambda d: "no ledger (MAILROOM_DATABASE_URL)"
        tokens = [d.token for d in rows if d.token is not None]
        ids = [d.message_id for d in rows if d.token is None and d.message_id]
        if not tokens and not ids:
            return lambda d: "-"
        try:
            found = await asyncio.to_thread(ledger.feedback, tokens, ids)
        except LedgerUnavailable as exc:
            unavailable = f"ledger unavailable: {exc}"[:60]  # (exc is unbound after the except)
            return lambda d: unavailable
        by_token = {f["token"]: f for f in found if f.get("recipient") is None}
        by_id = {(f["message_id"], str(f["recipient"]).lower()): f for f in found if f.get("recipient") is not None}

        def said(d: Destination) -> str:
            f = by_token.get(d.token) if d.token is not None else by_id.get((d.message_id, d.address.lower()))
            if f is None or f.get("feedback") is None:
                # Sent and nothing heard yet, or never sent: SES has nothing to say of it.
                return "awaiting" if d.message_id else "-"
            text = str(f["feedback"])
            detail = f.get("diagnostic") or f.get("subtype")
            return f"{text}: {detail}"[:80] if detail and text != "delivered" else text
        return said

    def action_down(self) -> None:
        self.query_one("#destinations", DataTable).action_cursor_down()

    def action_up(self) -> None:
        self.query_one("#destinations", DataTable).action_cursor_up()


class Confirm(ModalScreen[bool]):
    """A yes/no question; `y`/Enter confirms, `n`/Esc cancels."""

    BINDINGS = [Binding("escape,n", "answer(False)", "cancel"),
                Binding("y", "answer(True)", "confirm")]
    DEFAULT_CSS = """
    Confirm { align: center middle; }
    Confirm > Vertical { width: 70; height: auto; border: thick $warning; background: $surface;
                         padding: 1 2; }
    Confirm Horizontal { height: auto; margin-top: 1; }
    Confirm Button { margin-right: 2; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.question), id="question")
            with Horizontal():
                yield Button("Yes (y)", variant="warning", id="yes")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class Prompt(ModalScreen[str | None]):
    """Ask for one value; Enter submits, Esc cancels (None)."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    Prompt { align: center middle; }
    Prompt > Vertical { width: 60; height: auto; border: thick $primary; background: $surface;
                        padding: 1 2; }
    """

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.question))
            yield Input(value=self.value, id="value")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """The key map."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 80; height: auto; border: thick $primary; background: $surface;
                            padding: 1 2; }
    """

    def compose(self) -> ComposeResult:
        text = Text("mailroom monitor: keys\n\n", style="bold")
        for key, what in KEYMAP:
            text.append(f"{key:>14}  ", style="bold cyan")
            text.append(f"{what}\n")
        text.append("\nState-changing keys (uppercase) need --operate and an operator role;"
                    " each asks for confirmation and shows what a dry run found.", style="dim")
        with Vertical():
            yield Static(text)
