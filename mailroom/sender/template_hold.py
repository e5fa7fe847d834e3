"""Held, not failed: an action whose template is missing or does not render.

SES accepts a bulk call whose template uses a variable the data does not fill
and then drops the emails; a template that does not exist fails every row of
the call, attempt after attempt.  Neither is the rows' fault, and both are
fixed by an operator (``mailroom templates push``), not by time.  So the
supervisor's sender renders both configured templates once at start (a
SIGHUP restarts it, so also then) and holds an action whose template does not
render: its rows are never sent and never failed.  They go back to the queue
with the claim's attempt given back (:attr:`~mailroom.vocabulary.OutcomeKind.HELD`),
and the collector stops claiming them (the sender says which actions are held
with every heartbeat).  An SES answer at send time that the template does not
exist holds the action the same way.  While an action is held, a thread
renders its template again every :data:`RECHECK_EVERY` seconds and releases
it once it renders.

An answer that says nothing about the template (SES unreachable, throttled,
access denied to ``TestRenderTemplate``) changes nothing: holding on it would
stop sending for a reason sending does not share.  But a send-time hold must
not outlive the template's return when the recheck gets no verdict (a sender
without ``ses:TestRenderTemplate``): the collector no longer claims a held
action's rows, so no send would ever clear it.  So a template held as missing
is then looked up with ``GetTemplate`` instead, and released once it exists;
when SES answers neither, the hold is released at the recheck and the next
send asks again (SES holds it again if the template is still missing).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from mailroom.config import Settings
from mailroom.sender import render
from mailroom.vocabulary import Action

log = logging.getLogger("mailroom.sender.engine")

#: Seconds between two renders of a held template.
RECHECK_EVERY = 60.0
#: Seconds a row held at send time waits in the ledger before it may be claimed
#: again: the collector's claims leave a held action alone as soon as the
#: next heartbeat says so, this only bounds the turns until then.
HELD_RETRY_AFTER = 1.0


class TemplateHold:
    """Which actions are held and why; thread-safe.

    :meth:`check` renders both configured templates (at start, synchronously);
    :meth:`start` runs the rechecks while something is held;
    :meth:`missing_at_send` holds an action on SES's word at send time.
    """

    def __init__(self, settings: Settings, recheck_every: float = RECHECK_EVERY) -> None:
        self.templates = render.configured(settings)
        self.recheck_every = recheck_every
        self._lock = threading.Lock()
        self._held: dict[Action, str] = {}
        # Held as missing (not as broken): GetTemplate can tell when that is over.
        self._missing: set[Action] = set()
        self._client: Any = None
        self._stopped = threading.Event()

    def reason(self, action: int) -> str | None:
        """Why ``action`` is held (``template NAME does not exist in SES``), or None."""
        with self._lock:
            return self._held.get(Action(action))

    def held_actions(self) -> tuple[int, ...]:
        """The held actions' numbers, sorted."""
        with self._lock:
            return tuple(sorted(int(a) for a in self._held))

    def states(self) -> list[dict[str, Any]]:
        """Each configured template: ``template``, ``action``, ``ok``, ``reason`` (heartbeat stats)."""
        with self._lock:
            return [{"template": name, "action": action.db_name, "ok": action not in self._held,
                     "reason": self._held.get(action)} for action, name in self.templates.items()]

    def check(self, client: Any) -> None:
        """Render every configured template (the held ones only, once started) and
        hold or release each action by what SES says."""
        self._client = client
        for action, name in self.templates.items():
            result = render.render(client, name, action)
            if result.verdict is render.Verdict.UNKNOWN:
                log.warning("cannot check template %s (%s); its %s emails are sent as before",
                            name, result.reason, action.db_name)
                continue
            self._set_result(action, result)

    def missing_at_send(self, action: int, reason: str) -> None:
        """SES answered a send that the template of ``action`` does not exist."""
        name = self.templates[Action(action)]
        self._set(Action(action), f"template {name} does not exist in SES ({reason})", missing=True)

    def start(self) -> None:
        """The recheck thread (a daemon: it holds nothing that needs closing)."""
        threading.Thread(target=self._recheck, name="template-check", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _set_result(self, action: Action, result: render.RenderResult) -> None:
        """Hold or release ``action`` by a verdict (not UNKNOWN) on its template."""
        reason = None if result.ok else f"template {self.templates[action]} {result.reason}"
        self._set(action, reason, missing=result.verdict is render.Verdict.MISSING)

    def _set(self, action: Action, reason: str | None, *, missing: bool = False,
             released: str = "renders now") -> None:
        with self._lock:
            before = self._held.get(action)
            if reason is None:
                self._held.pop(action, None)
            else:
                self._held[action] = reason
            if reason is not None and missing:
                self._missing.add(action)
            else:
                self._missing.discard(action)
        if reason is not None and before is None:
            # Once per hold, not per row or per recheck.
            log.error("holding %s emails: %s; their rows stay queued (not sent, not failed) until it"
                      " renders: mailroom templates push, then SIGHUP (or wait %g s)",
                      action.db_name, reason, self.recheck_every)
        elif reason is None and before is not None:
            log.warning("template %s %s: sending %s emails again", self.templates[action], released,
                        action.db_name)

    def _recheck(self) -> None:
        # Every interval, the held templates only: nothing to ask while all render.
        while not self._stopped.wait(self.recheck_every):
            for action in [Action(a) for a in self.held_actions()]:
                self._recheck_one(action)

    def _recheck_one(self, action: Action) -> None:
        name = self.templates[action]
        result = render.render(self._client, name, action)
        if result.verdict is not render.Verdict.UNKNOWN:
            self._set_result(action, result)
            return
        with self._lock:
            missing = action in self._missing
        if not missing:
            # Held as broken: TestRenderTemplate said so, and will again (throttled now).
            return
        found = render.exists(self._client, name)
        if found:
            # All GetTemplate can tell: it exists, as SendBulkTemplatedEmail needs.
            self._set(action, None, released="exists now")
        elif found is None:
            # Nothing can check it: let the next send ask SES (held again if still missing).
            self._set(action, None, released=f"cannot be checked ({result.reason})")
