"""What the control socket and the metrics endpoint both do with non-blocking sockets:
accept everything pending, and send what a peer takes now.

Both are served from the supervisor's main loop (no thread), so neither may block:
a listener is drained until EAGAIN, and output left over stays in its buffer for the
next turn.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator

__all__ = ["accept_pending", "send_pending"]

log = logging.getLogger("mailroom.control")


def accept_pending(listener: socket.socket, has_room: Callable[[], bool], what: str) -> Iterator[socket.socket]:
    """Accept every connection waiting on ``listener``; yield each, non-blocking.

    ``has_room()`` is asked before each is yielded: a connection past the caller's
    limit is closed at once.  An accept error other than EAGAIN (EMFILE and
    friends) is logged once, naming ``what``, and leaves the rest in the backlog.
    """
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("%s: accept failed: %s", what, exc.strerror)
            return
        if not has_room():
            sock.close()
            continue
        sock.setblocking(False)
        yield sock


def send_pending(sock: socket.socket, outbuf: bytearray) -> bool:
    """Send as much of ``outbuf`` as ``sock`` takes now, removing what was sent.

    False when the peer is gone (the caller drops the connection); True otherwise,
    with whatever did not fit still in ``outbuf``.
    """
    while outbuf:
        try:
            sent = sock.send(outbuf, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del outbuf[:sent]
    return True
