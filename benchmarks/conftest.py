"""Benchmark helpers: the implementations to compare and a rows/s summary at the end."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

# (group, implementation) -> rows per second, filled in by the benchmarks.
RESULTS: dict[tuple[str, str], float] = {}


@pytest.fixture(params=["c", "python"])
def impl(request):
    """The compiled and the pure-Python implementation, in the same run."""
    if request.param == "python":
        from mailroom import _wire_py

        return _wire_py
    try:
        from mailroom import _wire
    except ImportError as exc:
        if os.environ.get("MAILROOM_IMPL", "").strip().lower() == "c":
            pytest.fail(f"MAILROOM_IMPL=c but the compiled extension is not built: {exc}")
        pytest.skip("compiled extension not built: python setup.py build_ext --inplace")
    return _wire


def record(benchmark, group: str, name: str, rows: int) -> None:
    """Store rows/s in extra_info and the summary.

    rows/s comes from the median time of one call: on a shared machine a few rounds
    are stretched by other processes, which moves the mean but not the median (the
    mean-based figure is kept too, as ``rows_per_s_mean``).
    """
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    rate = rows / stats.stats.median
    benchmark.extra_info["rows"] = rows
    benchmark.extra_info["rows_per_s"] = round(rate)
    benchmark.extra_info["rows_per_s_mean"] = round(rows / stats.stats.mean)
    RESULTS[(group, name)] = rate


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for (group, name), rate in RESULTS.items():
        groups[group][name] = rate
    terminalreporter.section("rows per second (from the median time per batch)")
    for group, rates in groups.items():
        parts = [f"{name}: {rate:,.0f} rows/s" for name, rate in sorted(rates.items())]
        if "c" in rates and "python" in rates:
            parts.append(f"compiled/pure = {rates['c'] / rates['python']:.1f}x")
        terminalreporter.write_line(f"{group}: " + ", ".join(parts))
