"""Benchmark helpers: the implementations to compare, a rows/s summary at the end,
and the performance targets of the issues, checked against what was measured.

A measured target that is missed fails the run (exit status 1) after the summary
says which; a target whose benchmarks did not run (``-k``, ``--benchmark-disable``)
is not judged."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

# (group, implementation) -> rows per second, filled in by the benchmarks.
RESULTS: dict[tuple[str, str], float] = {}

#: (group, name) -> the least rows/s the issues ask for on the 2-core machine.
MINIMUM_RATES: dict[tuple[str, str], float] = {
    ("sign+encode", "c"): 3_000_000,
    ("drain limit 1000", "100k"): 100_000,
    ("drain limit 10", "100k"): 10_000,
    ("sender destinations", "50 rows/batch"): 5_000,
}

#: (group, name) -> (value, unit): measurements other than rates (latencies, shares).
MEASURES: dict[tuple[str, str], tuple[float, str]] = {}

#: (group, name) -> the most a measurement may be (issue 13: latency with default settings).
MAXIMUM_MEASURES: dict[tuple[str, str], float] = {
    ("latency 2/s", "adaptive p99"): 50.0,
    ("latency 100/s", "adaptive p99"): 50.0,
    ("20-token transaction", "adaptive max"): 100.0,
}

#: (group, name) -> the least a measurement may be (issue 13: a 1,000/s quota used, full calls).
MINIMUM_MEASURES: dict[tuple[str, str], float] = {
    ("backlog quota 1000/s", "share of quota"): 95.0,
    ("backlog quota 1000/s", "destinations per call"): 45.0,
}

#: (group, faster, slower, factor): ``faster`` must reach ``factor`` x ``slower``.
MINIMUM_RATIOS: list[tuple[str, str, str, float]] = [
    ("sign+encode", "c", "python", 15.0),           # compiled vs its pure-Python twin
    ("drain limit 1000", "1M", "100k", 0.8),        # the cost stays flat: within 20 %
    ("drain limit 10", "1M", "100k", 0.8),
]


@pytest.fixture(params=["c", "python"])
def impl(request):
    """The compiled and the pure-Python implementation, in the same run."""
    if request.param == "python":
        from mailroom.wire import _py as _wire_py

        return _wire_py
    try:
        from mailroom.wire import _wire
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


def measure(group: str, name: str, value: float, unit: str) -> None:
    """Store a measurement for the summary (and its target, if it has one)."""
    MEASURES[(group, name)] = (value, unit)


def verdicts() -> list[tuple[bool, str]]:
    """(met, text) for every target whose measurements are in :data:`RESULTS`."""
    found = []
    for (group, name), minimum in MINIMUM_RATES.items():
        if (rate := RESULTS.get((group, name))) is not None:
            found.append((rate >= minimum,
                          f"{group}, {name}: {rate:,.0f} rows/s, target >= {minimum:,.0f}"))
    for (group, name), most in MAXIMUM_MEASURES.items():
        if (found_value := MEASURES.get((group, name))) is not None:
            value, unit = found_value
            found.append((value <= most, f"{group}, {name}: {value:,.1f} {unit}, target <= {most:,.0f} {unit}"))
    for (group, name), least in MINIMUM_MEASURES.items():
        if (found_value := MEASURES.get((group, name))) is not None:
            value, unit = found_value
            found.append((value >= least, f"{group}, {name}: {value:,.1f} {unit}, target >= {least:,.0f} {unit}"))
    for group, faster, slower, factor in MINIMUM_RATIOS:
        top, base = RESULTS.get((group, faster)), RESULTS.get((group, slower))
        if top is not None and base is not None:
            found.append((top >= factor * base,
                          f"{group}, {faster} / {slower}: {top / base:.2f}x, target >= {factor:g}x"))
    return found


def pytest_sessionfinish(session) -> None:
    if session.exitstatus == pytest.ExitCode.OK and not all(met for met, _ in verdicts()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASURES:
        terminalreporter.section("measurements")
        for (group, name), (value, unit) in MEASURES.items():
            terminalreporter.write_line(f"{group}, {name}: {value:,.1f} {unit}")
    if not RESULTS and not MEASURES:
        return
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for (group, name), rate in RESULTS.items():
        groups[group][name] = rate
    if groups:
        terminalreporter.section("rows per second (from the median time per batch)")
    for group, rates in groups.items():
        parts = [f"{name}: {rate:,.0f} rows/s" for name, rate in sorted(rates.items())]
        if "c" in rates and "python" in rates:
            parts.append(f"compiled/pure = {rates['c'] / rates['python']:.1f}x")
        terminalreporter.write_line(f"{group}: " + ", ".join(parts))
    judged = verdicts()
    if judged:
        terminalreporter.section("targets")
        for met, text in judged:
            terminalreporter.write_line(("met     " if met else "MISSED  ") + text,
                                        green=met, red=not met)
        missed = sum(1 for met, _ in judged if not met)
        if missed:
            terminalreporter.write_line(f"{missed} target(s) missed: the run fails", red=True)
