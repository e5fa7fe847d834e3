"""The state-changing keys (uppercase) and their gating, as a mixin of the app.

``P`` pause/resume claims, ``D`` drain and ``L`` set rate go to the supervisor
over the control socket; ``R`` retry and ``X`` skip go to the ledger.  Each needs
``--operate``; the socket ones need the ``operator`` role too, and the ledger
ones are refused to a connection the supervisor called a ``viewer``.  Each asks
for confirmation with the numbers at stake (a dry run for R and X).  A refused
key shows a notice; nothing here raises into the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual import work

from mailroom.monitor.dialogs import Confirm, Prompt
from mailroom.monitor.ledger_source import LedgerUnavailable
from mailroom.monitor.model import as_float
from mailroom.monitor.widgets import num

if TYPE_CHECKING:
    from mailroom.monitor.app import MonitorApp

__all__ = ["OPERATOR_ACTIONS", "OperatorActions"]

#: (key, action, footer title)
OPERATOR_ACTIONS = (
    ("P", "pause", "Pause/resume"),
    ("D", "drain", "Drain"),
    ("L", "set_rate", "Rate limit"),
    ("R", "retry", "Retry"),
    ("X", "skip", "Skip"),
)
_SOCKET_ACTIONS = {"pause", "drain", "set_rate"}
_LEDGER_ACTIONS = {"retry", "skip"}


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"{code}: {message}" if code else message


def error_filter(group_error: str) -> str:
    """The text to select a failure group's rows by (``error=`` matches a substring).

    Groups are keyed by the error with each address replaced by ``<address>``;
    the stored errors hold the real addresses, so the longest piece between
    placeholders is what every row of the group contains.  The confirmation
    shows the dry-run count of exactly what this selects.
    """
    pieces = [p for p in group_error.split("<address>") if p.strip()]
    return max(pieces, key=len) if pieces else group_error


class OperatorActions:
    """Mixin: P, D, L, R, X with their checks and confirmations."""

    def refusal(self: MonitorApp, action: str) -> str | None:  # type: ignore[misc]
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
            return None if self.refusal(action) else True  # type: ignore[attr-defined]
        if action == "refuse":
            target = str(parameters[0]) if parameters else ""
            return self.refusal(target) is not None  # type: ignore[attr-defined]
        return True

    def action_refuse(self: MonitorApp, action: str) -> None:  # type: ignore[misc]
        """Say why an operator key did nothing."""
        self.notify(f"{action} refused: {self.refusal(action) or 'not allowed'}",
                    severity="warning", title="read-only")

    # -- socket actions

    def action_pause(self: MonitorApp) -> None:  # type: ignore[misc]
        """P: pause claims, or resume them when paused."""
        verb = "resume" if self.state.paused_claims else "pause"
        tick = self.state.tick
        question = (f"{verb.capitalize()} claims?\n\nqueued now: {num(tick.queue_depth)}, "
                    f"in flight: {num(tick.in_flight)}.\n"
                    + ("Batches in flight finish; no new rows are claimed."
                       if verb == "pause" else "Claims start again."))
        self.push_screen(Confirm(question), lambda yes: yes and self._command(verb, what="claims"))

    def action_drain(self: MonitorApp) -> None:  # type: ignore[misc]
        """D: pause claims and wait until nothing is in flight."""
        def asked(value: str | None) -> None:
            timeout = as_float(value)
            if value is None:
                return
            if timeout is None or timeout <= 0:
                self.notify(f"not a timeout: {value!r}", severity="error")
                return
            question = (f"Drain? Claims stop; waits up to {timeout:g} s for the "
                        f"{num(self.state.tick.in_flight)} batches in flight.")
            self.push_screen(Confirm(question),
                             lambda yes: yes and self._command("drain", timeout_s=timeout))
        self.push_screen(Prompt("Drain: seconds to wait for in-flight batches", "60"), asked)

    def action_set_rate(self: MonitorApp) -> None:  # type: ignore[misc]
        """L: set the send-rate limit (recipients per second)."""
        tick = self.state.tick
        def asked(value: str | None) -> None:
            rate = as_float(value)
            if value is None:
                return
            if rate is None or rate <= 0:
                self.notify(f"not a rate: {value!r}", severity="error")
                return
            question = (f"Set the send rate to {rate:g}/s?\n\nnow {num(tick.rate_limit, 1)}/s, "
                        f"SES MaxSendRate {num(tick.max_send_rate, 1)}/s (the cap).")
            self.push_screen(Confirm(question),
                             lambda yes: yes and self._command("set_rate", per_second=rate))
        self.push_screen(Prompt("Send-rate limit, recipients per second",
                                "" if tick.rate_limit is None else f"{tick.rate_limit:g}"), asked)

    @work(group="command")
    async def _command(self: MonitorApp, cmd: str, **args: Any) -> None:  # type: ignore[misc]
        try:
            result = await self.feed.request(cmd, **args)  # type: ignore[union-attr]
        except Exception as exc:  # refused or disconnected: a notice, never a crash
            self.notify(f"{cmd} failed: {_describe(exc)}", severity="error")
            return
        changed = result.get("changed")
        self.notify(f"{cmd}: done" + (" (nothing changed)" if changed is False else ""))

    # -- ledger actions

    def _selection(self: MonitorApp) -> tuple[str, dict[str, Any]] | None:  # type: ignore[misc]
        from mailroom.monitor.panes.failures import FailuresPane
        from mailroom.monitor.panes.ledger import LedgerPane

        if self.current == "failures":
            error = self.query_one(FailuresPane).selected_error()
            if error is not None:
                return f"with the error {error[:80]!r}", {"error": error_filter(error)}
        if self.current == "ledger":
            email = self.query_one(LedgerPane).email
            if email:
                return f"of {email}", {"email": email}
        return None

    def action_retry(self: MonitorApp) -> None:  # type: ignore[misc]
        """R: requeue the failed rows of the selected group or address."""
        self._ledger_change("retry")

    def action_skip(self: MonitorApp) -> None:  # type: ignore[misc]
        """X: skip the queued rows of the selected group or address."""
        self._ledger_change("skip")

    def _ledger_change(self: MonitorApp, op: str) -> None:  # type: ignore[misc]
        selection = self._selection()
        if selection is None:
            self.notify(f"{op}: select a failure group (3) or look up an address (2, /) first",
                        severity="warning")
            return
        self._dry_run(op, *selection)

    @work(thread=True, group="ledger-change")
    def _dry_run(self: MonitorApp, op: str, label: str, selection: dict[str, Any]) -> None:  # type: ignore[misc]
        try:
            count = getattr(self.ledger, op)(True, **selection)
        except LedgerUnavailable as exc:
            self.call_from_thread(self.notify, f"{op}: {exc}", severity="error")
            return
        what = ("failed rows requeued (rows already sent are never resent)" if op == "retry"
                else "queued rows marked skipped (never sent)")
        question = f"{op.capitalize()} {count} rows {label}?\n\nDry run: {count} {what}."
        self.call_from_thread(
            self.push_screen, Confirm(question),
            lambda yes: yes and self._apply_change(op, label, selection))

    @work(thread=True, group="ledger-change")
    def _apply_change(self: MonitorApp, op: str, label: str, selection: dict[str, Any]) -> None:  # type: ignore[misc]
        try:
            count = getattr(self.ledger, op)(False, **selection)
        except LedgerUnavailable as exc:
            self.call_from_thread(self.notify, f"{op}: {exc}", severity="error")
            return
        self.call_from_thread(self.notify, f"{op}: {count} rows {label}")
        self.call_from_thread(self._reload_ledger)
