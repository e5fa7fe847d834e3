"""Issue 20 item 3: a database that refuses writes is waited out, not crash-looped.

``ALTER DATABASE ... SET default_transaction_read_only = on`` on the test's own
database stands for a maintenance window or a failover onto a replica: the
collector's next connection can read but not write (fleet heartbeat, register,
claims).  The real supervisor runs throughout; the test inserts rows through a
session that overrides the default, as the application on the new primary would.
"""

from __future__ import annotations

import collections

import psycopg
from collector_util import insert_accounts, wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from supervisor_util import ledger, supervisor_env


def _writable(url: str) -> str:
    """The same database, through sessions that may still write."""
    return make_conninfo(url, options="-c default_transaction_read_only=off")


def _read_only(url: str, on: bool) -> None:
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(_writable(url), autocommit=True) as conn:
        action = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        conn.execute(f'ALTER DATABASE "{name}" {action}')
        if on:  # the setting counts from the next connection: make the collector take one
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = current_database() AND application_name = 'mailroom-collector'")


def test_a_read_only_database_is_waited_out_with_one_line_per_kind(db, base_env, supervisors, stub):
    sup = supervisors(supervisor_env(base_env, db, stub.url, batch_limit=50, log_level="debug",
                                     claim_timeout=4000))
    sup.worker("collector")
    insert_accounts(db, 10, "before_")
    wait_for(lambda: ledger(db).get("sent") == 10, timeout=30, what="10 sent before")

    _read_only(db, True)
    try:
        insert_accounts(_writable(db), 30, "during_")
        # Several retries of the claims and at least one of the fleet heartbeat.
        wait_for(lambda: sup.log().count("claims refused again") >= 3
                 and "the fleet heartbeat refused by the database" in sup.log(),
                 timeout=60, what="refused claims retried")
        assert ledger(db) == {"sent": 10, "queued": 30}  # the claims waited
    finally:
        _read_only(db, False)
    wait_for(lambda: ledger(db).get("sent") == 40, timeout=60, what="40 sent once writes returned")
    assert sup.stop() == 0

    log = sup.log()
    assert len(sup.started("collector")) == 1, log  # no worker restart
    assert log.count("claims refused by the database (25006") == 1, log
    assert log.count("the fleet heartbeat refused by the database (25006") == 1, log
    assert "claims accepted by the database again" in log
    assert "Traceback" not in log, log
    counts = collections.Counter(a for request in stub.bulk for a in request.addresses)
    assert len(counts) == 40 and max(counts.values()) == 1, counts.most_common(3)
