"""The sender's own overhead: destinations/s against an SES stub that answers at once.

The stub runs in its own process (canned XML, keep-alive), so what is measured is
the sender: building requests, boto3 serialising and signing them, HTTP, parsing the
answers, resolving outcomes.  Four sending threads (set, not auto), a rate limit high
enough never to wait (but still consulted, as in production).

The floor, :class:`floors.BareSes`: the very same ``SendBulkTemplatedEmail`` calls,
built in advance, made by as many bare threads through a client built the sender's
way, against the same stub.  It runs before each timed round (untimed by
pytest-benchmark, timed apart).  Target: the sender reaches >= 70 % of it, for each
batch shape.  Run from the project root::

    python -m pytest benchmarks/test_sender.py --benchmark-only
"""

from __future__ import annotations

import pytest
from conftest import Rounds, record, record_rate, timed
from floors import BareSes
from ses_emulator import restore_env, stub_process, use_aws_env

from mailroom import wire
from mailroom.config import Settings
from mailroom.sender import Sender, ses
from mailroom.vocabulary import OutcomeKind

DESTINATIONS = 10_000
SIGNER = wire.Signer(bytes.fromhex("deadbeef" * 8))


@pytest.fixture(scope="module")
def stub_url():
    """The canned-answer stub in its own process, with AWS credentials set for boto3."""
    saved = use_aws_env()
    try:
        with stub_process() as url:
            yield url
    finally:
        restore_env(saved)


@pytest.fixture(scope="module")
def sender(stub_url):
    # No MAILROOM_SES_MAX_SEND_RATE: the quota is read from the stub (10^9/s).
    # Four threads on both sides (auto would size them from the instant stub's latency).
    instance = Sender(Settings(ses_endpoint_url=stub_url, ses_source="noreply@mailroom.test", ses_concurrency=4))
    instance.start()
    yield instance
    instance.close()


def bare_calls(settings: Settings, work: list[list[tuple]]) -> list[dict]:
    """The calls the sender makes for ``work``: per batch, by action, <= 50 destinations."""
    calls = []
    for batch in work:
        groups: dict[int, list[dict]] = {}
        for action, email, login, token, code in batch:
            data = ses.template_data(action, login, token, code)
            groups.setdefault(action, []).append(ses.destination(ses.normalize_address(email), data))
        for action, destinations in groups.items():
            for i in range(0, len(destinations), ses.MAX_DESTINATIONS):
                calls.append(ses.bulk_request(settings, action, destinations[i : i + ses.MAX_DESTINATIONS]))
    return calls


def batches(size: int, recovery_every: int) -> list[list[tuple]]:
    """Decoded batches as the sender gets them: ``recovery_every``-th row a recovery."""
    rows = []
    for n in range(DESTINATIONS):
        action = 2 if recovery_every and n % recovery_every == 0 else 1
        token = SIGNER.sign(action, n.to_bytes(32, "big"), f"{n % 100000:05d}")
        rows.append((action, f"user.{n}@example.test", f"user{n}", token, f"{n % 100000:05d}"))
    return [rows[i : i + size] for i in range(0, DESTINATIONS, size)]


@pytest.mark.parametrize(
    "size, recovery_every",
    [(50, 0), (50, 3), (10, 3)],
    ids=["50-rows-one-action", "50-rows-mixed", "10-rows-mixed"],
)
def test_sender_throughput(benchmark, sender, size, recovery_every):
    """10,000 destinations submitted at once; the round ends when all are resolved.

    ``50-rows-one-action``: every call carries 50 destinations (the best case);
    ``mixed``: a third are recoveries, so a batch takes two calls; ``10-rows``: the
    default collector batch size, small calls.
    """
    work = batches(size, recovery_every)
    bare = BareSes(sender.settings, bare_calls(sender.settings, work), sender.settings.ses_concurrency)
    floor = Rounds()

    def setup():
        timed(floor, bare.run)
        return (), {}

    def run() -> None:
        futures = [sender.submit(batch) for batch in work]
        for future in futures:
            outcomes = future.result(120)
            assert outcomes[0].kind == OutcomeKind.SENT

    bare.run()     # warm-up: the client's connections
    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    name = f"{size} rows/batch{', mixed' if recovery_every else ''}"
    rate = record(benchmark, "sender", name, DESTINATIONS, "destinations")
    if rate is not None:
        floor_rate = floor.rate(DESTINATIONS)
        benchmark.extra_info.update(bare_boto3_per_s=round(floor_rate), share_of_bare=round(rate / floor_rate, 3))
        record_rate("sender", f"{name}: bare boto3", floor_rate, "destinations")
