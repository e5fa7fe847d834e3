"""The worker processes of ``mailroom-supervisor`` (collector, sender, and the events
worker when ``MAILROOM_SES_EVENTS_QUEUE_URL`` is set), run after the fork.

Everything that holds a database connection, a thread or an SES client is
created here, inside the child, never in the supervisor before the fork.  This
module imports the collector engine (and the sender's, lazily), so the
supervisor's own process never imports it: the arbiter does, in the child.
What each worker does on its pipe lives with its role: the collector's in
:mod:`mailroom.collector.pipe`, the sender's in :mod:`mailroom.sender.pipe`.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

from mailroom import config
from mailroom._process import SignalFlag, die_with_parent, name_process, one_line, rss_bytes, setup_logging
from mailroom.collector import Collector
from mailroom.collector.pipe import PipeSink
from mailroom.config import Settings
from mailroom.supervisor import messages as msg

log = logging.getLogger("mailroom.supervisor")


def _boot(role: str, tag: str, settings: Settings) -> SignalFlag:
    name_process(f"mailroom: {role}")
    setup_logging(tag, settings.log_level)
    die_with_parent()
    # The supervisor's watchdog sends SIGUSR1 before it SIGKILLs a silent worker:
    # every thread's stack goes to stderr (the log), so the line it hung on is seen.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    # Ctrl-C in a terminal reaches the whole process group: only the supervisor
    # decides how to stop, it tells the workers through their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = SignalFlag()
    stop.install((signal.SIGTERM,))
    return stop


# -- collector worker ------------------------------------------------------------

def collector_worker(pipe: Connection, settings: Settings) -> int:
    """Entry point of the collector worker; returns its exit code."""
    stop = _boot("collector", "PG", settings)
    sink = PipeSink(pipe, settings)
    def on_ready() -> None:
        pipe.send(msg.Ready())
        # What the supervisor said while we were connecting (a pause of claims)
        # must count for the drain that follows the connection. Only here: read
        # elsewhere, the pipe would not wake the loop's select for what it holds.
        sink.receive()

    collector = Collector(settings, sink, lambda: stop() or sink.stopping,
                          wakeup_fd=stop.read_fd, on_ready=on_ready)
    try:
        code = collector.run_or_exit_code()
    except OSError:
        if not sink.stopping:
            raise
        log.error("supervisor is gone; stopping (the last batch went back to the queue)")
        code = None
    if code is not None:
        return code
    if sink.stopping:  # told to stop by the supervisor: a clean exit
        sink.leave_fleet(settings.database_url)
    if sink.pending and not stop():
        log.warning("%d outcome messages not recorded (database unavailable at stop);"
                       " their rows are queued again when the claim lease expires", len(sink.pending))
    return config.EXIT_OK


# -- sender worker ---------------------------------------------------------------

def sender_worker(pipe: Connection, settings: Settings) -> int:
    """Entry point of the sender worker; returns its exit code."""
    stop = _boot("sender", "SES", settings)
    from mailroom.sender import Sender
    from mailroom.sender.calls import WORKER_POLICY
    from mailroom.sender.driver import Driver, StopRequest
    from mailroom.sender.pipe import PipeOutcomes, read_pipe, sender_stats, window
    from mailroom.sender.quota import QuotaWatch

    sender = Sender(settings, policy=WORKER_POLICY)
    try:
        sender.start()
    except Exception as exc:  # noqa: BLE001 - boto3 refusing its settings, e.g. a bad endpoint URL
        # Creating the client does not talk to SES: what fails here is configuration.
        log.error("cannot start the sender: %s", one_line(exc))
        return config.EXIT_CONFIG
    quota = QuotaWatch(sender)
    quota.start()

    templates = sender.templates
    sink = PipeOutcomes(pipe, lambda: sender_stats(sender, quota),
                        lambda: window(sender, settings.batch_limit),
                        templates.held_actions if templates else tuple)
    # SIGTERM without a word from the supervisor: a person, or the supervisor's
    # death (PR_SET_PDEATHSIG); what waits for a retry goes back to the ledger.
    on_signal = StopRequest(settings.shutdown_timeout / 1000, defer_retries=True)
    # With the supervisor gone nobody can record outcomes: finishing the calls in
    # flight would only add duplicates once the lease expires.
    orphaned = StopRequest(0.0, abandon=True)
    parent = os.getppid()

    def poll_stop() -> StopRequest | None:
        if os.getppid() != parent:
            log.error("supervisor is gone; stopping")
            return orphaned
        return on_signal if stop() else None

    driver = Driver(sender, sink, window=1, poll_stop=poll_stop)

    # A thread of its own, so the supervisor never blocks sending to us.
    threading.Thread(target=read_pipe, args=(pipe, driver, quota), name="pipe-reader", daemon=True).start()
    sink.post(msg.Ready())
    driver.run()
    sink.beat()  # the SES calls made since the last heartbeat count too
    return config.EXIT_OK


# -- events worker ---------------------------------------------------------------

def events_worker(pipe: Connection, settings: Settings) -> int:
    """Entry point of the events worker (``MAILROOM_SES_EVENTS_QUEUE_URL`` set); returns
    its exit code.  The loop runs here; a thread reads the pipe and watches for SIGTERM
    and the supervisor's death, since the long poll blocks the loop for up to 20 s."""
    stop = _boot("events", "SQS", settings)
    from mailroom.events.worker import EventsLoop
    from mailroom.ledger.connection import SchemaError

    assert settings.ses_events_queue_url is not None
    last_beat = 0.0

    def beat() -> None:
        nonlocal last_beat
        now = time.monotonic()
        if now - last_beat < msg.HEARTBEAT_INTERVAL:
            return
        last_beat = now
        try:
            pipe.send(msg.Heartbeat(msg.EventsStats(**loop.take_counts().as_stats(), rss=rss_bytes())))
        except OSError:  # the supervisor is gone: the pipe thread stops us
            pass

    try:
        loop = EventsLoop(settings, settings.ses_events_queue_url, beat=beat)
    except Exception as exc:  # noqa: BLE001 - boto3 refusing its settings: configuration
        log.error("cannot start the events worker: %s", one_line(exc))
        return config.EXIT_CONFIG
    try:
        loop.connect()
    except SchemaError as exc:
        log.error("%s", exc)
        return config.EXIT_SCHEMA
    except Exception as exc:  # noqa: BLE001 - the database is down: the loop retries with backoff
        log.warning("database unavailable at start (%s); events wait on the queue", one_line(exc))
    parent = os.getppid()

    def watch() -> None:
        """Stop on the supervisor's word, SIGTERM or the supervisor's death.  In the long
        poll the loop holds no message: exit at once rather than after the poll."""
        while True:
            try:
                if pipe.poll(0.25):
                    message = pipe.recv()
                    if not isinstance(message, msg.Stop):
                        continue
                elif not stop() and os.getppid() == parent:
                    continue
            except (EOFError, OSError):
                pass  # the supervisor is gone
            if loop.stop():
                logging.shutdown()
                os._exit(config.EXIT_OK)
            return

    threading.Thread(target=watch, name="pipe-reader", daemon=True).start()
    pipe.send(msg.Ready())
    loop.run()
    return config.EXIT_OK
