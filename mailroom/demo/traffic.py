"""Demo traffic: what an application does to the database, at a steady rate.

- A sign-up is ``INSERT INTO accounts``: the trigger of migration 0 creates the activation
  token, the ledger queues it, the collector is woken.
- A password recovery activates an account (as a user clicking the link would) and inserts a
  ``password_recovery`` token for it.
- About one address in twenty is one SES cannot take (an invalid host name), so failures show
  in the ledger.  One in fifteen is SES's mailbox simulator's ``bounce+...``, which the local SES
  answers with a permanent bounce event (the address is then suppressed), one in forty its
  ``complaint+...``; one recovery in three is asked for by such a bounced address, whose email
  mailroom must skip once the bounce is recorded.  A recovery that reaches an account whose
  activation email is still queued makes that activation ``skipped`` (the account no longer
  needs it), as in production.

It runs in a thread with its own connection; :meth:`Traffic.stop` ends it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

import psycopg

from mailroom.demo.ses_events import SIMULATOR

__all__ = ["Traffic"]

_NAMES = ("ann", "bob", "chloe", "dmitri", "eve", "farah", "goran", "hana", "ivan", "jun",
          "kofi", "lea", "mateo", "noor", "olga", "priya", "quinn", "rui", "sana", "tomas")
#: Every Nth sign-up gets an address the sender refuses ("not a valid host name").
BAD_ADDRESS_EVERY = 20
#: Every Nth sign-up bounces for good, every Mth complains (SES's mailbox simulator addresses).
BOUNCE_EVERY, COMPLAINT_EVERY = 15, 40
#: Every Nth recovery is for an account whose address bounced.
BOUNCED_RECOVERY_EVERY = 3
#: Every Nth operation is a password recovery, the rest are sign-ups.
RECOVERY_EVERY = 5
_TICK_S = 0.05

log = logging.getLogger("mailroom.demo")


class Traffic(threading.Thread):
    """Sign-ups and password recoveries at ``rate`` operations per second."""

    def __init__(self, database_url: str, rate: float) -> None:
        super().__init__(name="demo-traffic", daemon=True)
        self.database_url = database_url
        self.rate = rate
        self.signups = 0
        self.recoveries = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        # Addresses stay unique across runs on a kept database (--data).
        self._run = secrets.token_hex(3)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to finish and wait for it."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        try:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                self._loop(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by the demo, which then stops
            if not self._halt.is_set():
                log.error("traffic generator stopped: %s", exc)
                self.error = exc

    def _loop(self, conn: psycopg.Connection) -> None:
        started = time.monotonic()
        done = 0
        while not self._halt.is_set():
            # Catch up to where the rate says we should be: steady on average even when
            # a tick runs late (a slow commit, a busy machine).
            due = int((time.monotonic() - started) * self.rate) + 1 - done
            if due > 0:
                with conn.transaction():
                    for _ in range(due):
                        done += 1
                        if done % RECOVERY_EVERY == 0 and self._recover(conn):
                            continue
                        self._sign_up(conn, done)
            self._halt.wait(_TICK_S)

    def _sign_up(self, conn: psycopg.Connection, n: int) -> None:
        name = _NAMES[n % len(_NAMES)]
        login = f"{name}.{self._run}.{n}"
        self.signups += 1
        host = "-invalid-.example" if self.signups % BAD_ADDRESS_EVERY == 0 else "example.com"
        email = f"{login}@{host}"
        if self.signups % BOUNCE_EVERY == 0:
            email = f"bounce+{login}@{SIMULATOR}"
        elif self.signups % COMPLAINT_EVERY == 0:
            email = f"complaint+{login}@{SIMULATOR}"
        conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)", (email, login))

    def _recover(self, conn: psycopg.Connection) -> bool:
        # A random account among the recent ones (most have had their activation email), or
        # now and then one of this run's whose address bounced.
        if (self.recoveries + 1) % BOUNCED_RECOVERY_EVERY == 0:
            row = conn.execute(
                "UPDATE accounts SET status = 'active'"
                " WHERE id = (SELECT id FROM accounts WHERE status <> 'suspended' AND email LIKE %s"
                "             ORDER BY random() LIMIT 1)"
                " RETURNING id", (f"bounce+%.{self._run}.%@{SIMULATOR}",)).fetchone()
            if row is not None:
                conn.execute("INSERT INTO tokens (action, account) VALUES ('password_recovery', %s)", row)
                self.recoveries += 1
                return True
        row = conn.execute(
            "UPDATE accounts SET status = 'active'"
            " WHERE id = (SELECT id FROM accounts WHERE status <> 'suspended'"
            "             ORDER BY id DESC OFFSET floor(random() * 20)::int LIMIT 1)"
            " RETURNING id").fetchone()
        if row is None:
            return False
        conn.execute("INSERT INTO tokens (action, account) VALUES ('password_recovery', %s)", row)
        self.recoveries += 1
        return True
