"""The test suite's plugins: real PostgreSQL databases, SES endpoints over HTTP, processes.

Tests connect to ``MAILROOM_TEST_DATABASE_URL``, else the local server when one answers,
else an embedded server started for the session (pgserver.py), and create a uniquely
named database for each test that needs one, so tests can run in parallel (pytest-xdist)
without seeing each other's rows.

The fixtures live beside the helpers they use, each module a plugin listed here:

- ``pgserver``: the session's server (pytest_configure / pytest_unconfigure).
- ``pgutil``: ``db`` (migrated) and ``fresh_db`` (empty), one database per test; ``conn`` to ``db``.
- ``ses_emulator``: ``moto`` / ``moto_module`` (moto's server) and ``stub`` (scripted SES).
- ``supervisor_util``: ``base_env`` (a subprocess's environment) and ``supervisors``.

Test modules import helpers from these modules, never from each other.
"""

import pytest

# pgutil first: pgserver imports it, and a plugin must not be imported before it is
# registered (its asserts would not be rewritten).
pytest_plugins = ["pgutil", "pgserver", "ses_emulator", "supervisor_util"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A selection that runs nothing is an error (4), not pytest's exit code 5: a renamed
    marker or a moved file must not turn a step of `.ci/run` into a quiet no-op.  Here
    rather than at collection: under pytest-xdist only the workers collect."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"no tests selected by {' '.join(session.config.invocation_params.args)!r}",
                                red=True)
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
