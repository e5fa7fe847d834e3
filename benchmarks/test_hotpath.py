"""The hot path: sign + encode a 1,000-row batch, and decode that line.

Run from the project root, after ``python setup.py build_ext --inplace``::

    python -m pytest benchmarks/test_hotpath.py --benchmark-only

Both implementations run in the same session; the summary at the end gives rows/s
and the compiled/pure ratio (target: compiled >= 3,000,000 rows/s, >= 15x pure).
"""

from __future__ import annotations

import random

import pytest
from conftest import record

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


def test_sign_encode(benchmark, impl, rows):
    benchmark.group = f"sign+encode {ROWS} rows"
    signer = impl.Signer(KEY)
    line = benchmark(signer.encode_batch, rows)
    assert line.endswith(b"\n") and len(impl.decode_line(line)) == ROWS
    record(benchmark, "sign+encode", _name(impl), ROWS)


def test_decode(benchmark, impl, rows):
    benchmark.group = f"decode {ROWS} rows"
    line = impl.Signer(KEY).encode_batch(rows)
    decoded = benchmark(impl.decode_line, line)
    assert len(decoded) == ROWS
    record(benchmark, "decode", _name(impl), ROWS)
