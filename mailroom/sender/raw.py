"""Raw HTTP responses of failed SES calls, kept on disk as the original sender did.

:class:`RawResponseWriter` hooks the client's events, writes one private file
(0600) per failed call under ``MAILROOM_SES_OUTPUT_PATH`` and keeps that
directory under its file and byte caps (oldest removed first).
"""

from __future__ import annotations

import http
import itertools
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger("mailroom.sender")


class _ParsedLater:
    """The parts of a response botocore's ``before-parse`` event gives, shaped
    like the ``http_response`` of ``after-call`` (which a parse error never reaches)."""

    def __init__(self, response_dict: dict[str, Any]) -> None:
        self.status_code = response_dict.get("status_code", 0)
        self.headers = response_dict.get("headers", {})
        body = response_dict.get("body", b"")
        self.content = body if isinstance(body, bytes) else b""


class RawResponseWriter:
    """Writes the raw HTTP response of failed calls to files under one directory.

    Hook :meth:`capture` on the client's ``before-parse`` and ``after-call``
    events: botocore emits them in the calling thread, with the raw response,
    before raising ``ClientError`` (after-call) or ``ResponseParserError``
    (before-parse only), so a thread-local slot hands the response to
    :meth:`write_last`.

    Files are 0600 (a response can quote addresses and template data), and the
    directory is capped: past ``max_files`` files or ``max_bytes`` bytes the
    oldest ``ses-*.http`` files go, so an outage cannot fill the disk.
    """

    def __init__(self, directory: str, max_files: int = 1_000, max_bytes: int = 100 * 1024 * 1024) -> None:
        self.directory = directory
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._local = threading.local()
        self._counter = itertools.count(1)
        self._prune_lock = threading.Lock()

    def attach(self, client: Any, operation: str = "SendBulkTemplatedEmail") -> None:
        """Register :meth:`capture` for ``operation`` on ``client``."""
        client.meta.events.register(f"before-parse.ses.{operation}", self.capture_unparsed)
        client.meta.events.register(f"after-call.ses.{operation}", self.capture)

    def capture_unparsed(self, response_dict: dict[str, Any] | None = None, **_: Any) -> None:
        """botocore ``before-parse`` handler: the response, in case parsing fails."""
        self._local.response = _ParsedLater(response_dict or {})

    def capture(self, http_response: Any = None, **_: Any) -> None:
        """botocore event handler: remember this thread's last raw response."""
        self._local.response = http_response

    def write_last(self) -> str | None:
        """Write this thread's last captured response; return the path (None if none/failed)."""
        response = getattr(self._local, "response", None)
        self._local.response = None
        if response is None:
            return None
        status = int(response.status_code)
        raw = getattr(response, "raw", None)  # urllib3's response: the status line as received
        reason = getattr(raw, "reason", None)
        if not reason:
            try:
                reason = http.HTTPStatus(status).phrase
            except ValueError:
                reason = ""
        version = {10: "HTTP/1.0", 11: "HTTP/1.1"}.get(getattr(raw, "version", 11), "HTTP/1.1")
        head = [f"{version} {status} {reason}"]
        head += [f"{name}: {value}" for name, value in response.headers.items()]
        blob = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + (response.content or b"")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"ses-{stamp}-{os.getpid()}-{next(self._counter):06d}.http"
        path = os.path.join(self.directory, name)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            # O_EXCL: never overwrite an earlier response; 0600 from the start.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
        except OSError as exc:
            log.warning("cannot write the raw SES response to %s: %s", path, exc)
            return None
        self.prune()
        return path

    def prune(self) -> int:
        """Remove the oldest response files past the caps; how many went."""
        with self._prune_lock:
            try:
                entries = []
                with os.scandir(self.directory) as found:
                    for entry in found:
                        if entry.name.startswith("ses-") and entry.name.endswith(".http") and entry.is_file():
                            info = entry.stat()
                            entries.append((info.st_mtime, entry.name, info.st_size))
            except OSError:
                return 0
            entries.sort()
            total = sum(size for _, _, size in entries)
            removed = 0
            while entries and (len(entries) > self.max_files or total > self.max_bytes):
                _, name, size = entries.pop(0)
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass
                total -= size
                removed += 1
            return removed
