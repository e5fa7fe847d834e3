"""Flow control (issue 13): what a user feels, end to end, with default settings.

The real ``mailroom-supervisor`` against real PostgreSQL and an SES stub in its
own process that records when each address arrived (``time.monotonic()`` is one
clock for every process on Linux):

- (a) latency from an account's commit to SES receiving its address, one account
  per transaction at 2/s and at 100/s, ``adaptive`` and ``fixed`` side by side
  (instant endpoint reporting a quota of 1,000 recipients/s);
- (b) a 20-token single transaction (one folded NOTIFY): time until all 20 arrived;
- (c) a 20,000-token backlog drained against an endpoint answering each call in
  60 ms with a quota of 1,000/s and 5,000/s: destinations per call, share of quota.

Targets: p99 <= 50 ms at 2/s and 100/s, the 20 tokens within 100 ms (adaptive,
default settings).  The run is bounded (about 2 to 3 minutes).  Run::

    python -m pytest benchmarks/test_flow.py -s
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from collector_util import backend_pids, insert_accounts, wait_for
from conftest import measure
from pgutil import SECRET_KEY_HEX, create_database, drop_database
from ses_emulator import AWS_ENV, SOURCE, received, stub_process
from supervisor_util import SupervisorProcess

from mailroom.ledger import migrate

#: Reported by the instant endpoint: a production account's order of magnitude.
LATENCY_QUOTA = 1_000.0
RATES = {"2/s": (2.0, 15.0), "100/s": (100.0, 5.0)}  # inserts/s, seconds of inserts
BACKLOG = 20_000


def environment(url: str, ses_url: str, **extra: str) -> dict[str, str]:
    """Default settings: only what points mailroom at the database and the stub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_") or k == "MAILROOM_IMPL"}
    env.update(AWS_ENV, MAILROOM_DATABASE_URL=url, MAILROOM_SECRET_KEY=SECRET_KEY_HEX,
               MAILROOM_SES_ENDPOINT_URL=ses_url, MAILROOM_SES_SOURCE=SOURCE, MAILROOM_LOG_LEVEL="WARNING",
               MAILROOM_CONTROL_SOCKET="off",
               MAILROOM_SES_OUTPUT_PATH=tempfile.mkdtemp(prefix="mailroom-output-"))
    env.update({f"MAILROOM_{k.upper()}": v for k, v in extra.items()})
    return env


@contextlib.contextmanager
def database() -> Iterator[str]:
    url = create_database("mailroom_flow")
    migrate.up(url)
    try:
        yield url
    finally:
        drop_database(url)


@contextlib.contextmanager
def supervisor(url: str, ses_url: str, **extra: str) -> Iterator[SupervisorProcess]:
    """A running supervisor whose collector listens (the caller warms the sender up)."""
    sup = SupervisorProcess(environment(url, ses_url, **extra))
    try:
        wait_for(lambda: backend_pids(url), timeout=60, what="collector connection")
        assert sup.proc.poll() is None, sup.log()
        yield sup
        assert sup.stop() == 0, sup.log()
    finally:
        sup.kill()


def arrivals(ses_url: str, prefix: str) -> dict[str, float]:
    """Address -> when the stub received it, for addresses starting with ``prefix``."""
    return {address: at for at, addresses in received(ses_url) for address in addresses
            if address.startswith(prefix)}


def paced_inserts(url: str, rate: float, seconds: float, prefix: str) -> dict[str, float]:
    """One account per transaction at ``rate``/s; address -> when its commit returned."""
    commits: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            email = f"{prefix}{i}@example.test"
            conn.execute("INSERT INTO accounts (email, login) VALUES (%s, %s)", (email, f"{prefix}{i}"))
            commits[email] = time.monotonic()
    return commits


def concurrently_paced(runs: list[tuple[str, str]], rate: float, seconds: float,
                       prefixes: dict[str, str]) -> dict[str, dict[str, float]]:
    """:func:`paced_inserts` into each ``(mode, url)`` of ``runs`` at the same time."""
    commits: dict[str, dict[str, float]] = {}

    def insert(mode: str, url: str) -> None:
        commits[mode] = paced_inserts(url, rate, seconds, prefixes[mode])

    threads = [threading.Thread(target=insert, args=run) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return commits


def latencies(ses_url: str, commits: dict[str, float], prefix: str, timeout: float) -> list[float]:
    """Milliseconds from commit to arrival, once every address arrived."""
    got = wait_for(lambda: (a := arrivals(ses_url, prefix)) and len(a) >= len(commits) and a,
                   timeout=timeout, interval=0.2, what=f"all {prefix} addresses at the stub")
    return sorted((got[email] - committed) * 1000 for email, committed in commits.items())


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50": round(statistics.median(ordered), 1), "p99": round(p99, 1), "max": round(ordered[-1], 1)}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@pytest.fixture(scope="module")
def instant_stub() -> Iterator[str]:
    with stub_process(quota=LATENCY_QUOTA, record=True) as url:
        yield url


def test_latency_and_a_20_token_transaction(instant_stub):
    """(a) and (b): adaptive and fixed run side by side, one database and supervisor each."""
    report: dict[str, dict[str, object]] = {}
    with database() as adaptive_db, database() as fixed_db, \
            supervisor(adaptive_db, instant_stub), \
            supervisor(fixed_db, instant_stub, batch_mode="fixed"):
        for mode, url in (("adaptive", adaptive_db), ("fixed", fixed_db)):
            insert_accounts(url, 1, f"warm-{mode}-")  # the first token: boto3 loads lazily
        for mode in ("adaptive", "fixed"):
            wait_for(lambda m=mode: arrivals(instant_stub, f"warm-{m}-"), timeout=30, what="warm-up")
        for label, (rate, seconds) in RATES.items():
            # At 2/s both run at once (the load is light); at 100/s one after the other.
            runs = [("adaptive", adaptive_db), ("fixed", fixed_db)]
            groups = [runs] if rate <= 10 else [[run] for run in runs]
            for group in groups:
                prefixes = {mode: f"lat-{label[:-2]}-{mode}-" for mode, _ in group}
                commits = concurrently_paced(group, rate, seconds, prefixes)
                for mode, _ in group:
                    values = latencies(instant_stub, commits[mode], prefixes[mode], timeout=30)
                    stats = summary(values)
                    report[f"{label} {mode}"] = stats
                    for name, value in stats.items():
                        measure(f"latency {label}", f"{mode} {name}", value, "ms")
        # (b) one transaction of 20 tokens (one folded NOTIFY), three times per mode.
        for mode, url in (("adaptive", adaptive_db), ("fixed", fixed_db)):
            times = []
            for attempt in range(3):
                prefix = f"tx{attempt}-{mode}-"
                start = time.monotonic()
                insert_accounts(url, 20, prefix)
                committed = time.monotonic()
                got = wait_for(lambda p=prefix: len(a := arrivals(instant_stub, p)) == 20 and a,
                               timeout=30, interval=0.1, what="20 tokens")
                times.append((max(got.values()) - committed) * 1000)
                assert start <= committed
                time.sleep(0.3)
            report[f"20-token {mode}"] = {"runs": [round(t, 1) for t in times]}
            measure("20-token transaction", f"{mode} max", max(times), "ms")
    print(f"\nflow latency (load average {load_average()}):")
    for name, stats in report.items():
        print(f"  {name}: {stats}")


@pytest.mark.parametrize("quota", [1_000, 5_000, None], ids=["1000", "5000", "instant"])
def test_backlog_against_a_60_ms_endpoint(quota):
    """(c) default settings, a backlog queued before start: calls' fill and share of quota.

    ``instant``: an endpoint answering at once with no quota to speak of, the
    ceiling of this machine with default settings (what a 5,000/s quota is
    compared with when it is not reached).
    """
    delay, rate_limit = (0.060, float(quota)) if quota else (0.0, 1e9)
    with stub_process(delay=delay, quota=rate_limit, record=True) as ses_url, database() as url:
        insert_accounts(url, BACKLOG, "backlog")
        with supervisor(url, ses_url):
            calls = wait_for(lambda: (c := received(ses_url)) and sum(len(a) for _, a in c) >= BACKLOG and c,
                             timeout=120, interval=0.5, what="backlog drained")
    first, last = calls[0][0], calls[-1][0]
    # The bucket starts full (one second's worth): the steady rate is measured after
    # the first second.  Arrivals are the starts of calls: the last call's span is out.
    steady = [(at, len(addresses)) for at, addresses in calls if at >= first + 1.0]
    rate = (sum(n for _, n in steady) - steady[-1][1]) / (last - steady[0][0])
    per_call = BACKLOG / len(calls)
    group = f"backlog quota {quota}/s" if quota else "backlog instant endpoint"
    measure(group, "destinations per call", per_call, "")
    measure(group, "rate", rate, "/s")
    if quota:
        measure(group, "share of quota", 100 * rate / quota, "%")
    print(f"\n{group}: {BACKLOG} destinations, {rate:,.0f}/s after the first second"
          f"{f' ({100 * rate / quota:.0f} % of quota)' if quota else ''}, {per_call:.1f} destinations"
          f" per call, {len(calls)} calls, {(last - first):.1f} s (load average {load_average()})")
