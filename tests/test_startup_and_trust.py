"""What the supervisor opens at start, and whom its control socket's clients trust.

A resource that cannot be opened at start (a busy metrics port, an unsafe socket
directory) is configuration: one line, exit 2 (which the README's systemd unit does
not restart), and nothing left behind. The clients talk only to a socket owned by
root or by their own user, so a socket put in place by another local user is refused
before a command is sent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile

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
