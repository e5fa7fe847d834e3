"""The hot path: sign + encode 1,000-row batches, and decode such a line.

Run from the project root, after ``python setup.py build_ext --inplace``::

    python -m pytest benchmarks/test_hotpath.py --benchmark-only

Each sign+encode round is preceded, untimed by pytest-benchmark, by a round of the
SHA-256 floor for the same rows (two compressions per row: the part of HMAC no
implementation can skip), timed on its own.  Targets: the compiled implementation
reaches a share of that floor, and >= 15x the pure-Python twin, comparing the two
implementations by their shares so that load differing between the tests cancels.
"""

from __future__ import annotations

import random

import pytest
from conftest import Rounds, record, record_rate, timed
from floors import sha256_floor

ROWS = 1000
KEY = bytes.fromhex("deadbeef" * 8)

FIRST = ["john", "jane", "emma", "sarah", "li", "olivia", "mateo", "zoë", "amir", "chloé", "noah", "aiko"]
LAST = ["doe", "smith", "jones", "connor", "wang", "garcía", "müller", "okafor", "rossi", "tanaka", "nguyen"]
DOMAINS = ["gmail.com", "example.test", "fakemail.test", "outlook.com", "yahoo.co.jp", "uni-heidelberg.de"]


def make_rows(count: int = ROWS, seed: int = 2024) -> list[tuple]:
    """Realistic claimed rows: (action, email, login, secret, code, token id).

    About a third are password recoveries; a few logins need quoting, as a comma in a
    display-name-like login would in production.
    """
    rng = random.Random(seed)
    rows = []
    for token_id in range(1, count + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first}.{last}{rng.randrange(10000)}@{rng.choice(DOMAINS)}"
        login = f"{first}{last}{rng.randrange(100)}" if rng.random() > 0.01 else f"{last}, {first}"
        action = 2 if rng.random() < 0.35 else 1
        rows.append((action, email, login, rng.randbytes(32), f"{rng.randrange(100000):05d}", token_id))
    return rows


@pytest.fixture(scope="module")
def rows() -> list[tuple]:
    return make_rows()


def _name(impl) -> str:
    return "python" if impl.__name__.endswith("_py") else "c"


#: Batches per timed round: a round of the compiled path lasts about a millisecond,
#: long enough for the clock, short enough for many rounds.  The pure-Python twin is
#: ~20x slower: one batch a round.
BATCHES = {"c": 10, "python": 1}
ROUNDS = {"c": 200, "python": 100}
#: The floor round hashes for as many rows times this, so that it lasts about as long
#: as the round it precedes: load that comes and goes then hits both sides alike.
FLOOR_REPEAT = {"c": 2, "python": 50}


def test_sign_encode(benchmark, impl, rows):
    name = _name(impl)
    benchmark.group = f"sign+encode {ROWS}-row batches"
    signer = impl.Signer(KEY)
    count = BATCHES[name] * ROWS
    floor = Rounds()

    def setup():
        timed(floor, sha256_floor, count * FLOOR_REPEAT[name])
        return (), {}

    def run():
        for _ in range(BATCHES[name]):
            line = signer.encode_batch(rows)
        return line

    line = benchmark.pedantic(run, setup=setup, rounds=ROUNDS[name], warmup_rounds=2)
    assert line.endswith(b"\n") and len(impl.decode_line(line)) == ROWS
    rate = record(benchmark, "sign+encode", name, count)
    if rate is not None:
        floor_rate = floor.rate(count * FLOOR_REPEAT[name])
        benchmark.extra_info.update(sha256_floor_rows_per_s=round(floor_rate),
                                    share_of_sha256_floor=round(rate / floor_rate, 3))
        record_rate("sign+encode", f"{name}: sha256 floor", floor_rate)
        record_rate("sign+encode share", name, rate / floor_rate, "ratio")


def test_decode(benchmark, impl, rows):
    benchmark.group = f"decode {ROWS} rows"
    line = impl.Signer(KEY).encode_batch(rows)
    decoded = benchmark(impl.decode_line, line)
    assert len(decoded) == ROWS
    record(benchmark, "decode", _name(impl), ROWS)
