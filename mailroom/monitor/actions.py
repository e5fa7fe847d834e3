"""The state-changing keys (uppercase) and their gating: the app's base class.

``P`` pause/resume claims, ``D`` drain and ``L`` set rate go to the supervisor
over the control socket; ``R`` retry, ``X`` skip and ``U`` unsuppress go to the ledger.  Each needs
``--operate``; the socket ones need the ``operator`` role too, and the ledger
ones are refused to a connection the supervisor called a ``viewer``.  Each asks
for confirmation with the numbers at stake (a dry run for R and X).  A refused
key shows a notice; nothing here raises into the app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual import work
from textual.app import App

from mailroom._process import one_line
from mailroom.control.client import ControlRefused
from mailroom.monitor.dialogs import Confirm, Prompt
from mailroom.monitor.feed import ControlFeed
from mailroom.monitor.ledger_source import LedgerSource, LedgerUnavailable
from mailroom.monitor.model import MonitorState, as_float
from mailroom.monitor.panes.deliverability import DeliverabilityPane
from mailroom.monitor.panes.failures import FailuresPane
from mailroom.monitor.panes.ledger import LedgerCountsPane
from mailroom.monitor.widgets import num

__all__ = ["OPERATOR_ACTIONS", "OperatorActions"]

#: (key, action, footer title)
OPERATOR_ACTIONS = (
    ("P", "pause", "Pause/resume"),
    ("D", "drain", "Drain"),
    ("L", "set_rate", "Rate limit"),
    ("R", "retry", "Retry"),
    ("X", "skip", "Skip"),
    ("U", "unsuppress", "Unsuppress"),
)
_SOCKET_ACTIONS = {"pause", "drain", "set_rate"}
_LEDGER_ACTIONS = {"retry", "skip", "unsuppress"}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ControlRefused):  # the supervisor's error code and message
        return f"{exc.code}: {one_line(exc.message)}"
    return one_line(exc)


def error_filter(group_error: str) -> str:
    """The text to select a failure group's rows by (``error=`` matches a substring).

    Groups are keyed by the error with each address replaced by ``<address>``;
    the stored errors hold the real addresses, so the longest piece between
    placeholders is what every row of the group contains.  The confirmation
    shows the dry-run count of exactly what this selects.
    """
    pieces = [p for p in group_error.split("<address>") if p.strip()]
    return max(pieces, key=len) if pieces else group_error


class OperatorActions(App[None]):
    """The app's P, D, L, R, X with their checks and confirmations (the app subclasses this)."""

    # Set by the app's constructor.
    operate: bool
    feed: ControlFeed | None
    ledger: LedgerSource | None
    state: MonitorState
    current: str

    def reload_ledger(self) -> None:
        """Query the ledger again for the pane shown (the app's; after a change)."""
        raise NotImplementedError

    def refusal(self, action: str) -> str | None:
        """Why ``action`` is not allowed now, or None when it is."""
        if not self.operate:
            return "read-only: start the monitor with --operate to change anything"
        role = self.feed.role if self.feed else None
        if action in _SOCKET_ACTIONS:
            if self.feed is None or not self.feed.connected:
                return "not connected to the supervisor"
            if role != "operator":
                return f"the supervisor gave this connection the {role or 'unknown'} role"
        elif action in _LEDGER_ACTIONS:
            if role == "viewer":
                return "the supervisor gave this connection the viewer role"
            if self.ledger is None:
                return "no database: set MAILROOM_DATABASE_URL"
        return None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Disabled-but-shown (None) for a refused operator key; its refusal runs instead."""
        if action in _SOCKET_ACTIONS or action in _LEDGER_ACTIONS:
            return None if self.refusal(action) else True
        if action == "refuse":
            target = str(parameters[0]) if parameters else ""
            return self.refusal(target) is not None
        return True

    def action_refuse(self, action: str) -> None:
        """Say why an operator key did nothing."""
        self.notify(f"{action} refused: {self.refusal(action) or 'not allowed'}",
                    severity="warning", title="read-only")

    # -- the two dialogs, chained the one way every key uses them

    def confirm(self, question: str, then: Callable[[], object]) -> None:
        """Ask ``question``; ``then`` runs on yes, nothing on no or Esc."""
        def answered(yes: bool | None) -> None:
            if yes:
                then()
        self.push_screen(Confirm(question), answered)

    def prompt_then_confirm(self, prompt: str, value: str, noun: str, question: Callable[[float], str],
                            then: Callable[[float], object]) -> None:
        """Ask for a positive number, then confirm ``question(number)``, then ``then(number)``.

        Esc on the prompt does nothing; an answer that is not a positive number is a
        notice (``not a <noun>``) and nothing more.
        """
        def asked(answer: str | None) -> None:
            if answer is None:
                return
            number = as_float(answer)
            if number is None or number <= 0:
                self.notify(f"not a {noun}: {answer!r}", severity="error")
                return
            self.confirm(question(number), lambda: then(number))
        self.push_screen(Prompt(prompt, value), asked)

    # -- socket actions

    def action_pause(self) -> None:
        """P: pause claims, or resume them when paused."""
        verb = "resume" if self.state.paused_claims else "pause"
        tick = self.state.tick
        question = (f"{verb.capitalize()} claims?\n\nqueued now: {num(tick.queue_depth)}, "
                    f"in flight: {num(tick.in_flight)}.\n"
                    + ("Batches in flight finish; no new rows are claimed."
                       if verb == "pause" else "Claims start again."))
        self.confirm(question, lambda: self._command(verb, what="claims"))

    def action_drain(self) -> None:
        """D: pause claims and wait until nothing is in flight."""
        self.prompt_then_confirm(
            "Drain: seconds to wait for in-flight batches", "60", "timeout",
            lambda timeout: (f"Drain? Claims stop; waits up to {timeout:g} s for the "
                             f"{num(self.state.tick.in_flight)} batches in flight."),
            lambda timeout: self._command("drain", timeout_s=timeout))

    def action_set_rate(self) -> None:
        """L: set the send-rate limit (recipients per second)."""
        tick = self.state.tick
        self.prompt_then_confirm(
            "Send-rate limit, recipients per second", "" if tick.rate_limit is None else f"{tick.rate_limit:g}",
            "rate",
            lambda rate: (f"Set the send rate to {rate:g}/s?\n\nnow {num(tick.rate_limit, 1)}/s, "
                          f"at most {num(tick.rate_cap, 1)}/s (the send quota)."),
            lambda rate: self._command("set_rate", per_second=rate))

    @work(group="command")
    async def _command(self, cmd: str, **args: Any) -> None:
        feed = self.feed
        try:
            if feed is None:
                raise ConnectionError("not connected to the supervisor")
            result = await feed.request(cmd, **args)
        except Exception as exc:  # noqa: BLE001 - refused or disconnected: a notice, never a crash
            self.notify(f"{cmd} failed: {_describe(exc)}", severity="error")
            return
        changed = result.get("changed")
        self.notify(f"{cmd}: done" + (" (nothing changed)" if changed is False else ""))

    # -- ledger actions

    def _selection(self) -> tuple[str, dict[str, Any]] | None:
        if self.current == "failures":
            error = self.query_one(FailuresPane).selected_error()
            if error is not None:
                return f"with the error {error[:80]!r}", {"error": error_filter(error)}
        if self.current == "ledger":
            email = self.query_one(LedgerCountsPane).email
            if email:
                return f"of {email}", {"email": email}
        return None

    def action_retry(self) -> None:
        """R: requeue the failed rows of the selected group or address."""
        self._ledger_change("retry")

    def action_skip(self) -> None:
        """X: skip the queued rows of the selected group or address."""
        self._ledger_change("skip")

    def _ledger_change(self, op: str) -> None:
        selection = self._selection()
        if selection is None:
            self.notify(f"{op}: select a failure group (3) or look up an address (2, /) first",
                        severity="warning")
            return
        self._dry_run(op, *selection)

    def _change(self, op: str, dry_run: bool, selection: dict[str, Any]) -> int:
        """Run (or count, ``dry_run``) ``retry`` or ``skip`` in the ledger; raises LedgerUnavailable."""
        ledger = self.ledger
        if ledger is None:
            raise LedgerUnavailable("no database: set MAILROOM_DATABASE_URL")
        change = ledger.retry if op == "retry" else ledger.skip
        return change(dry_run, **selection)

    @work(thread=True, group="ledger-change")
    def _dry_run(self, op: str, label: str, selection: dict[str, Any]) -> None:
        try:
            count = self._change(op, True, selection)
        except LedgerUnavailable as exc:
            self.call_from_thread(self.notify, f"{op}: {exc}", severity="error")
            return
        what = ("failed rows requeued (rows already sent are never resent)" if op == "retry"
                else "queued rows marked skipped (never sent)")
        question = f"{op.capitalize()} {count} rows {label}?\n\nDry run: {count} {what}."
        self.call_from_thread(self.confirm, question, lambda: self._apply_change(op, label, selection))

    @work(thread=True, group="ledger-change")
    def _apply_change(self, op: str, label: str, selection: dict[str, Any]) -> None:
        try:
            count = self._change(op, False, selection)
        except LedgerUnavailable as exc:
            self.call_from_thread(self.notify, f"{op}: {exc}", severity="error")
            return
        self.call_from_thread(self.notify, f"{op}: {count} rows {label}")
        self.call_from_thread(self.reload_ledger)

    # -- the suppression list (screen 6)

    def action_unsuppress(self) -> None:
        """U: take the selected suppressed address off the list: the address (editable),
        then a confirmation, then the change, audited as this user."""
        address = self.query_one(DeliverabilityPane).selected_address() if self.current == "deliverability" else None
        if address is None:
            self.notify("unsuppress: select an address of the suppression list (6) first", severity="warning")
            return

        def asked(answer: str | None) -> None:
            chosen = (answer or "").strip()
            if not chosen:
                return
            self.confirm(f"Take {chosen} off the suppression list?\n\nIts next email is sent again;"
                         " the change is audited under your user.", lambda: self._unsuppress(chosen))
        self.push_screen(Prompt("Unsuppress the address", address), asked)

    @work(thread=True, group="ledger-change")
    def _unsuppress(self, address: str) -> None:
        try:
            if self.ledger is None:
                raise LedgerUnavailable("no database: set MAILROOM_DATABASE_URL")
            removed = self.ledger.unsuppress(address, note="unsuppressed from the monitor")
        except LedgerUnavailable as exc:
            self.call_from_thread(self.notify, f"unsuppress: {exc}", severity="error")
            return
        self.call_from_thread(self.notify, f"unsuppress: {address} " + (
            "is off the suppression list" if removed else "was not on the suppression list"))
        self.call_from_thread(self.reload_ledger)
