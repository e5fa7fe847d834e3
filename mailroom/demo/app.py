"""``mailroom demo``: the whole pipeline on one machine, with nothing installed but the package.

Starts, in this order: an embedded PostgreSQL (a temp data directory, or ``--data DIR`` kept
between runs) with the migrations, a local SES endpoint (moto's server, over real HTTP), the
real ``mailroom-supervisor`` as a subprocess, and a traffic generator; then the monitor in the
foreground, or without it (``--no-monitor``, or the monitor not installed) one status line a
second.  ``q`` in the monitor, Ctrl-C, SIGTERM or ``--seconds N`` stop everything in the
reverse order (traffic, supervisor with its in-flight batches, SES, PostgreSQL), remove the
temp directory and print what happened.  A demo killed outright (``kill -9``) leaves
nothing either: see :mod:`mailroom.demo.watchdog`.
"""

# A little over the house's ~400 lines: the demo's one sequence (start, watch, stop
# in order, summarise) reads best in one place.

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mailroom._process import add_version, die_with_parent
from mailroom.config import Settings
from mailroom.demo import watchdog

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mailroom.demo import report
    from mailroom.demo.embedded import EmbeddedPostgres
    from mailroom.demo.local_ses import LocalSes
    from mailroom.demo.traffic import Traffic

__all__ = ["main", "monitor_available", "run_monitor"]

log = logging.getLogger("mailroom.demo")
_SHUTDOWN_MS = 5000          # what the supervisor gets to finish in-flight batches
_CONFIG_SET = "mailroom-demo"  # the local SES publishes events through it (mailroom ses setup-events)
_SUPERVISOR_ENV = {
    # Small batch timeout so the demo looks live; the limit keeps batches readable.
    "MAILROOM_BATCH_TIMEOUT": "200",
    "MAILROOM_BATCH_LIMIT": "50",
    # moto's GetSendQuota says 1 email/s: the demo's local endpoint takes far more.
    "MAILROOM_SES_MAX_SEND_RATE": "1000",
    "MAILROOM_SEND_MAX_ATTEMPTS": "3",
    "MAILROOM_SHUTDOWN_TIMEOUT": str(_SHUTDOWN_MS),
}


# ---- MONITOR HOOK -------------------------------------------------------------------------
# The single place where the demo starts the monitor (mailroom.monitor).

def monitor_available() -> bool:
    """Whether the monitor (``mailroom.monitor`` and Textual) can be imported."""
    try:
        return (importlib.util.find_spec("mailroom.monitor") is not None
                and importlib.util.find_spec("textual") is not None)
    except ImportError:
        return False


def run_monitor(control_socket: str, database_url: str, *, stop: threading.Event | None = None) -> None:
    """Run the monitor in the foreground on the supervisor's ``control_socket`` and the ledger
    at ``database_url``; return when the user quits it (``q``) or ``stop`` is set (Ctrl-C
    outside the app, SIGTERM, ``--seconds``)."""
    from mailroom.monitor.app import MonitorApp

    # Operator keys on: the demo's supervisor is the user's own, and this is the place to try them.
    app = MonitorApp(control_socket, database_url, queue=Settings.queue_name, operate=True)
    if stop is not None:
        def quit_when_stopped() -> None:
            stop.wait()
            with contextlib.suppress(Exception):   # the app may have exited already
                app.call_from_thread(app.exit)

        threading.Thread(target=quit_when_stopped, name="demo-monitor-stop", daemon=True).start()
    app.run()

# ---- end of MONITOR HOOK ------------------------------------------------------------------


def _rate(text: str) -> float:
    value = float(text.removesuffix("/s"))
    if not 0 < value <= 10_000:
        raise argparse.ArgumentTypeError("must be between 0 and 10000 per second")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailroom demo",
        description="Run the whole pipeline locally: embedded PostgreSQL, local SES, traffic, supervisor.")
    parser.add_argument("--rate", type=_rate, default=20.0, metavar="N/s",
                        help="sign-ups and password recoveries per second (default 20)")
    parser.add_argument("--seconds", type=_seconds, metavar="N", help="stop by itself after N seconds")
    parser.add_argument("--no-monitor", action="store_true",
                        help="no monitor: one status line a second")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="keep the database in DIR between runs (default: a temp directory)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the supervisor's log (default: only when it fails)")
    add_version(parser)
    return parser


def _mailroom_argv() -> list[str]:
    """The ``mailroom`` command, found the way :func:`_supervisor_argv` finds its script."""
    found = shutil.which("mailroom", path=os.path.dirname(sys.executable))
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from mailroom.cli import main; main(sys.argv[1:])"]


def _supervisor_argv() -> list[str]:
    # The installed console script beside this interpreter (a venv's), else the same entry
    # point through this interpreter (a source tree on PYTHONPATH).
    found = shutil.which("mailroom-supervisor", path=os.path.dirname(sys.executable))
    if found:
        return [found]
    return [sys.executable, "-c", "from mailroom.cli import supervisor_main; supervisor_main()"]


class Demo:
    """The running parts; :meth:`stop` takes down whatever :meth:`start` got up."""

    def __init__(self, args: argparse.Namespace, halt: threading.Event) -> None:
        self.args = args
        self.halt = halt
        self.workdir = Path(tempfile.mkdtemp(prefix="mailroom-demo-"))
        self.workdir.chmod(0o711)        # the server user (under root) must reach pg/
        self.control_socket = str(self.workdir / "control.sock")
        self.supervisor_log = self.workdir / "supervisor.log"
        self.server: EmbeddedPostgres | None = None
        self.ses: LocalSes | None = None
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.traffic: Traffic | None = None
        self.database_url = ""
        self.events_queue_url = ""
        self.published: dict[str, int] = {}   # events the local SES published, by type
        self.after = 0                   # tokens above this id are this run's
        self.log_tail: list[str] = []    # the supervisor's last log lines, kept for a failure

    def start(self) -> None:
        """Bring everything up; returns early (with what started so far) when halted."""
        _become_subreaper()
        from mailroom.demo.embedded import EmbeddedPostgres
        from mailroom.demo.local_ses import LocalSes

        # moto's import and set-up take about as long as initdb: do them side by side.
        ses = self.ses = LocalSes()
        ses_error: list[BaseException] = []

        def start_ses() -> None:
            try:
                ses.start()
                self._push_templates()
                self.events_queue_url = self._wire_events()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which reports it
                ses_error.append(exc)

        ses_thread = threading.Thread(target=start_ses, name="demo-ses-start", daemon=True)
        ses_thread.start()
        data = self.args.data.resolve() if self.args.data else self.workdir / "pg"
        if self.args.data:
            data.parent.mkdir(parents=True, exist_ok=True)
        # Before the server exists: from now on a killed demo leaves nothing running.
        self.watchdog = watchdog.spawn(self.workdir, data)
        server = self.server = EmbeddedPostgres(data, durable=self.args.data is not None)
        self.database_url = server.start()
        print(f"demo: PostgreSQL {self.database_url} (data {data})", flush=True)
        from mailroom.ledger import migrate

        migrate.up(self.database_url)
        ses_thread.join()
        if ses_error:
            raise ses_error[0]
        print(f"demo: local SES {ses.url}", flush=True)
        print(f"demo: SES events -> SNS -> SQS {self.events_queue_url} (mailroom ses setup-events)", flush=True)
        if self.halt.is_set():
            return
        import psycopg

        from mailroom.demo import report

        with psycopg.connect(self.database_url) as conn:
            self.after = report.first_token_id(conn)
        self._start_supervisor()
        from mailroom.demo.traffic import Traffic

        traffic = self.traffic = Traffic(self.database_url, self.args.rate)
        traffic.start()
        print(f"demo: traffic {self.args.rate:g}/s; directory {self.workdir}", flush=True)

    def _ses_env(self) -> dict[str, str]:
        """This environment without its MAILROOM_* and AWS_* settings, pointed at the local SES."""
        from mailroom.demo.local_ses import AWS_ENV, SOURCE

        assert self.ses is not None
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MAILROOM_", "AWS_")) or k in ("MAILROOM_IMPL", "MAILROOM_LOG_LEVEL")}
        env.update(AWS_ENV)
        env.update({"MAILROOM_SES_ENDPOINT_URL": self.ses.url, "MAILROOM_SES_SOURCE": SOURCE,
                    "MAILROOM_SES_CONFIG_SET": _CONFIG_SET,
                    # SNS and SQS as boto3 finds them: setup-events and the events worker.
                    "AWS_ENDPOINT_URL_SNS": self.ses.aws_url, "AWS_ENDPOINT_URL_SQS": self.ses.aws_url})
        return env

    def _push_templates(self) -> None:
        """``mailroom templates push`` of the shipped templates to the local SES, as an
        operator pushes them to AWS: the demo sends with the same files."""
        from mailroom.templates.files import shipped_dir

        argv = [*_mailroom_argv(), "templates", "push", "--dir", str(shipped_dir())]
        done = subprocess.run(argv, env=self._ses_env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"mailroom templates push failed: {(done.stderr or done.stdout).strip()}")
        print("demo: mailroom templates push: " + ", ".join(done.stdout.split("\n")).strip(", "), flush=True)

    def _wire_events(self) -> str:
        """``mailroom ses setup-events`` against the local SES, SNS and SQS, as an operator
        runs it against AWS; returns the queue URL it prints."""
        done = subprocess.run([*_mailroom_argv(), "ses", "setup-events"], env=self._ses_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        prefix = "MAILROOM_SES_EVENTS_QUEUE_URL="
        urls = [line[len(prefix):] for line in done.stdout.splitlines() if line.startswith(prefix)]
        if done.returncode != 0 or not urls:
            raise RuntimeError(f"mailroom ses setup-events failed: {(done.stderr or done.stdout).strip()}")
        return urls[-1]

    def _start_supervisor(self) -> None:
        env = self._ses_env()
        env.update(_SUPERVISOR_ENV)
        env.update({
            "MAILROOM_DATABASE_URL": self.database_url,
            "MAILROOM_SECRET_KEY": secrets.token_hex(32),
            "MAILROOM_SES_OUTPUT_PATH": str(self.workdir / "output"),
            "MAILROOM_CONTROL_SOCKET": self.control_socket,
            "MAILROOM_SES_EVENTS_QUEUE_URL": self.events_queue_url,   # the events worker's queue
            "PYTHONUNBUFFERED": "1",
        })
        out = None if self.args.verbose else open(self.supervisor_log, "wb")  # noqa: SIM115
        try:
            # Its own session: Ctrl-C in the terminal reaches the demo only, which then stops
            # the supervisor with one SIGTERM after the traffic (a second signal would make
            # the supervisor drop its in-flight batches).
            self.supervisor = subprocess.Popen(_supervisor_argv(), env=env, stdin=subprocess.DEVNULL,
                                               stdout=out, stderr=out, start_new_session=True,
                                               cwd=self.workdir, preexec_fn=die_with_parent)
        finally:
            if out is not None:
                out.close()
        if self.watchdog is not None and self.watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                self.watchdog.stdin.write(f"supervisor {self.supervisor.pid}\n".encode())
                self.watchdog.stdin.flush()
        print(f"demo: mailroom-supervisor pid {self.supervisor.pid}", flush=True)

    def problem(self) -> str | None:
        """Why the demo cannot go on (the supervisor or the traffic died), else None."""
        if self.supervisor is not None and self.supervisor.poll() is not None:
            return f"mailroom-supervisor exited with code {self.supervisor.returncode}"
        if self.traffic is not None and self.traffic.error is not None:
            return f"traffic generator failed: {self.traffic.error}"
        return None

    def stop(self) -> tuple[int | None, report.Summary | None]:
        """Stop in order; return (supervisor exit code, summary or None). Never raises."""
        summary = None
        code = None
        with _step("traffic"):
            if self.traffic is not None:
                self.traffic.stop()
        with _step("supervisor"):
            code = self._stop_supervisor()
        with _step("summary"):
            if self.server is not None and self.database_url and self.supervisor is not None:
                import psycopg

                from mailroom.demo import report

                with psycopg.connect(self.database_url) as conn:
                    summary = report.summary(conn, self.after)
        with _step("local SES"):
            if self.ses is not None:
                if self.ses.relay is not None:
                    self.published = dict(self.ses.relay.published)
                self.ses.stop()
        with _step("PostgreSQL"):
            if self.server is not None:
                self.server.stop()
        with _step("temp directory"):
            if self.supervisor_log.exists():
                self.log_tail = self.supervisor_log.read_text(errors="replace").splitlines()[-20:]
            shutil.rmtree(self.workdir, ignore_errors=True)
        with _step("watchdog"):
            # Everything is stopped: EOF tells it so; it finds nothing left and exits.
            if self.watchdog is not None:
                if self.watchdog.stdin is not None:
                    self.watchdog.stdin.close()
                self.watchdog.wait(30)
        with _step("reaping"):
            _reap_children()
        return code, summary

    def _stop_supervisor(self) -> int | None:
        proc = self.supervisor
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_SHUTDOWN_MS / 1000 + 10)
            except subprocess.TimeoutExpired:
                log.warning("mailroom-supervisor did not stop in time: killing its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode


def _become_subreaper() -> None:
    # pg_ctl leaves the postmaster to be adopted by PID 1, which reaps it whenever it gets to
    # it.  As a subreaper the demo adopts it instead and reaps it at the end, so nothing,
    # not even a zombie, outlives the demo.  Linux only; elsewhere PID 1 does it.
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)       # PR_SET_CHILD_SUBREAPER


def _reap_children(timeout: float = 10.0) -> None:
    """Wait for every child process that is left (the adopted postmaster, once it has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return                       # no children left
        if pid == 0:
            time.sleep(0.05)             # one is still exiting: poll until the deadline


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    # One failing step of the shutdown must not leave the later ones undone.
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported, and the shutdown goes on
        log.error("stopping %s: %s", what, exc)


def _watch_for_q(halt: threading.Event) -> None:
    """Headless on a terminal: ``q`` then Enter stops the demo like Ctrl-C."""
    def read() -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in sys.stdin:
                if line.strip().lower() in ("q", "quit"):
                    halt.set()
                    return

    if sys.stdin is not None and sys.stdin.isatty():
        threading.Thread(target=read, name="demo-keys", daemon=True).start()
        print("demo: q then Enter, or Ctrl-C, stops it", flush=True)


def _headless(demo: Demo, halt: threading.Event, seconds: float | None) -> None:
    import psycopg

    from mailroom.demo import report

    _watch_for_q(halt)

    deadline = None if seconds is None else time.monotonic() + seconds
    with psycopg.connect(demo.database_url, autocommit=True) as conn:
        while not halt.is_set():
            timeout = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if timeout <= 0 or halt.wait(timeout):
                break
            problem = demo.problem()
            if problem:
                print(f"demo: {problem}", file=sys.stderr, flush=True)
                break
            print(f"{time.strftime('%H:%M:%S')}  {report.counts(conn, demo.after).line()}", flush=True)


def _print_summary(summary: report.Summary, elapsed: float, started_wall: float,
                   published: dict[str, int]) -> None:
    c = summary.counts
    print(f"\nmailroom demo ran {elapsed:.1f} s", flush=True)
    print(f"  tokens created  {c.created}")
    print(f"  sent            {c.sent}")
    print(f"  failed          {c.failed}")
    print(f"  skipped         {c.skipped}")
    print(f"  still queued    {c.queued}")
    print("  SES events      " + ", ".join(f"{published.get(kind, 0)} {kind.lower()}"
                                           for kind in ("Delivery", "Bounce", "Complaint"))
          + " published by the local SES; recorded in the ledger:")
    print(f"  delivered       {c.delivered}")
    print(f"  bounced         {c.bounced}")
    print(f"  complained      {c.complained}")
    print(f"  suppressed      {c.suppressed} addresses; {c.skipped_suppressed} emails to them skipped,"
          f" {c.sent_after_suppression} sent after suppression")
    if summary.p50_ms is not None:
        print(f"  latency         p50 {summary.p50_ms:.0f} ms, p99 {summary.p99_ms:.0f} ms"
              " (token created -> sent in the ledger)")
    if summary.first_sent_epoch is not None:
        print(f"  first email     {summary.first_sent_epoch - started_wall:.1f} s after the demo started")
    sys.stdout.flush()


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc and the boot clock), else 0: "first
    email after N s" then counts the interpreter's start and imports too, as the user waits."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """``mailroom demo [--rate N/s] [--seconds N] [--no-monitor] [--data DIR] [--verbose]``."""
    age = _process_age()
    started_wall, started = time.time() - age, time.monotonic() - age
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [DEMO] %(message)s", "%Y/%m/%d %H:%M:%S"))
    logging.getLogger("mailroom.demo").addHandler(handler)
    logging.getLogger("mailroom.demo").setLevel(logging.INFO)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # moto's per-request lines

    halt = threading.Event()
    # Handlers only set the flag; the main thread stops everything in order.
    previous = {sig: signal.signal(sig, lambda *_: halt.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    use_monitor = not args.no_monitor and sys.stdout.isatty() and monitor_available()
    if not args.no_monitor and not use_monitor:
        why = "not installed" if not monitor_available() else "stdout is not a terminal"
        print(f"demo: no monitor ({why}): one status line a second", flush=True)
    demo = Demo(args, halt)
    failure = None
    try:
        demo.start()
        if not halt.is_set():
            if use_monitor:
                if args.seconds is not None:
                    timer = threading.Timer(args.seconds, halt.set)
                    timer.daemon = True
                    timer.start()
                run_monitor(demo.control_socket, demo.database_url, stop=halt)
            else:
                _headless(demo, halt, args.seconds)
        failure = demo.problem()
    except Exception as exc:  # noqa: BLE001 - one line, then the orderly stop below
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        code, summary = demo.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
    if failure is None and code not in (0, None):
        failure = f"mailroom-supervisor exited with code {code}"
    if summary is not None:
        _print_summary(summary, time.monotonic() - started, started_wall, demo.published)
    if failure is not None:
        if demo.log_tail:
            print("demo: the supervisor's last log lines:", *demo.log_tail, sep="\n  ", file=sys.stderr)
        print(f"demo: {failure}", file=sys.stderr, flush=True)
        return 1
    # A run that went its --seconds yet sent nothing is broken (Ctrl-C may come before any).
    if not halt.is_set() and summary is not None and summary.counts.created and not summary.counts.sent:
        print("demo: no email was sent", file=sys.stderr, flush=True)
        return 1
    return 0
