"""What every mailroom process shares: logging, signals, parent death, backoff, error lines.

- :func:`setup_logging`: one line per event on stderr, the original's way
  (``2024/04/20 13:37:00 [PG] connected``; ``PG`` collector, ``SES`` sender,
  ``SUP`` supervisor).
- :class:`SignalFlag`: signal handlers that only record the signal and wake the
  main loop through a pipe (gunicorn's arbiter); the loop decides what to do.
- :func:`die_with_parent`: a forked worker gets SIGTERM when the supervisor dies.
- :func:`backoff`: the one capped exponential delay formula, with equal jitter.
- :func:`one_line`: an exception or a server message as one printable line.
- :func:`add_version`: ``--version`` on a command-line parser.
- :func:`name_process`: the name ``ps``, ``top`` and ``htop`` show.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

DATE_FORMAT = "%Y/%m/%d %H:%M:%S"


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version`` on ``parser``: prints ``PROG VERSION`` and exits 0, before anything
    reads configuration or connects (argparse acts on it while parsing)."""
    from mailroom import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")


def setup_logging(tag: str, level: str = "INFO") -> None:
    """Send all logging to stderr with the ``[tag]`` prefix, replacing earlier handlers.

    Called again in a forked worker to switch the tag (the supervisor's handler is
    inherited through fork).

    One logger per role, named after it: ``log = logging.getLogger("mailroom.<role>")``
    in every module of ``mailroom/<role>/`` (a level set for a role covers all its
    modules; the tag, not the logger's name, says which process wrote a line).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{tag}] %(message)s", DATE_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # botocore and psycopg are chatty at INFO/DEBUG; their warnings still show.
    for noisy in ("botocore", "boto3", "urllib3", "psycopg"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def name_process(title: str) -> None:
    """Show this process as ``title`` in ``ps``/``htop`` and in ``/proc/PID/cmdline``.

    Without it, forked workers keep the supervisor's command line and all three
    processes read ``python3 .../mailroom-supervisor``: an operator could not tell
    which one to look at. ``setproctitle`` also sets the kernel's short name
    (``/proc/PID/comm``, what ``top`` shows by default and ``pkill`` matches).
    """
    try:
        import setproctitle
    except ImportError:  # a stripped-down install: the name is a convenience, not a need
        return
    setproctitle.setproctitle(title)


def one_line(error: BaseException | str, *, named: bool = False) -> str:
    """``error`` as one line: whitespace runs (newlines included) become one space.

    An exception whose text is empty is named by its type, so a message never ends
    in a bare colon; ``named`` puts the type in front of any text that does not
    already say it (``ConnectionError: ...``), for errors whose text alone is vague.
    """
    text = " ".join(str(error).split())
    if isinstance(error, BaseException):
        name = type(error).__name__
        if not text:
            return name
        if named and name not in text:
            return f"{name}: {text}"
    return text


def backoff(attempt: int, first: float, cap: float, *, jitter: bool = True) -> float:
    """Delay before retry number ``attempt`` (0 for the first): ``first * 2**attempt``,
    capped at ``cap``; with ``jitter``, a uniform draw from its upper half ("equal
    jitter": never close to 0, and peers that failed together spread apart)."""
    ceiling = min(cap, first * 2.0 ** min(attempt, 64))
    if not jitter:
        return ceiling
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def backoff_delays(first: float, cap: float) -> Iterator[float]:
    """Endless :func:`backoff` delays for attempts 0, 1, 2, ..."""
    attempt = 0
    while True:
        yield backoff(attempt, first, cap)
        attempt += 1


class SignalFlag:
    """Signal handling the arbiter way: the handler only records, the loop acts.

    Each received signal is appended to :attr:`received`, and the C-level wake-up fd
    (:func:`signal.set_wakeup_fd`) writes a byte to a pipe whose read end,
    :attr:`read_fd`, a loop can wait on beside its other descriptors (a plain
    blocking read would simply be restarted after the handler, PEP 475).

    With ``second_is_fatal``, the first signal puts the default action back, so a
    second one ends the process at once (an operator who does not want to wait).
    Only the main thread can install handlers; elsewhere (a program embedding
    mailroom) :meth:`install` leaves signals alone.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._saved: dict[int, Any] = {}
        self._saved_wakeup: int | None = None
        self._second_is_fatal = False

    def install(self, signums: Iterable[int], *, second_is_fatal: bool = False) -> None:
        """Handle ``signums`` from now on (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._second_is_fatal = second_is_fatal
        for signum in signums:
            self._saved[signum] = signal.signal(signum, self._handle)
        self._saved_wakeup = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self._second_is_fatal:
            for other in self._saved:
                signal.signal(other, signal.SIG_DFL)

    def __call__(self) -> bool:
        """True once any handled signal arrived (a stop was requested)."""
        return bool(self.received)

    @property
    def first(self) -> int | None:
        """The first signal received, or None."""
        return self.received[0] if self.received else None

    def pop(self) -> int | None:
        """Take the oldest signal not yet taken, or None."""
        return self.received.pop(0) if self.received else None

    def drain_wakeups(self) -> None:
        """Empty the wake-up pipe (after the loop woke on :attr:`read_fd`)."""
        drain_fd(self.read_fd)

    def restore(self) -> None:
        """Put back the handlers and wake-up fd found by :meth:`install`."""
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()
        if self._saved_wakeup is not None:
            signal.set_wakeup_fd(self._saved_wakeup)
            self._saved_wakeup = None

    def close(self) -> None:
        """:meth:`restore`, then close the pipe."""
        self.restore()
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def drain_fd(fd: int) -> None:
    """Read a non-blocking descriptor until it is empty."""
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


_PR_SET_PDEATHSIG = 1

# Found at import, not at the call: die_with_parent also runs as a ``preexec_fn``
# (between fork and exec in a threaded parent), where the child must not import.
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel for ``signum`` when the parent (the supervisor, the demo) dies.

    Linux only; on other systems the workers still notice EOF on their pipe.  Only a
    system call: safe as a ``preexec_fn`` (the setting survives ``execve``).
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signum)


def rss_bytes() -> int | None:
    """This process's resident set size, from ``/proc`` (None where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
