"""What the supervisor opens at start, and whom its control socket's clients trust.

A resource that cannot be opened at start (a busy metrics port, an unsafe socket
directory) is configuration: one line, exit 2 (which the README's systemd unit does
not restart), and nothing left behind. The clients talk only to a socket owned by
root or by their own user, so a socket put in place by another local user is refused
before a command is sent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile

import pytest
from pgutil import console_script

#: The supervisor stops before it connects anywhere: the URL is never used.
UNUSED_URL = "postgresql://nobody@127.0.0.1:1/none"


def start_supervisor(base_env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(base_env, MAILROOM_DATABASE_URL=UNUSED_URL, **extra)
    return subprocess.run(console_script("mailroom-supervisor"), env=env, capture_output=True,
                          text=True, timeout=30)


def test_a_busy_metrics_port_is_one_line_exit_2_and_leaves_no_socket(base_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = start_supervisor(base_env, MAILROOM_METRICS_ADDR=f"127.0.0.1:{port}")
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"MAILROOM_METRICS_ADDR 127.0.0.1:{port}" in lines[0]
    assert "address already in use" in lines[0]
    assert not os.path.exists(base_env["MAILROOM_CONTROL_SOCKET"])


def test_an_unusable_socket_path_after_the_metrics_listener_is_one_line_exit_2(base_env):
    where = tempfile.mkdtemp(prefix="mr-")
    blocker = os.path.join(where, "file")
    with open(blocker, "w") as f:
        f.write("a file, not a directory")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = start_supervisor(base_env, MAILROOM_METRICS_ADDR=f"127.0.0.1:{port}",
                              MAILROOM_CONTROL_SOCKET=os.path.join(blocker, "c.sock"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # The metrics listener said where it listens; then the one line that stops it all.
    assert "cannot start" in result.stderr.splitlines()[-1] and blocker in result.stderr.splitlines()[-1]


# -- the socket's directory: OpenSSH's StrictModes rule --------------------------------

def _socket_in(directory: str) -> str:
    return os.path.join(directory, "control.sock")


@pytest.mark.parametrize("mode, who", [(0o777, "group and others"), (0o770, "group"), (0o703, "others")])
def test_a_socket_directory_others_can_write_stops_the_supervisor(base_env, mode, who):
    directory = tempfile.mkdtemp(prefix="mr-open-")
    os.chmod(directory, mode)
    result = start_supervisor(base_env, MAILROOM_CONTROL_SOCKET=_socket_in(directory))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert f"control socket directory {directory} is writable by {who}" in line
    assert f"chmod go-w {directory}" in line
    assert os.listdir(directory) == []


def test_an_open_ancestor_directory_is_refused_too(base_env):
    ancestor = tempfile.mkdtemp(prefix="mr-open-")
    os.chmod(ancestor, 0o777)  # anyone could move "private" aside and put their own there
    private = os.path.join(ancestor, "private")
    os.mkdir(private, 0o700)
    result = start_supervisor(base_env, MAILROOM_CONTROL_SOCKET=_socket_in(private))
    assert result.returncode == 2, result.stderr
    assert f"control socket directory {ancestor} is writable by group and others" in result.stderr
    assert os.listdir(private) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_socket_directory_of_another_user_stops_the_supervisor(base_env):
    directory = tempfile.mkdtemp(prefix="mr-theirs-")
    os.chown(directory, NOBODY, NOBODY)
    result = start_supervisor(base_env, MAILROOM_CONTROL_SOCKET=_socket_in(directory))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert f"control socket directory {directory} belongs to uid {NOBODY}" in line


def test_private_and_sticky_directories_are_accepted():
    from mailroom.control.sockfile import bind_unix, untrusted_directory

    private = tempfile.mkdtemp(prefix="mr-ok-")
    sticky = tempfile.mkdtemp(prefix="mr-sticky-")
    os.chmod(sticky, 0o1777)  # like /tmp: others add entries, never remove ours
    for directory in (private, sticky, os.path.join(private, "created")):
        sock, _ = bind_unix(_socket_in(directory), None)
        sock.close()
        assert os.path.exists(_socket_in(directory)) and untrusted_directory(directory) is None


# -- the clients: nobody but root, ourselves or MAILROOM_CONTROL_OWNER ------------------

NOBODY = 65534
DONE = b'{"v":1,"id":1,"ok":true,"result":{"what":"claims","changed":true,"state":"paused"}}\n'


@pytest.fixture
def impostor():
    """A socket served by uid nobody in a world-writable directory (what any local user
    can do there), answering "done" to everything and counting the bytes it got."""
    if os.geteuid() != 0:
        pytest.skip("binding a socket as another user (nobody) needs root")
    directory = tempfile.mkdtemp(prefix="mr-hijack-")
    os.chmod(directory, 0o1777)
    path, heard = _socket_in(directory), os.path.join(directory, "heard")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the impostor: already loaded, so nothing to exec as nobody
        try:
            os.close(ready_r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            server = socket.socket(socket.AF_UNIX)
            server.bind(path)
            server.listen()
            os.write(ready_w, b"x")
            while True:
                conn, _ = server.accept()
                data = conn.recv(65536)
                with open(heard, "ab") as f:
                    f.write(data)
                if data:
                    conn.sendall(DONE)
                conn.close()
        finally:
            os._exit(1)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    try:
        yield path, heard
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _heard(heard: str) -> bytes:
    try:
        with open(heard, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def test_ctl_refuses_a_socket_served_by_another_user_before_sending(impostor, base_env):
    path, heard = impostor
    result = subprocess.run([*console_script("mailroom"), "ctl", "--socket", path, "pause", "claims"],
                            env=base_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    [line] = result.stderr.splitlines()
    assert f"refusing the control socket {path}: it is served by uid {NOBODY}" in line
    assert result.stdout == ""
    assert _heard(heard) == b""  # not even hello

    # Named as the supervisor's user, the same socket is obeyed (what root does for
    # a supervisor running as "mailroom").
    trusting = subprocess.run([*console_script("mailroom"), "ctl", "--socket", path, "pause", "claims"],
                              env=dict(base_env, MAILROOM_CONTROL_OWNER="nobody"),
                              capture_output=True, text=True, timeout=30)
    assert trusting.returncode == 0 and "done" in trusting.stdout, trusting.stderr
    assert b'"cmd":"pause"' in _heard(heard)


def test_the_monitors_client_refuses_it_too(impostor):
    from mailroom.control.client import AsyncControlClient, UntrustedSocket

    path, heard = impostor

    async def connect() -> None:
        client = AsyncControlClient(path)
        try:
            await client.connect()
        finally:
            await client.close()

    with pytest.raises(UntrustedSocket, match=f"served by uid {NOBODY}"):
        asyncio.run(connect())
    assert _heard(heard) == b""


def test_an_unknown_control_owner_is_one_line_exit_2(base_env):
    result = subprocess.run([*console_script("mailroom"), "ctl", "status"], capture_output=True, text=True,
                            env=dict(base_env, MAILROOM_CONTROL_OWNER="no-such-user-here"), timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "MAILROOM_CONTROL_OWNER" in line and "no such user 'no-such-user-here'" in line
