"""The sender's own overhead: destinations/s against an SES stub that answers at once.

The stub runs in its own process (canned XML, keep-alive), so what is measured is
the sender: building requests, boto3 serialising and signing them, HTTP, parsing the
answers, resolving outcomes.  Default concurrency (4 threads), a rate limit high
enough never to wait (but still consulted, as in production).  Run from the project
root::

    python -m pytest benchmarks/test_sender.py --benchmark-only

Target: >= 5,000 destinations/s on the 2-core reference machine for full calls.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the SES emulator
from ses_emulator import AWS_ENV, stub_process  # noqa: E402

from mailroom import wire  # noqa: E402
from mailroom.config import Settings  # noqa: E402
from mailroom.sender import SENT, Sender  # noqa: E402

DESTINATIONS = 10_000
SIGNER = wire.Signer(bytes.fromhex("deadbeef" * 8))


@pytest.fixture(scope="module")
def sender():
    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    try:
        with stub_process() as url:
            # No MAILROOM_SES_MAX_SEND_RATE: the quota is read from the stub (10^9/s).
            instance = Sender(Settings(ses_endpoint_url=url, ses_source="noreply@mailroom.test"))
            instance.start()
            yield instance
            instance.close()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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

    def run() -> None:
        futures = [sender.submit(batch) for batch in work]
        for future in futures:
            outcomes = future.result(120)
            assert outcomes[0].kind == SENT

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    name = f"{size} rows/batch{', mixed' if recovery_every else ''}"
    record(benchmark, "sender destinations", name, DESTINATIONS)
