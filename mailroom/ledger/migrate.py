"""Schema migrations, compatible with golang-migrate.

Migrations are ``N_name.up.sql`` / ``N_name.down.sql`` files.  The applied
version lives in ``schema_migrations (version bigint, dirty boolean)``, one row,
written exactly as golang-migrate's postgres driver writes it, and the same
advisory lock id is taken, so either tool can migrate the same database and
two runners never interleave.

For each step the runner records ``(target, dirty=true)`` in its own committed
transaction, then runs the file in one transaction.  Where golang-migrate marks
the version clean in a third transaction, this runner does it inside the
migration's own transaction, so a crash can no longer leave a fully applied
migration marked dirty; the table contents seen by anyone are the same.

Command line (``mailroom migrate ...``, see :func:`main`)::

    up [N] | down N | down --all | status | force V
"""

# At the house's ~400 lines: golang-migrate's contract (file names, lock id, version
# table, dirty flag) is kept whole in one module, beside the command line that drives it.

from __future__ import annotations

import argparse
import functools
import importlib.resources
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg
from psycopg import sql

from mailroom._process import add_version, one_line
from mailroom.config import redact

__all__ = [
    "DirtyError", "Migration", "MigrationError", "available", "current_version",
    "down", "force", "main", "status", "up",
]

# golang-migrate's postgres driver: table name and the salt of its lock id.
TABLE = "schema_migrations"
_LOCK_SALT = 1486364155
# golang-migrate's NilVersion: "no migration applied"; stored only when dirty.
_NIL = -1
_FILE_RE = re.compile(r"^([0-9]+)_(.*)\.(up|down)\.sql$")
_LOCK_WAIT_S = 15

Source = Path | Traversable | str | None
Progress = Callable[[str], None] | None


class MigrationError(Exception):
    """A migration could not be applied; the message is one line for the user."""


class DirtyError(MigrationError):
    """The database is marked dirty by a failed migration and must be forced."""

    def __init__(self, version: int | None, before: int | None, after: int | None) -> None:
        v, b, a = (_NIL if x is None else x for x in (version, before, after))
        super().__init__(
            f"database is dirty at version {v} (a migration failed): check the schema and "
            f"run `mailroom migrate force V` with the version it is really at (after a failed "
            f"up to {v} it is {b}, after a failed down to it {a}; -1 means none), then retry"
        )
        self.version = version


@dataclass(frozen=True)
class Migration:
    """One version: its number, name and the files that move to and from it."""

    version: int
    name: str
    up_file: Traversable | None
    down_file: Traversable | None

    @property
    def label(self) -> str:
        """``N_name`` as in the file names, e.g. ``0_init``."""
        return f"{self.version}_{self.name}"

    def sql(self, direction: str) -> str | None:
        """The SQL of ``up`` or ``down``; ``None`` when that file does not exist."""
        path = self.up_file if direction == "up" else self.down_file
        return None if path is None else path.read_text(encoding="utf-8")


# --------------------------------------------------------------------- source


def _default_source() -> Traversable:
    """The installed ``mailroom.migrations`` package, else ``<repo>/migrations``."""
    try:
        root = importlib.resources.files("mailroom.migrations")
        if any(entry.name.endswith(".sql") for entry in root.iterdir()):
            return root
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    # Running from a source tree that was never installed: the SQL is at the
    # top level (golang-migrate layout), beside the package directory.
    return Path(__file__).resolve().parents[2] / "migrations"


def available(source: Source = None) -> list[Migration]:
    """All migrations found in ``source`` (default: the package's), by version."""
    root = _default_source() if source is None else source
    root = Path(root) if isinstance(root, str) else root
    found: dict[int, dict[str, object]] = {}
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise MigrationError(f"no migrations directory at {root}") from exc
    for entry in entries:
        match = _FILE_RE.match(entry.name)
        if match is None or not entry.is_file():
            continue
        version, name, direction = int(match[1]), match[2], match[3]
        slot = found.setdefault(version, {"name": name})
        if slot["name"] != name or direction in slot:
            raise MigrationError(f"duplicate migration version {version} in {root}")
        slot[direction] = entry
    return [Migration(v, str(s["name"]), s.get("up"), s.get("down"))  # type: ignore[arg-type]
            for v, s in sorted(found.items())]


# -------------------------------------------------------------- version table


def _lock_id(conn: psycopg.Connection) -> int:
    """golang-migrate's advisory lock id for this database's version table.

    crc32 of ``schema NUL table NUL database`` times a fixed salt, modulo 2**32:
    the same number golang-migrate computes, so the two tools exclude each other.
    """
    row = conn.execute("SELECT current_database(), current_schema()").fetchone()
    assert row is not None
    database, schema = row
    if schema is None:
        raise MigrationError("no current schema: check search_path")
    key = "\x00".join([schema, TABLE, database]).encode()
    return (zlib.crc32(key) * _LOCK_SALT) % 2**32


def _read_state(conn: psycopg.Connection) -> tuple[int | None, bool]:
    if conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone() == (None,):
        return None, False
    row = conn.execute(f"SELECT version, dirty FROM {TABLE} LIMIT 1").fetchone()
    if row is None:
        return None, False
    version, dirty = row
    return (None if version == _NIL else int(version)), bool(dirty)


def current_version(conn: psycopg.Connection) -> int | None:
    """The applied version (``None``: nothing applied or no version table); see
    :func:`status` for whether it is dirty."""
    return _read_state(conn)[0]


def _set_version(conn: psycopg.Connection, version: int | None, dirty: bool) -> None:
    """Rewrite the single version row, as golang-migrate's ``SetVersion`` does.

    Must run inside a transaction.  DELETE rather than golang-migrate's
    TRUNCATE: same contents, but MVCC-safe and without an ACCESS EXCLUSIVE lock
    that would block a collector's schema check.
    """
    conn.execute(f"DELETE FROM {TABLE}")
    value = _NIL if version is None else version
    # A dirty "no version" is still written (-1, true), like golang-migrate,
    # so a failed down of the first migration is not mistaken for a clean db.
    if value >= 0 or dirty:
        conn.execute(f"INSERT INTO {TABLE} (version, dirty) VALUES (%s, %s)", (value, dirty))


@contextmanager
def _locked(conninfo: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection holding the migration advisory lock."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        lock = _lock_id(conn)
        # Bounded wait: a second runner says so instead of hanging; the
        # timeout is reset so it does not apply to the migrations' own DDL.
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{_LOCK_WAIT_S}s")))
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (lock,))
        except psycopg.errors.LockNotAvailable as exc:
            waited = f"waited {_LOCK_WAIT_S}s"
            raise MigrationError(f"another migration holds the lock ({waited})") from exc
        conn.execute("RESET lock_timeout")
        try:
            # golang-migrate creates the table the same way when it opens a db.
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} "
                "(version bigint not null primary key, dirty boolean not null)"
            )
            yield conn
        finally:
            if not conn.closed and not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (lock,))


def _position_to_line(sql: str, position: str | None) -> int | None:
    """Line number of PostgreSQL's 1-based character position in ``sql``."""
    pos = int(position) if position and position.isdigit() else 0
    return sql.count("\n", 0, pos - 1) + 1 if 0 < pos <= len(sql) else None


def _run_step(conn: psycopg.Connection, migration: Migration, direction: str,
              current: int | None, target: int | None) -> None:
    """Move the database from ``current`` to ``target`` with one file of ``migration``."""
    sql = migration.sql(direction)
    if sql is None or not sql.strip():
        # No file (or an empty one): golang-migrate only records the version.
        with conn.transaction():
            _set_version(conn, target, False)
        return
    with conn.transaction():
        _set_version(conn, target, True)
    filename = f"{migration.label}.{direction}.sql"
    try:
        with conn.transaction():
            conn.execute(sql)  # no parameters: sent as one simple-protocol query
            _set_version(conn, target, False)
    except psycopg.Error as exc:
        diag = exc.diag
        where = _position_to_line(sql, diag.statement_position)
        at = f" (line {where})" if where else ""
        message = one_line(diag.message_primary or str(exc))
        if diag.message_detail:
            message += ": " + one_line(diag.message_detail)
        # The file ran in one transaction, so the schema is still at `current`;
        # only the version row says otherwise (dirty), as golang-migrate's would.
        was = _NIL if current is None else current
        raise MigrationError(
            f"migration {filename} failed{at}: {message} (rolled back; the database is "
            f"marked dirty: fix the migration, run `mailroom migrate force {was}`, retry)"
        ) from exc


# ------------------------------------------------------------------ commands


def up(conninfo: str, steps: int | None = None, *, source: Source = None,
       progress: Progress = None) -> list[int]:
    """Apply up to ``steps`` pending migrations (all when ``None``).

    Returns the versions applied, in order; ``progress`` is called with
    ``"applied N_name"`` after each one commits.  Raises :class:`DirtyError` on
    a dirty database and :class:`MigrationError` when a migration fails.
    """
    if steps is not None and steps < 1:
        raise ValueError("steps must be >= 1")
    migrations = available(source)
    applied: list[int] = []
    with _locked(conninfo) as conn:
        version = _ready(conn, migrations)
        pending = [m for m in migrations if version is None or m.version > version]
        for migration in pending[:steps]:
            _run_step(conn, migration, "up", version, migration.version)
            version = migration.version
            applied.append(version)
            if progress:
                progress(f"applied {migration.label}")
    return applied


def down(conninfo: str, steps: int | None, all: bool = False,  # noqa: A002 - as `down --all`
         *, source: Source = None, progress: Progress = None) -> list[int]:
    """Revert ``steps`` migrations, or every one with ``all=True``.

    Going down from version V records the previous version (the table is left
    empty below the first one), like golang-migrate.  Returns the versions
    reverted, newest first.
    """
    if all == (steps is not None):
        raise ValueError("give either steps or all=True")
    if steps is not None and steps < 1:
        raise ValueError("steps must be >= 1")
    migrations = available(source)
    reverted: list[int] = []
    with _locked(conninfo) as conn:
        version = _ready(conn, migrations)
        applied = [m for m in migrations if version is not None and m.version <= version]
        applied.reverse()
        for index, migration in enumerate(applied[:steps]):
            target = applied[index + 1].version if index + 1 < len(applied) else None
            _run_step(conn, migration, "down", migration.version, target)
            reverted.append(migration.version)
            if progress:
                progress(f"reverted {migration.label}")
    return reverted


def status(conninfo: str, *, source: Source = None) -> tuple[int | None, bool, list[Migration]]:
    """``(version or None, dirty, pending migrations)``; read-only, takes no lock."""
    migrations = available(source)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        version, dirty = _read_state(conn)
    pending = [m for m in migrations if version is None or m.version > version]
    return version, dirty, pending


def force(conninfo: str, version: int | None) -> None:
    """Record ``version`` (``None`` or -1: no version) as clean, running nothing.

    The way out of a dirty state once the schema has been checked by hand
    (golang-migrate's ``force``).
    """
    if version is not None and version < _NIL:
        raise ValueError("version must be >= -1")
    target = None if version == _NIL else version
    with _locked(conninfo) as conn, conn.transaction():
        _set_version(conn, target, False)


def _ready(conn: psycopg.Connection, migrations: Sequence[Migration]) -> int | None:
    """The current version, once sure it is clean and one of ``migrations``."""
    version, dirty = _read_state(conn)
    versions = [m.version for m in migrations]
    if dirty:
        before = [v for v in versions if version is not None and v < version]
        after = [v for v in versions if version is None or v > version]
        raise DirtyError(version, before[-1] if before else None, after[0] if after else None)
    if version is not None and version not in versions:
        raise MigrationError(
            f"database is at version {version}, which none of the migration files has: "
            "is this mailroom older than the database?"
        )
    return version


# ----------------------------------------------------------------------- CLI


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailroom migrate", description="Apply the database schema migrations.",
        epilog="The database is MAILROOM_DATABASE_URL's."
    )
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_up = commands.add_parser("up", help="apply all (or N) pending migrations")
    p_up.add_argument("n", nargs="?", type=_positive, metavar="N", help="apply only the next N")
    p_down = commands.add_parser("down", help="revert N migrations, or --all")
    p_down.add_argument("n", nargs="?", type=_positive, metavar="N", help="revert the last N")
    p_down.add_argument("--all", action="store_true", help="revert every migration")
    commands.add_parser("status", help="show the version and pending migrations")
    p_force = commands.add_parser("force", help="set the version, clean, running nothing")
    p_force.add_argument("version", type=int, metavar="V", help="-1 for no version")
    for one in commands.choices.values():
        add_version(one)
    return parser


def parse(argv: list[str]) -> argparse.Namespace | int:
    """``mailroom migrate``'s command line, or the exit code when argparse has already
    answered (0 after ``--help``/``--version``, 2 after a usage error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "down" and args.all == (args.n is not None):
            parser.error("down needs N or --all (not both)")
        if args.command == "force" and args.version < _NIL:
            parser.error("force: V must be >= -1")
    except SystemExit as exc:  # argparse already printed the usage (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    return args


def main(argv: list[str], database_url: str) -> int:
    """Run ``mailroom migrate`` with ``argv`` (after ``migrate``).

    Returns the exit code: 0 done, 1 database or migration error (one line on
    stderr), 2 bad usage.
    """
    args = parse(argv)
    return args if isinstance(args, int) else run(args, database_url)


def run(args: argparse.Namespace, database_url: str) -> int:
    """Carry out parsed ``mailroom migrate`` arguments (see :func:`main`)."""
    say = functools.partial(print, flush=True)
    try:
        if args.command == "up":
            if not up(database_url, args.n, progress=say):
                say("no change")
        elif args.command == "down":
            if not down(database_url, args.n, all=args.all, progress=say):
                say("no change")
        elif args.command == "force":
            force(database_url, args.version)
            say(f"forced version {args.version}")
        else:
            version, dirty, pending = status(database_url)
            shown = "none" if version is None else str(version)
            say(f"status: version {shown}, {'dirty' if dirty else 'clean'}, {len(pending)} pending")
            for migration in pending:
                say(f"pending {migration.label}")
    except MigrationError as exc:
        print(f"mailroom: {redact(str(exc), database_url)}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        message = redact(one_line(str(exc)), database_url)
        print(f"mailroom: database error: {message}", file=sys.stderr)
        return 1
    return 0
