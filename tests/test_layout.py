"""The house's layout rules that import-linter cannot see (DESIGN.md 3, STYLE.md).

The import contracts themselves are in pyproject.toml and run by ``lint-imports``
in .ci/run; here: what a process really loads, and the length of modules.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mailroom"
#: The house's module length; past it a module says why at its head.
MAX_LINES = 400
#: How a module says it (STYLE.md): "... the house's ~400 lines: <the reason>".
REASON_MARK = "~400 lines"
#: Not in the supervisor's parent: no database, no SES (the workers load them after the fork).
HEAVY = ("psycopg", "boto3", "botocore")


def _loaded_by(module: str) -> list[str]:
    """The top-level packages loaded by importing ``module`` in a fresh interpreter."""
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted({name.partition('.')[0] for name in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code, module], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    loaded: list[str] = json.loads(out)
    return loaded


@pytest.mark.parametrize("module", ["mailroom.supervisor.arbiter", "mailroom.supervisor.operator",
                                    "mailroom.supervisor.router", "mailroom.supervisor.messages"])
def test_the_supervisor_parent_loads_neither_psycopg_nor_boto3(module: str) -> None:
    loaded = _loaded_by(module)
    assert "mailroom" in loaded  # the import ran
    assert [name for name in HEAVY if name in loaded] == []


def test_the_check_sees_what_a_worker_loads() -> None:
    """The check above can fail: the ledger's operations, loaded by the collector, pull in psycopg.

    (boto3 is imported only where a client is made, in the sender; its static imports,
    function-level ones too, are lint-imports' to check.)
    """
    assert "psycopg" in _loaded_by("mailroom.ledger.operations")


def _head(source: str) -> str:
    """The docstring and the comments above a module's first statement after it."""
    body = ast.parse(source).body
    first = body[0] if body else None
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        body = body[1:]
    end = body[0].lineno - 1 if body else len(source.splitlines())
    return "\n".join(source.splitlines()[:end])


def test_no_module_past_the_house_length_without_its_reason_at_its_head() -> None:
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_LINES and REASON_MARK not in _head(source):
            unexplained.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines")
    assert unexplained == [], (f"past {MAX_LINES} lines, with no '{REASON_MARK}: why' in the docstring or"
                               f" the comments before the first import: {unexplained}")


def test_the_head_is_only_the_docstring_and_leading_comments() -> None:
    source = '"""Doc."""\n\n# ~400 lines: why\n\nimport os\n# ~400 lines, too late\n'
    assert REASON_MARK in _head(source)
    assert "too late" not in _head(source)
    assert REASON_MARK not in _head('"""Doc."""\nimport os\n# ~400 lines\n')


@pytest.mark.parametrize("parallel", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_selection_that_runs_nothing_fails_ci(parallel: list[str]) -> None:
    """pytest's exit code 5 ("no tests ran") would pass for a step of `.ci/run` whose marker
    or file went away if anyone allowed it; tests/conftest.py makes it a usage error (4)."""
    here = pathlib.Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *parallel,
                           "-m", "no_such_marker", str(here / "test_vocabulary.py")],
                          capture_output=True, text=True, timeout=120, cwd=here.parent)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "no tests selected by" in done.stdout + done.stderr
