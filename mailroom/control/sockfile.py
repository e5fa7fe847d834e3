"""Where the control socket lives and how its file is made (OPERATIONS.md 2).

- :func:`default_socket_path`: ``MAILROOM_CONTROL_SOCKET``, else systemd's
  ``$RUNTIME_DIRECTORY/control.sock``, else ``$XDG_RUNTIME_DIR/mailroom/<queue>.sock``,
  else ``/tmp/mailroom-<uid>/<queue>.sock``; ``off`` disables the socket.
- :func:`bind_unix`: a listening socket whose file is 0600 from the start (umask
  set before ``bind``), or 0660 with a group; a live owner raises :class:`SocketInUse`,
  a stale file is removed; a directory in which another user could replace the
  socket is refused (:func:`untrusted_directory`).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import socket
import stat
from collections.abc import Mapping

#: How long start() waits for an existing socket's owner to answer ``hello``.
PROBE_TIMEOUT = 1.0


class ControlSocketError(Exception):
    """The control socket cannot be set up; ``str()`` is one printable line."""


class SocketInUse(ControlSocketError):
    """Another live process (a supervisor) answers on the socket path."""


def default_socket_path(environ: Mapping[str, str], queue: str) -> str | None:
    """The control socket path for ``queue``; ``None`` when ``MAILROOM_CONTROL_SOCKET=off``."""
    explicit = environ.get("MAILROOM_CONTROL_SOCKET", "").strip()
    if explicit.lower() == "off":
        return None
    if explicit:
        return explicit
    runtime = environ.get("RUNTIME_DIRECTORY", "").strip()
    if runtime:
        # systemd may set several, colon-separated: the first is ours.
        return os.path.join(runtime.split(":")[0], "control.sock")
    xdg = environ.get("XDG_RUNTIME_DIR", "").strip()
    if xdg:
        return os.path.join(xdg, "mailroom", f"{queue}.sock")
    return os.path.join("/tmp", f"mailroom-{os.getuid()}", f"{queue}.sock")


def resolve_group(group: str) -> int:
    """A group name (or numeric id) as a gid; :class:`ControlSocketError` if unknown."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ControlSocketError(f"control socket group {group!r} does not exist") from None


def _prepare_directory(directory: str, gid: int | None) -> None:
    """Create a missing parent 0700 (0710 with the socket's group, so its members can
    reach the socket), then check that no other user can replace the socket in it
    (:func:`untrusted_directory`)."""
    created = True
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        created = False
        if not stat.S_ISDIR(os.lstat(os.path.realpath(directory)).st_mode):
            raise ControlSocketError(f"{directory} is not a directory") from None
    except FileNotFoundError:
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
        except OSError as exc:
            raise ControlSocketError(f"cannot create the control socket directory {directory}:"
                                     f" {exc.strerror or exc}") from None
    except OSError as exc:
        raise ControlSocketError(f"cannot create the control socket directory {directory}:"
                                 f" {exc.strerror or exc}") from None
    if created and gid is not None:
        os.chown(directory, -1, gid)
        os.chmod(directory, 0o710)
    problem = untrusted_directory(directory)
    if problem is not None:
        raise ControlSocketError(problem)


def untrusted_directory(directory: str, uid: int | None = None) -> str | None:
    """Why another local user could replace a socket in ``directory`` (one line that
    names the directory and the fix), or None when no one but ``uid`` (default: ours)
    and root can.

    OpenSSH's StrictModes rule, applied to the directory and every ancestor: each
    must belong to root or to ``uid`` and be writable by neither group nor others,
    unless it is sticky (``/tmp``: others may add entries there, never remove or
    rename ours). Whoever can write to one of them can unlink the socket, or move the
    directory aside, and bind an impostor that a root ``mailroom ctl`` would obey.
    """
    uid = os.geteuid() if uid is None else uid
    path = os.path.realpath(directory)
    while True:
        info = os.stat(path)
        if info.st_uid not in (0, uid):
            return (f"control socket directory {path} belongs to uid {info.st_uid}, not to uid {uid} or"
                    f" root, so that user could replace the socket: use a directory of uid {uid}"
                    " (MAILROOM_CONTROL_SOCKET) or chown it")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            who = {0o020: "group", 0o002: "others"}.get(info.st_mode & 0o022, "group and others")
            return (f"control socket directory {path} is writable by {who}"
                    f" (mode {stat.S_IMODE(info.st_mode):04o}), so another user could replace the socket:"
                    f" chmod go-w {path}, or choose another directory (MAILROOM_CONTROL_SOCKET)")
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def probe(path: str, timeout: float = PROBE_TIMEOUT) -> dict[str, object] | None:
    """Ask whoever listens on ``path`` for ``hello``: its result, ``{}`` if something
    listens but gives no proper answer, ``None`` if nothing listens (a stale file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return None
            return {}  # e.g. a full backlog: alive, but busy
        try:
            sock.sendall(b'{"v":1,"id":0,"cmd":"hello"}\n')
            data = b""
            while not data.endswith(b"\n") and len(data) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            reply = json.loads(data)
            result = reply.get("result") if isinstance(reply, dict) else None
            return result if isinstance(result, dict) else {}
        except (OSError, ValueError):
            return {}


def bind_unix(path: str, group: str | None, backlog: int = 512) -> tuple[socket.socket, tuple[int, int]]:
    """A non-blocking listening socket at ``path`` and the file's ``(st_dev, st_ino)``.

    Raises :class:`SocketInUse` when a live process answers there, and
    :class:`ControlSocketError` for a path that cannot be used.
    """
    if len(os.fsencode(path)) > 107:
        raise ControlSocketError(f"control socket path too long (max 107 bytes): {path}")
    gid = resolve_group(group) if group else None
    _prepare_directory(os.path.dirname(os.path.abspath(path)), gid)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlSocketError(f"{path} exists and is not a socket; not removing it")
        owner = probe(path)
        if owner is not None:
            pid = owner.get("pid")
            raise SocketInUse(f"control socket {path} is in use"
                              + (f" by pid {pid}" if isinstance(pid, int) else ""))
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The mode must hold from the moment the file exists: a chmod after bind
    # leaves a window in which anyone may connect. The supervisor is single-
    # threaded, so changing the process umask for the bind is safe.
    old = os.umask(0o117 if gid is not None else 0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SocketInUse(f"control socket {path} is in use") from None
        raise ControlSocketError(f"cannot create control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(backlog)
        sock.setblocking(False)
        info = os.stat(path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ControlSocketError(f"cannot set up control socket {path}: {exc.strerror}") from None
    return sock, (info.st_dev, info.st_ino)


def unlink_if_ours(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file unless another process replaced it since."""
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
