"""The arbiter of ``mailroom-supervisor``: fork, watch and restart the workers (collector
and sender; the events worker too when ``MAILROOM_SES_EVENTS_QUEUE_URL`` is set).

The shape is gunicorn's arbiter: signal handlers only queue the signal and poke a
wake-up pipe; the main loop waits on the workers' pipes and that wake-up pipe
(dramatiq's ``multiprocessing.connection.wait``), dispatches ``handle_<signal>``,
reaps exited workers, restarts them with capped exponential backoff, and kills a
worker whose heartbeats stop. A worker exiting with a boot-error code (bad
configuration, missing schema) halts the supervisor instead of a restart loop.

Batches are the router's business (:mod:`mailroom.supervisor.router`): the arbiter
reads the pipes, hands batch messages to it and tells it when a worker came or went.

This module imports neither psycopg nor boto3: the supervisor holds no database
connection, no SES client and no thread; the workers create theirs after the fork.
"""

# Past the house's ~400 lines: processes, signals, restarts, the watchdog, the stop
# phases of one loop and the emergency stop when that loop fails belong together
# (each reads and changes the same worker slots); batches and operator commands
# are already elsewhere (router.py, operator.py).

from __future__ import annotations

import dataclasses
import enum
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection, wait

from mailroom import config
from mailroom._process import SignalFlag, backoff
from mailroom.config import Settings
from mailroom.supervisor import messages as msg
from mailroom.supervisor.operator import Operator, StartError
from mailroom.supervisor.router import Router
from mailroom.vocabulary import RestartReason, Role

log = logging.getLogger("mailroom.supervisor")

#: Restart backoff (seconds): first delay, cap, and the uptime after which a
#: worker counts as healthy again (its backoff starts over).
RESTART_FIRST = 0.5
RESTART_CAP = 30.0
HEALTHY_AFTER = 60.0
#: After the stop message, how long a worker gets before SIGKILL.
STOP_GRACE = 10.0
#: The watchdog's SIGUSR1 makes a silent worker write every thread's stack to the
#: log (faulthandler, registered in workers.py); SIGKILL follows this many seconds
#: later. The dump is written by a C signal handler, GIL or not, in microseconds:
#: the second is for a worker that is swapped out, not for the dump itself.
STACK_DUMP_GRACE = 1.0
#: Exit codes that mean "restarting will not help": halt with the same code.
BOOT_ERRORS = {
    config.EXIT_CONFIG: "invalid configuration",
    config.EXIT_SCHEMA: "database schema missing or outdated (run `mailroom migrate up`)",
}
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGQUIT, signal.SIGHUP)


@dataclasses.dataclass
class Worker:
    """One supervised worker slot (the process in it changes on restart)."""

    role: Role
    process: multiprocessing.process.BaseProcess | None = None
    pipe: Connection | None = None
    started_at: float = 0.0
    last_seen: float = 0.0
    failures: int = 0
    restart_at: float | None = 0.0   # None: do not (re)start
    exited: bool = True
    stats: msg.WorkerStats | None = None  # from its last heartbeat
    restarts: int = 0
    restart_requested: bool = False  # stopped on purpose: start again at once
    dump_asked_at: float | None = None  # the watchdog asked for its stack (SIGUSR1)

    @property
    def up(self) -> bool:
        return self.pipe is not None and not self.exited


class Phase(enum.Enum):
    """Where the supervisor is in its life; a stop goes through the last three in order."""

    RUNNING = "running"
    DRAIN = "drain"  # no new claims; the sender finishes what is in flight
    STOP_SENDER = "stop_sender"  # the sender was told to stop; its last outcomes come in
    STOP_COLLECTOR = "stop_collector"  # the collector records the rest and exits


def describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def sd_notify(message: str) -> None:
    """Tell systemd (``Type=notify``) about readiness/stopping; no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


class Supervisor:
    """The arbiter. ``run()`` returns the process exit code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("fork")
        self.workers = {Role.COLLECTOR: Worker(Role.COLLECTOR), Role.SENDER: Worker(Role.SENDER)}
        if settings.ses_events_queue_url:
            # Independent of the other two: it reads SQS and writes the ledger, no batches.
            self.workers[Role.EVENTS] = Worker(Role.EVENTS)
        self.operator = Operator(self)
        self.router = Router(self.send, on_event=self.operator.on_router_event,
                             on_finished=self.operator.on_batch_finished,
                             on_released=self.operator.on_batch_released)
        self.signals = SignalFlag()
        self.phase = Phase.RUNNING
        self.deadline = 0.0
        self.exit_code = config.EXIT_OK
        self.done = False
        self.announced_ready = False

    @property
    def stopping(self) -> bool:
        return self.phase is not Phase.RUNNING

    # -- signals: handlers only record, the loop acts ------------------------------
    def install_signals(self) -> None:
        self.signals.install(HANDLED_SIGNALS)

    def handle_term(self) -> None:
        if self.stopping:
            self.handle_quit()
            return
        self.begin_stop(self.settings.shutdown_timeout / 1000)
        sd_notify("STOPPING=1")
        log.info("stopping: no new claims, %d batches in flight (waiting up to %.1fs)",
                    len(self.router), self.settings.shutdown_timeout / 1000)

    handle_int = handle_term

    def handle_quit(self) -> None:
        log.warning("second stop signal: stopping at once (claimed rows are queued"
                       " again when their lease expires)")
        self.kill_all()
        self.exit_code = config.EXIT_FAILURE
        self.done = True

    def stop_now(self) -> None:
        """``ctl shutdown --now``: as a second signal, but asked for, so exit 0 (the
        README's systemd unit restarts on failure: the service would come back)."""
        log.warning("shutdown --now: stopping at once (claimed rows are queued again"
                    " when their lease expires)")
        self.kill_all()
        self.exit_code = config.EXIT_OK
        self.done = True

    def handle_chld(self) -> None:
        self.reap()

    def handle_hup(self) -> None:
        """SIGHUP: restart both workers gracefully (new credentials, a fresh SES quota)."""
        if self.stopping:
            return
        log.info("SIGHUP: restarting the workers")
        for role in (Role.SENDER, Role.COLLECTOR, Role.EVENTS):
            if role in self.workers:
                self.request_restart(role)

    def request_restart(self, role: Role) -> None:
        """Stop a worker the graceful way; it is started again as soon as it exits."""
        worker = self.workers[role]
        if not worker.up or worker.restart_requested:
            return
        worker.restart_requested = True
        if role == Role.SENDER:
            # Nothing new for the old sender: what it has it finishes and reports.
            self.router.dispatching = False
            self.send(Role.SENDER, msg.Stop(self.settings.shutdown_timeout / 1000))
        else:
            self.send(role, msg.Stop())

    # -- worker lifecycle ------------------------------------------------------
    def spawn(self, worker: Worker) -> None:
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(target=self._child_main, args=(worker.role, child_end, parent_end),
                                   name=f"mailroom-{worker.role}", daemon=False)
        process.start()
        child_end.close()
        now = time.monotonic()
        worker.process, worker.pipe, worker.exited = process, parent_end, False
        worker.started_at = worker.last_seen = now
        worker.restart_at = None
        worker.dump_asked_at = None
        log.info("%s worker started (pid %d)", worker.role, process.pid)
        self.operator.on_worker(msg.WorkerStarted(worker.role, process.pid or 0, worker.restarts, time.time()))
        if worker.role == Role.COLLECTOR:
            self.router.collector_started(draining=self.stopping)
            self.operator.on_collector_started()
        elif worker.role == Role.SENDER:
            self.router.dispatching = not self.stopping
            self.operator.on_sender_started()  # its rate before its first batch
            self.router.sender_started()

    def _child_main(self, role: Role, pipe: Connection, parent_end: Connection) -> None:
        # Runs in the child right after the fork: undo the supervisor's signal
        # plumbing and close every pipe end that belongs to the supervisor (this
        # worker's own included), so a dead supervisor shows up as EOF and as
        # EPIPE on the worker's pipe.
        self.signals.close()
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        parent_end.close()
        self.operator.detach()
        for worker in self.workers.values():
            if worker.pipe is not None:
                worker.pipe.close()
        from mailroom.supervisor import workers

        entry = {Role.COLLECTOR: workers.collector_worker, Role.SENDER: workers.sender_worker,
                 Role.EVENTS: workers.events_worker}[role]
        sys.exit(entry(pipe, self.settings))

    def reap(self) -> None:
        """Collect exited workers (multiprocessing's own waitpid(pid, WNOHANG): a
        waitpid(-1) here would steal the status multiprocessing waits for)."""
        for worker in self.workers.values():
            if worker.exited or worker.process is None:
                continue
            code = worker.process.exitcode
            if code is not None:
                self.on_exit(worker, code)

    def on_exit(self, worker: Worker, code: int) -> None:
        if worker.pipe is not None:
            # What it wrote before it exited is still in the pipe (a sender's last
            # outcomes, at a planned restart or a stop): unread, those batches would
            # be sent again by the next sender.
            self._read_last(worker)
            if worker.pipe is not None:
                worker.pipe.close()
                worker.pipe = None
        worker.exited = True
        now = time.monotonic()
        pid = (worker.process.pid or 0) if worker.process else 0
        if self.stopping:
            log.info("%s worker (pid %d) stopped: %s", worker.role, pid, describe_exit(code))
            owed = self.router.owes_collector() if worker.role == Role.COLLECTOR else 0
            if owed:
                # Only a collector records outcomes and releases claims: without one the
                # emails in flight would be sent again once their lease expired.
                delay = backoff(worker.failures, RESTART_FIRST, RESTART_CAP, jitter=False)
                worker.failures += 1
                worker.restarts += 1
                worker.restart_at = now + delay
                log.warning("the collector is needed for %d batches and outcomes still to record;"
                            " starting it again in %.1fs", owed, delay)
            self.operator.on_worker(msg.WorkerExited(worker.role, pid, describe_exit(code), restarting=bool(owed),
                                                     reason=RestartReason.CRASH if owed else None))
            return
        if worker.restart_requested:
            worker.restart_requested = False
            worker.restarts += 1
            worker.restart_at = now
            log.info("%s worker (pid %d) stopped to be restarted: %s", worker.role, pid, describe_exit(code))
            self.operator.on_worker(msg.WorkerExited(worker.role, pid, describe_exit(code), restarting=True,
                                                     reason=RestartReason.PLANNED))
            if worker.role == Role.SENDER:
                self.router.sender_died(asked=True)
            return
        if code in BOOT_ERRORS:
            log.error("%s worker cannot start: %s (%s); stopping", worker.role,
                         BOOT_ERRORS[code], describe_exit(code))
            self.exit_code = code
            self.begin_stop(0.0)
            return
        if now - worker.started_at >= HEALTHY_AFTER:
            worker.failures = 0
        delay = backoff(worker.failures, RESTART_FIRST, RESTART_CAP, jitter=False)
        worker.failures += 1
        worker.restarts += 1
        worker.restart_at = now + delay
        self.operator.on_worker(msg.WorkerExited(worker.role, pid, describe_exit(code), restarting=True,
                                                 reason=RestartReason.CRASH))
        log.warning("%s worker (pid %d) exited: %s; restarting in %.1fs",
                       worker.role, pid, describe_exit(code), delay)
        if worker.role == Role.SENDER:
            self.router.sender_died()

    def begin_stop(self, grace: float) -> None:
        """Stop claiming; the sender gets ``grace`` seconds to finish what is in flight."""
        self.phase = Phase.DRAIN
        self.deadline = time.monotonic() + grace
        self.send(Role.COLLECTOR, msg.Drain())
        # The events worker holds no batch: it finishes the events it is recording,
        # deletes their messages and exits, while the others drain.
        if Role.EVENTS in self.workers:
            self.send(Role.EVENTS, msg.Stop())

    def kill_all(self) -> None:
        for worker in self.workers.values():
            if worker.process is not None and worker.process.pid and not worker.exited:
                try:
                    os.kill(worker.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- messages --------------------------------------------------------------
    def send(self, role: Role, message: object) -> bool:
        """Send to a worker; False when it is not there to take it."""
        worker = self.workers[role]
        if not worker.up or worker.pipe is None:
            return False
        try:
            worker.pipe.send(message)
            return True
        except OSError:  # EPIPE, ECONNRESET: the worker is going; reaping tells why
            return False

    def on_message(self, worker: Worker, message: object) -> None:
        worker.last_seen = time.monotonic()
        if isinstance(message, msg.Heartbeat):
            worker.stats = message.stats
            self.operator.on_heartbeat(message)
        elif isinstance(message, msg.Ready):
            log.debug("%s worker ready", worker.role)
            if not self.announced_ready and worker.role == Role.COLLECTOR:
                self.announced_ready = True
                sd_notify("READY=1")
        elif isinstance(message, msg.Claimed) and worker.role == Role.COLLECTOR:
            self.router.on_claimed(message)
        elif isinstance(message, msg.BatchOutcomes) and worker.role == Role.SENDER:
            self.router.on_outcomes(message)
        elif isinstance(message, (msg.Window, msg.HoldActions)) and worker.role == Role.SENDER:
            # Repeated with every heartbeat: a collector that missed it gets the next.
            self.send(Role.COLLECTOR, message)
        elif isinstance(message, msg.Recorded) and worker.role == Role.COLLECTOR:
            self.router.on_recorded(message)
            self.operator.on_recorded(message)
        elif isinstance(message, msg.ClaimingSet) and worker.role == Role.COLLECTOR:
            self.operator.on_claiming_set(message)
        else:
            log.warning("unexpected message %s from the %s worker", type(message).__name__, worker.role)

    def _read_last(self, worker: Worker) -> None:
        """Whatever an exited worker left in its pipe, up to EOF."""
        try:
            while worker.pipe is not None and worker.pipe.poll():
                self.on_message(worker, worker.pipe.recv())
        except (EOFError, OSError):
            pass

    def read(self, worker: Worker) -> None:
        try:
            while worker.pipe is not None and worker.pipe.poll():
                self.on_message(worker, worker.pipe.recv())
        except (EOFError, OSError):
            # The worker is gone (or going): reaping reports why.
            if worker.pipe is not None:
                worker.pipe.close()
                worker.pipe = None
            if worker.process is not None:
                worker.process.join(1.0)
            self.reap()

    # -- the loop ----------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        if not self.stopping:
            for worker in self.workers.values():
                if worker.exited and worker.restart_at is not None and now >= worker.restart_at:
                    self.spawn(worker)
                elif worker.up and worker.process is not None and worker.process.pid and (
                        worker.dump_asked_at is not None  # once asked for its stack, it goes
                        or now - worker.last_seen > self.settings.worker_timeout / 1000):
                    self.watchdog(worker, worker.process.pid, now)
        else:
            due = self._collector_due()
            if due is not None and due <= now < self.deadline:
                # Stopping, and outcomes or claims wait for a collector: one that drains
                # (spawn hands it everything) and, past that phase, stops once it is done.
                self.spawn(self.workers[Role.COLLECTOR])
                if self.phase is Phase.STOP_COLLECTOR:
                    self.send(Role.COLLECTOR, msg.Stop())
                    self.deadline = max(self.deadline, now + STOP_GRACE)
            self.advance_stop(now)

    def _collector_due(self) -> float | None:
        """While stopping: when the exited collector is started again because batches or
        outcomes wait for it (see on_exit); None when none is to come."""
        collector = self.workers[Role.COLLECTOR]
        if collector.exited and collector.restart_at is not None and self.router.owes_collector():
            return collector.restart_at
        return None

    def watchdog(self, worker: Worker, pid: int, now: float) -> None:
        """A silent worker: first its stack to the log (SIGUSR1), so the operator sees
        the line it hung on, then SIGKILL (gunicorn's SIGABRT, without a core file).
        Never a wait here: the kill comes on a later turn of the loop."""
        try:
            if worker.dump_asked_at is None:
                log.error("%s worker (pid %d) silent for %.0fs; its stack follows, then it is killed",
                             worker.role, pid, now - worker.last_seen)
                worker.dump_asked_at = now
                os.kill(pid, signal.SIGUSR1)
            elif now - worker.dump_asked_at >= STACK_DUMP_GRACE:
                log.error("killing the silent %s worker (pid %d)", worker.role, pid)
                worker.dump_asked_at = None
                worker.last_seen = now
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it died meanwhile: reaping tells why
            pass

    def advance_stop(self, now: float) -> None:
        collector, sender = self.workers[Role.COLLECTOR], self.workers[Role.SENDER]
        if self.phase is Phase.DRAIN:
            if len(self.router) and sender.up and now < self.deadline:
                return
            self.phase = Phase.STOP_SENDER
            self.router.dispatching = False
            self.send(Role.SENDER, msg.Stop(0.0 if now >= self.deadline else self.deadline - now))
            self.deadline = max(now, self.deadline) + STOP_GRACE
        if self.phase is Phase.STOP_SENDER:
            if sender.up and now < self.deadline:
                return
            unfinished = self.router.release_all()
            if unfinished:
                log.warning("%d batches never finished; their rows go back to the queue", unfinished)
            self.phase = Phase.STOP_COLLECTOR
            self.router.accepting = False
            self.send(Role.COLLECTOR, msg.Stop())
            self.deadline = now + STOP_GRACE
        if self.phase is Phase.STOP_COLLECTOR:
            events = self.workers.get(Role.EVENTS)
            coming = self._collector_due() is not None
            if (collector.up or coming or (events is not None and events.up)) and now < self.deadline:
                return
            if owed := self.router.owes_collector():
                log.error("stopped with %d batches and outcomes no collector recorded: their rows stay"
                          " claimed until the lease expires, then go out again (sent twice if SES had"
                          " accepted them)", owed)
            self.kill_all()
            self.done = True

    def run(self) -> int:
        """Supervise until stopped; return the exit code."""
        try:
            try:
                self.operator.start()
            except StartError as exc:
                # A busy port or an unusable socket path is configuration: one line
                # and exit 2, which the systemd unit does not restart.
                log.error("cannot start: %s", exc)
                return config.EXIT_CONFIG
            try:
                return self._run()
            except Exception:
                # A bug in the supervisor's own loop: the traceback, then no orphans
                # (workers would otherwise run on without anyone routing their batches).
                log.exception("unexpected error in the supervisor; stopping the workers")
                self.emergency_stop()
                return config.EXIT_FAILURE
        finally:
            self.operator.close()

    def emergency_stop(self) -> None:
        """Stop the workers without the loop: the sender first, then the collector
        (the staged stop's order), each told by EOF on its pipe ("supervisor is gone":
        the sender abandons its calls, the collector releases what it holds) and by
        SIGTERM, killed after :data:`STOP_GRACE`. Claimed rows that were in flight go
        back to the queue when their lease expires, as after a SIGKILL."""
        # The collector last (it records and releases), whatever other roles exist.
        order = sorted(self.workers, key=lambda r: (r is Role.COLLECTOR, r is not Role.SENDER))
        for role in order:
            worker = self.workers[role]
            if worker.pipe is not None:
                worker.pipe.close()
                worker.pipe = None
            process = worker.process
            if process is None or process.exitcode is not None or not process.pid:
                continue
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            process.join(STOP_GRACE)
            if process.exitcode is None:
                process.kill()
                process.join()
            log.info("%s worker (pid %d) stopped: %s", role, process.pid, describe_exit(process.exitcode))

    def _run(self) -> int:
        self.install_signals()
        log.info("starting (pid %d), queue %s, channel %s", os.getpid(),
                    self.settings.queue_name, self.settings.channel_name)
        for worker in self.workers.values():
            self.spawn(worker)
        while not self.done:
            pipes = [w.pipe for w in self.workers.values() if w.pipe is not None]
            # A client with output pending is written to on every turn: turn quickly.
            timeout = 0.02 if self.operator.writing() else 0.5
            ready = wait([*pipes, self.signals.read_fd, *self.operator.readers()], timeout=timeout)
            self.operator.service(ready)
            for worker in self.workers.values():
                if worker.pipe is not None and worker.pipe in ready:
                    self.read(worker)
            if self.signals.read_fd in ready:
                self.signals.drain_wakeups()
            while (signum := self.signals.pop()) is not None:
                name = signal.Signals(signum).name[3:].lower()
                getattr(self, f"handle_{name}")()
            self.reap()
            self.tick()
            self.operator.tick(time.monotonic())
            self.operator.flush()
        self.wait_exit()
        log.info("stopped")
        return self.exit_code

    def wait_exit(self) -> None:
        for worker in self.workers.values():
            if worker.process is not None:
                worker.process.join(STOP_GRACE)
                if worker.process.exitcode is None:
                    worker.process.kill()
                    worker.process.join()


def run(settings: Settings) -> int:
    """Entry point used by ``mailroom-supervisor``."""
    return Supervisor(settings).run()
