"""The monitor's window on the ledger: ``mailroom.ledger`` functions on one connection.

Every call here blocks (sync psycopg) and must run in a thread worker, never on
the UI's event loop.  One connection, opened lazily and re-opened after a
failure; a ``statement_timeout`` bounds every query so that a huge ledger or a
lock cannot freeze a screen.  Failures come out as :class:`LedgerUnavailable`
with a one-line message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from mailroom.config import Settings

if TYPE_CHECKING:  # imported where a connection is made (see the operations below)
    import psycopg

log = logging.getLogger("mailroom.monitor")

__all__ = ["LedgerSource", "LedgerUnavailable"]

T = TypeVar("T")

#: Longest a monitor query may run (ms); the admin functions are index-bound and limited.
STATEMENT_TIMEOUT_MS = 5000
CONNECT_TIMEOUT_S = 3


class LedgerUnavailable(Exception):
    """The ledger could not be read or written; ``str()`` is one line for the screen."""


class LedgerSource:
    """Thread-safe access to the ledger of one queue."""

    def __init__(self, url: str, queue: str, channel: str = Settings.channel_name) -> None:
        self.url = url
        self.queue = queue
        #: The collectors' LISTEN channel: a retry notifies it so they claim at once.
        self.channel = channel
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection[Any]:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                application_name="mailroom-monitor",
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            )
        return self._conn

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in one transaction; one connection at a time."""
        import psycopg

        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    return fn(conn, *args, **kwargs)
            except psycopg.Error as exc:
                # The connection may be dead (server restarted, network): drop it
                # so the next call reconnects.
                self.close_locked()
                message = str(exc).strip().splitlines()
                raise LedgerUnavailable(
                    f"{type(exc).__name__}: {message[0] if message else 'database error'}"
                ) from exc

    def close_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass

    def close(self) -> None:
        """Close the connection (at exit)."""
        with self._lock:
            self.close_locked()

    # -- the operations the screens use
    # Each imports the ledger's functions where it runs: a monitor without a database
    # (live screens only) never loads them, nor psycopg under them.

    def counts(self) -> dict[str, Any]:
        """Counts by status x action, oldest queued age, expired leases."""
        from mailroom.ledger import admin

        return self.call(admin.counts, self.queue)

    def attempts(self, tokens: list[int]) -> dict[int, int]:
        """Attempts so far of each of ``tokens`` (a batch's rows)."""
        from mailroom.ledger import admin

        return self.call(admin.attempts, self.queue, tokens)

    def feedback(self, tokens: list[int], message_ids: list[str]) -> list[dict[str, Any]]:
        """What SES said of a batch's rows, by token or MessageId (the batch detail)."""
        from mailroom.ledger import admin

        return self.call(admin.feedback, self.queue, tokens, message_ids)

    def deliveries(self, email: str, limit: int = 100) -> list[dict[str, Any]]:
        """Every delivery of ``email`` (newest first, at most ``limit``)."""
        from mailroom.ledger import admin

        return self.call(admin.deliveries, self.queue, email, limit=limit)

    def failure_groups(self, limit: int = 50) -> list[dict[str, Any]]:
        """Failed rows grouped by error."""
        from mailroom.ledger import admin

        return self.call(admin.failure_groups, self.queue, limit=limit)

    def consumers(self) -> list[dict[str, Any]]:
        """Every consumer of the queue on any host (the fleet)."""
        from mailroom.ledger import fleet

        return self.call(fleet.consumers, self.queue)

    def deliverability(self, search: str | None = None) -> dict[str, Any]:
        """Screen 6: the 24-hour rates, events by type, the latest bounces and
        complaints, the newest of the suppression list (those containing ``search``)."""
        from mailroom.ledger import events, report, suppressions

        def read(conn: psycopg.Connection[Any], queue: str) -> dict[str, Any]:
            return {"health": report.deliverability(events.health(conn, queue)),
                    "counts": events.feedback_counts(conn, queue), "latest": events.latest_bad(conn, queue),
                    "suppressions": suppressions.entries(conn, search=search, limit=200)}

        return self.call(read, self.queue)

    def unsuppress(self, address: str, note: str | None = None) -> bool:
        """Take ``address`` off the suppression list, audited as the operating-system
        user running the monitor (as ``mailroom suppression remove`` is); False when
        it was not on it."""
        from mailroom.ledger import suppressions
        from mailroom.ledger.suppression_commands import actor

        return self.call(suppressions.remove, address, actor=actor(), note=note)

    def retry(self, dry_run: bool, **selection: Any) -> int:
        """Requeue failed rows of ``selection`` (or count them with ``dry_run``)."""
        from mailroom.ledger import admin

        return self.call(admin.retry, self.queue, dry_run=dry_run, channel=self.channel, **selection)

    def skip(self, dry_run: bool, **selection: Any) -> int:
        """Skip queued rows of ``selection`` (or count them with ``dry_run``)."""
        from mailroom.ledger import admin

        return self.call(admin.skip, self.queue, dry_run=dry_run, **selection)
