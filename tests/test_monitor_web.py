"""``mailroom monitor --web`` in a real browser (headless Chromium through Selenium, and
Chromium's own ``--screenshot`` mode), against a real supervisor and moto's SES over HTTP.

What is asserted is the browser's view (the bytes its terminal drew) and the processes:
each tab's monitor ends when the tab closes, when the browser vanishes without closing its
websocket, and when the server stops or dies. Processes are found by their command line
(``-m mailroom.monitor --socket <this test's socket>``), so an orphan adopted by init counts.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from collector_util import insert_accounts, wait_for
from pgutil import console_script
from ses_emulator import free_port
from supervisor_util import SupervisorProcess, ledger, supervisor_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

try:
    import textual_serve  # noqa: F401
except ImportError:
    pytest.skip("--web needs textual-serve (pip install '.[web]')", allow_module_level=True)
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

# Sessions end within seconds: the heartbeat (5 s), then quit, SIGTERM, SIGKILL (1.5 s each).
SESSION_GONE = 15.0

# Before the page's scripts run: keep what the terminal receives, as text, where the
# test can read it (the terminal draws on a canvas; its text is not in the DOM).
RECORD_SCREEN = """
(() => {
  const Native = window.WebSocket;
  const decoder = new TextDecoder();
  window.__screen = "";
  function Recording(url, protocols) {
    const ws = protocols === undefined ? new Native(url) : new Native(url, protocols);
    ws.addEventListener("message", (event) => {
      if (typeof event.data !== "string") {
        window.__screen = (window.__screen + decoder.decode(new Uint8Array(event.data), {stream: true}))
          .slice(-400000);
      }
    });
    return ws;
  }
  Recording.prototype = Native.prototype;
  for (const k of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) Recording[k] = Native[k];
  window.WebSocket = Recording;
})();
"""
ESCAPE = re.compile(r"\x1b(\[[0-9;?<>=$ ]*[A-Za-z@`~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|.)")


def monitors(control_socket: str) -> list[int]:
    """Pids of the per-session monitors started for ``control_socket`` (any parent)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and b"mailroom.monitor" in argv and control_socket.encode() in argv:
            pids.append(int(entry))
    return pids


class WebMonitor:
    """A running ``mailroom monitor --web`` on a free port."""

    def __init__(self, env: dict[str, str], control_socket: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.control_socket = control_socket
        self.log = tempfile.NamedTemporaryFile(prefix="mailroom-web-", suffix=".log")
        self.proc = subprocess.Popen(
            [*console_script("mailroom"), "monitor", "--web", "--port", str(self.port),
             "--socket", control_socket], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._listening, what="the --web server listening")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.output()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def output(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")

    def sessions(self) -> list[int]:
        return monitors(self.control_socket)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        for pid in self.sessions():  # what a failed test left
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def web(db: str, base_env: dict[str, str], moto: Any) -> Iterator[WebMonitor]:
    where = tempfile.mkdtemp(prefix="mrweb")  # short: Unix socket paths are limited
    path = os.path.join(where, "control.sock")
    sup = SupervisorProcess(supervisor_env(base_env, db, moto.url, control_socket=path))
    server = WebMonitor(base_env, path)
    yield server
    server.stop()
    sup.kill()
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_SCREEN})
    try:
        yield driver
    finally:
        driver.quit()


def screen_text(driver: Any) -> str:
    return ESCAPE.sub("", driver.execute_script("return window.__screen || ''"))


def test_a_tab_shows_the_live_screen_with_batches_and_closing_it_ends_its_monitor(web, browser, db) -> None:
    browser.get(web.url)
    wait_for(lambda: "SES ms" in screen_text(browser), timeout=30, what="the Live table in the browser")
    [pid] = wait_for(web.sessions, what="the session's monitor")
    insert_accounts(db, 10, "web")
    wait_for(lambda: ledger(db).get("sent") == 10, timeout=30, what="10 sent")
    # A batch row: the batch's state and its 10 rows, drawn in the browser's terminal.
    wait_for(lambda: re.search(r"\bdone\b", screen_text(browser)), timeout=30, what="a batch row on the page")
    shot = os.environ.get("MAILROOM_WEB_SCREENSHOT")  # docs/monitor-web.png comes from here
    if shot:
        browser.save_screenshot(shot)
    # Nothing from the internet; the terminal's font from this server.
    browser.execute_async_script("document.fonts.ready.then(arguments[arguments.length - 1])")
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(web.url) or url.startswith("ws://127.0.0.1") for url in fetched), fetched
    assert any("/static/fonts/RobotoMono" in url for url in fetched), fetched
    assert browser.execute_script("return document.fonts.check('16px \"Roboto Mono\"')")

    # Close the tab normally (another tab keeps the browser up): its monitor ends.
    monitor_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    other = browser.current_window_handle
    browser.switch_to.window(monitor_tab)
    browser.close()
    browser.switch_to.window(other)
    wait_for(lambda: not web.sessions(), timeout=SESSION_GONE, what=f"monitor {pid} ended after its tab closed")
    assert web.proc.poll() is None  # the server still serves


def test_a_browser_that_vanishes_without_closing_its_websocket_leaves_no_monitor(web) -> None:
    # The reproduction: Chromium renders the page for its virtual time budget and
    # exits, never closing the websocket (as a crashed browser or a dropped tunnel does).
    with tempfile.TemporaryDirectory() as where:
        shot = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={where}",
             f"--screenshot={os.path.join(where, 'shot.png')}", "--window-size=1280,800",
             "--virtual-time-budget=15000", web.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = wait_for(lambda: web.sessions() or (shot.poll() is not None and "exited"),
                        timeout=60, what="a session while chromium runs")
        assert shot.wait(60) == 0
        assert seen != "exited", "chromium exited before its session's monitor was seen"
    wait_for(lambda: not web.sessions(), timeout=SESSION_GONE,
             what=f"monitor {seen} ended after its browser vanished")


def test_a_browser_that_stops_answering_on_an_open_connection_loses_its_monitor(web) -> None:
    # A dropped tunnel or a frozen laptop: the TCP connection stays open, nothing answers.
    # A stopped Chromium is that (the kernel still acknowledges); the heartbeat notices.
    with tempfile.TemporaryDirectory() as where:
        browser = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={where}",
             "--remote-debugging-port=0", web.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            [pid] = wait_for(web.sessions, timeout=60, what="the browser's session")
            os.killpg(browser.pid, signal.SIGSTOP)
            wait_for(lambda: not web.sessions(), timeout=SESSION_GONE,
                     what=f"monitor {pid} ended after its browser stopped answering")
        finally:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait(30)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_stopping_the_server_ends_every_session_it_started(web, signum) -> None:
    from selenium.webdriver.chrome.service import Service

    drivers = []
    try:
        for _ in range(2):  # two browsers, one session each
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
                options.add_argument(flag)
            driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
            drivers.append(driver)
            driver.get(web.url)
        pids = wait_for(lambda: len(web.sessions()) == 2 and web.sessions(), timeout=30, what="two sessions")
        started = time.monotonic()
        web.proc.send_signal(signum)
        web.proc.wait(30)
        wait_for(lambda: not web.sessions(), timeout=SESSION_GONE,
                 what=f"monitors {pids} ended with their server (no orphans)")
        assert time.monotonic() - started < SESSION_GONE
    finally:
        for driver in drivers:
            driver.quit()
