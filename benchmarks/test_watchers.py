"""What watching costs: the end-to-end rate with three subscribed control clients and a
Prometheus scrape every second, against the same pipeline unwatched, in the same run.

One supervisor (control socket and /metrics on), an instant SES stub in its own
process.  Rounds alternate: an unwatched backlog (the floor, timed in pytest-benchmark's
untimed ``setup``), then a watched one (the timed round): three clients subscribed to
every event, reading them as fast as they come, and a scraper on ``/metrics`` once a
second.  Target: the watched rate reaches >= 0.90 of the unwatched one (see
``TARGETS`` below for why not 0.95).  Run::

    python3 -m pytest benchmarks/test_watchers.py --benchmark-only -s
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import urllib.request

import psycopg
import pytest
from collector_util import insert_accounts, wait_for
from conftest import TARGETS, Rounds, Target, record, record_rate
from pgutil import SECRET_KEY_HEX, create_database, drop_database
from ses_emulator import free_port, restore_env, stub_process, use_aws_env
from supervisor_util import SupervisorProcess, ledger, supervisor_env

from mailroom.control.client import ControlClient
from mailroom.ledger import migrate

ACCOUNTS = 10_000
LIMIT = 50
ROUNDS = 4

# 1.00-1.03 on a quiet machine; beside two busy loops the same code measured 0.93, 0.95
# and 1.00 (rounds of ~4 s on an oversubscribed machine differ by about 5 %).  0.90
# still fails the regression it was written for: a turn's events written one by one
# to each client measured 0.89.
TARGETS.append(Target("end to end watched (3 subscribers + a scrape a second) / unwatched",
                      ("watchers", "watched"), ("watchers", "unwatched"), 0.90))



class Watchers:
    """Three subscribed clients draining their events, and a scraper once a second."""

    def __init__(self, path: str, metrics_url: str) -> None:
        self.path, self.metrics_url = path, metrics_url
        self.stop = threading.Event()
        self.events = 0
        self.scrapes = 0
        self.threads: list[threading.Thread] = []
        self.clients: list[ControlClient] = []

    def start(self) -> None:
        for _ in range(3):
            client = ControlClient(self.path, timeout=30)
            client.connect()
            client.subscribe()
            self.clients.append(client)
            self.threads.append(threading.Thread(target=self._read, args=(client,), daemon=True))
        self.threads.append(threading.Thread(target=self._scrape, daemon=True))
        for thread in self.threads:
            thread.start()

    def _read(self, client: ControlClient) -> None:
        try:
            for _ in client.events():
                self.events += 1
                if self.stop.is_set():
                    return
        except Exception:  # noqa: BLE001 - closed under us at the end
            return

    def _scrape(self) -> None:
        while not self.stop.wait(1.0):
            urllib.request.urlopen(self.metrics_url, timeout=10).read()
            self.scrapes += 1

    def close(self) -> None:
        self.stop.set()
        for client in self.clients:
            client.close()


@pytest.mark.timeout(600)
def test_watching_costs_at_most_a_tenth(benchmark):
    url = create_database("mailroom_bench")
    migrate.up(url)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_") or k == "MAILROOM_IMPL"}
    base["MAILROOM_SECRET_KEY"] = SECRET_KEY_HEX
    where = tempfile.mkdtemp(prefix="mrw")
    path = os.path.join(where, "c.sock")
    port = free_port()
    unwatched = Rounds()
    inserted = 0
    events = []
    saved = use_aws_env()
    try:
        with stub_process() as ses_url:
            env = supervisor_env(base, url, ses_url, batch_limit=LIMIT, ses_max_send_rate=10**6,
                                 log_level="WARNING", control_socket=path, metrics_addr=f"127.0.0.1:{port}")
            sup = SupervisorProcess(env)
            try:
                insert_accounts(url, 1, "warmup")
                wait_for(lambda: ledger(url).get("sent") == 1, timeout=60, what="warm-up token")

                def backlog() -> None:
                    nonlocal inserted
                    inserted += 1
                    insert_accounts(url, ACCOUNTS, f"w{inserted}_")
                    with psycopg.connect(url, autocommit=True) as conn:
                        wait_for(lambda: conn.execute("SELECT NOT EXISTS (SELECT FROM delivery_queue)")
                                 .fetchone()[0], timeout=300, interval=0.02, what="every row sent")

                def setup():
                    start = time.perf_counter()
                    backlog()  # the floor: the same backlog, nobody watching
                    unwatched.seconds.append(time.perf_counter() - start)
                    return (), {}

                def run() -> None:
                    watchers = Watchers(path, f"http://127.0.0.1:{port}/metrics")
                    watchers.start()
                    try:
                        backlog()
                    finally:
                        watchers.close()
                    events.append(watchers.events)

                benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
                assert ledger(url).get("sent") == 1 + inserted * ACCOUNTS  # every backlog, every token
                assert sup.stop() == 0
            finally:
                sup.kill()
    finally:
        restore_env(saved)
        drop_database(url)
    if record(benchmark, "watchers", "watched", ACCOUNTS, "destinations") is None:
        return
    record_rate("watchers", "unwatched", unwatched.rate(ACCOUNTS), "destinations")
    print(f"\nwatchers: events read per watched round {events}")
