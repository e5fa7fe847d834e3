"""End to end: accounts inserted -> destinations accepted by an instant SES stub.

Runs the real ``mailroom-supervisor`` (collector + sender workers) against real
PostgreSQL and a canned-answer SES stub in its own process; reports the rate and
the resident memory (VmRSS) of the three processes, idle and under load. Run::

    python -m pytest benchmarks/test_end_to_end.py --benchmark-only -s
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from collector_util import insert_accounts, wait_for  # noqa: E402
from pgutil import SECRET_KEY_HEX, create_database, drop_database  # noqa: E402
from ses_emulator import stub_process  # noqa: E402
from supervisor_util import SupervisorProcess, ledger, supervisor_env  # noqa: E402

from mailroom.ledger import migrate  # noqa: E402

ACCOUNTS = 20_000


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.parametrize("limit", [50])
def test_end_to_end_rate_and_memory(benchmark, limit):
    url = create_database("mailroom_bench")
    migrate.up(url)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_") or k == "MAILROOM_IMPL"}
    base["MAILROOM_SECRET_KEY"] = SECRET_KEY_HEX
    memory: dict[str, float] = {}
    try:
        with stub_process() as ses_url:
            env = supervisor_env(base, url, ses_url, batch_limit=limit, ses_max_send_rate=10**9,
                                 log_level="WARNING")
            sup = SupervisorProcess(env)
            pids = {"supervisor": sup.proc.pid, "collector": 0, "sender": 0}
            try:
                # Workers are up once a first token goes through.
                insert_accounts(url, 1, "warmup")
                wait_for(lambda: ledger(url).get("sent") == 1, timeout=60, what="warm-up token")
                children = Path(f"/proc/{sup.proc.pid}/task/{sup.proc.pid}/children").read_text().split()
                pids["collector"], pids["sender"] = (int(p) for p in children[:2])
                for role, pid in pids.items():
                    memory[f"{role}_idle_mib"] = round(rss_mib(pid), 1)

                def run() -> None:
                    peak = {role: 0.0 for role in pids}
                    done = threading.Event()

                    def sample() -> None:
                        while not done.wait(0.1):
                            for role, pid in pids.items():
                                peak[role] = max(peak[role], rss_mib(pid))

                    sampler = threading.Thread(target=sample)
                    sampler.start()
                    insert_accounts(url, ACCOUNTS, "e2e")
                    wait_for(lambda: ledger(url).get("sent") == ACCOUNTS + 1, timeout=600,
                             interval=0.02, what="all sent")
                    done.set()
                    sampler.join()
                    for role, value in peak.items():
                        memory[f"{role}_load_mib"] = round(value, 1)

                benchmark.pedantic(run, rounds=1, iterations=1)
                assert sup.stop() == 0
            finally:
                sup.kill()
    finally:
        drop_database(url)
    rate = ACCOUNTS / benchmark.stats.stats.median
    benchmark.extra_info.update(accounts=ACCOUNTS, destinations_per_s=round(rate), batch_limit=limit, **memory)
    print(f"\nend to end: {ACCOUNTS} accounts -> SES stub at {rate:,.0f} destinations/s (limit {limit});"
          f" RSS MiB {memory}")
