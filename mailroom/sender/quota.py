"""What the sender knows about its SES account, for the operator: quota, rate, pause.

:class:`QuotaWatch` reads ``GetSendQuota`` in a thread of its own, at start and
every :data:`REFRESH_S` seconds, so no quota call ever sits in the path of an
email (:attr:`QuotaWatch.quota`, which :func:`mailroom.sender.pipe.sender_stats`
puts in the worker's heartbeat), and applies an operator's ``set_rate``, capped
at the effective quota: ``MAILROOM_SES_MAX_SEND_RATE`` when set (the operator's
word on the account, as at start), else the account's ``MaxSendRate``.  The rate
asked is kept and applied again when a quota read changes the cap.
"""

from __future__ import annotations

import logging
import threading
import time

from mailroom.sender import ses
from mailroom.sender.engine import Sender

log = logging.getLogger("mailroom.sender")

#: Seconds between two GetSendQuota calls.
REFRESH_S = 300.0


class QuotaWatch:
    """The account's quota and the sender's rate, refreshed off the sending path."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.quota: dict[str, float] | None = None
        self.asked: float | None = None  # the operator's last set_rate
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Read the quota now and then every :data:`REFRESH_S` s, in a daemon thread."""
        if self.sender.client is None or isinstance(self.sender.client, ses.PrintingClient):
            return  # debug mode: there is no account
        self._thread = threading.Thread(target=self._loop, name="ses-quota", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            quota = ses.read_send_quota(self.sender.client)
            if quota is not None:
                before = self.cap()
                self.quota = quota
                # A rate asked before the quota was known (one handed to a new
                # sender at start) is capped as soon as it is.
                if self.asked is not None and self.cap() != before:
                    self.set_rate(self.asked)
            time.sleep(REFRESH_S)  # a daemon thread: it ends with the sender's process

    def cap(self) -> float | None:
        """The effective quota (recipients/s): ``MAILROOM_SES_MAX_SEND_RATE`` when
        set, else the account's MaxSendRate once read; None when neither is known."""
        configured = self.sender.settings.ses_max_send_rate
        if configured is not None:
            return configured
        reported = (self.quota or {}).get("max_send_rate", 0.0)
        return reported if reported > 0 else None

    def set_rate(self, per_second: float) -> float:
        """Limit sending to ``per_second`` recipients/s, capped at :meth:`cap`;
        return the limit applied."""
        self.asked = per_second
        cap = self.cap()
        applied = min(per_second, cap) if cap is not None else per_second
        self.sender.set_rate(applied)
        log.info("send rate limit set to %g recipients/s%s", applied,
                 f" (asked {per_second:g}, capped at the send quota)" if applied < per_second else "")
        return applied

