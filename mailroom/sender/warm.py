"""Keep the first call after a quiet period as fast as any other.

A connection to SES that sat idle is closed by the other end (load balancers
drop idle keep-alive connections after about a minute); the next call then pays
a TCP and TLS handshake (tens to hundreds of milliseconds) on the user's time.
:class:`KeepWarm` spends that cost off the path: at start it opens a connection
(and has botocore load what it loads lazily) with a ``GetSendQuota`` call, and
after every :data:`IDLE_AFTER` seconds without an SES call it makes another one
on its own thread.  ``GetSendQuota`` is free and does not send anything.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mailroom._process import one_line

log = logging.getLogger("mailroom.sender")

#: Seconds without an SES call after which the connection is refreshed; well
#: below the idle timeouts of the load balancers in front of SES.
IDLE_AFTER = 20.0


class KeepWarm:
    """A daemon thread that calls ``GetSendQuota`` when SES has been idle.

    The sending threads call :meth:`touch` at each call; setting ``stopping`` ends
    the thread.  Failures are only logged at debug level: the next real call
    reports its own errors.
    """

    def __init__(self, client: Any, stopping: threading.Event, idle_after: float = IDLE_AFTER) -> None:
        self.client = client
        self.idle_after = idle_after
        self._stopping = stopping
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None

    def touch(self) -> None:
        """An SES call just ended: the connection it used is warm."""
        self._last = time.monotonic()

    def ping(self) -> dict[str, Any] | None:
        """One ``GetSendQuota`` call; its answer, or None if it failed."""
        try:
            quota: dict[str, Any] = self.client.get_send_quota()
        except Exception as exc:  # noqa: BLE001 - any failure means the same: not warm
            log.debug("keep-warm GetSendQuota failed: %s", one_line(exc, named=True))
            return None
        finally:
            self.touch()
        return quota

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ses-keep-warm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            due = self._last + self.idle_after - time.monotonic()
            if due > 0:
                if self._stopping.wait(due):
                    return
                continue
            self.ping()
