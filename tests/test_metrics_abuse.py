"""Issue 20 item 6: the metrics endpoint answers Prometheus under local abuse.

A real ``mailroom-supervisor`` with ``MAILROOM_METRICS_ADDR``; from this process,
70 clients dribbling request headers and 400 that connect and say nothing, then
500 scrapes at once.  Every scrape must be answered, and the backlog sent
meanwhile reaches SES once per address.
"""

from __future__ import annotations

import collections
import selectors
import socket
import time

from collector_util import insert_accounts, wait_for
from ses_emulator import free_port
from supervisor_util import ledger, supervisor_env

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"


def scrape(port: int, timeout: float = 5.0) -> bytes:
    """One scrape, as Prometheus does it: connect, send the request, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(REQUEST)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def answered(port: int) -> bool:
    try:
        return scrape(port).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    return sock


def burst(port: int, n: int, timeout: float = 30.0) -> collections.Counter[str]:
    """``n`` scrapes at once from one selector: how many got a 200, were reset, ..."""
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, bytearray] = {}
    for _ in range(n):
        sock = connect(port)
        state[sock] = bytearray()
        sel.register(sock, selectors.EVENT_WRITE)
    results: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + timeout
    while state and time.monotonic() < deadline:
        for key, events in sel.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if events & selectors.EVENT_WRITE:
                    sock.sendall(REQUEST)
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data, kind = b"", "reset"
            else:
                if data:
                    state[sock] += data
                    continue
                kind = "ok" if state[sock].startswith(b"HTTP/1.1 200") else "closed"
            results[kind] += 1
            sel.unregister(sock)
            sock.close()
            del state[sock]
    results["unanswered"] += len(state)
    for sock in state:
        sock.close()
    return results


def test_scrapes_succeed_beside_slow_and_idle_connections_and_sending_goes_on(db, base_env, supervisors, stub):
    port = free_port()
    sup = supervisors(supervisor_env(base_env, db, stub.url, metrics_addr=f"127.0.0.1:{port}", batch_limit=20))
    wait_for(lambda: answered(port), what="the metrics endpoint")

    loris = [socket.create_connection(("127.0.0.1", port)) for _ in range(70)]
    for sock in loris:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    idle = [connect(port) for _ in range(400)]
    insert_accounts(db, 300, "abuse_")
    times = []
    try:
        for i in range(15):
            for sock in loris:  # one more header line each, never the blank line
                try:
                    sock.sendall(b"X-%d: y\r\n" % i)
                except OSError:
                    pass  # evicted or timed out: it is the server's right
            started = time.monotonic()
            body = scrape(port)
            times.append(time.monotonic() - started)
            assert body.startswith(b"HTTP/1.1 200") and b"mailroom_build_info" in body, body[:200]
        results = burst(port, 500)
    finally:
        for sock in loris + idle:
            sock.close()
    print(f"15 scrapes beside 70 slow + 400 idle connections: max {max(times) * 1000:.1f} ms;"
          f" 500 scrapes at once: {dict(results)}")
    assert results["ok"] == 500, results

    wait_for(lambda: ledger(db).get("sent") == 300, timeout=60, what="300 sent")
    assert sup.stop() == 0
    counts = collections.Counter(a for request in stub.bulk for a in request.addresses)
    assert len(counts) == 300 and max(counts.values()) == 1
