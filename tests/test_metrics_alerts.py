"""Metrics an alert can trust (issue 19 item 6), scraped from a real supervisor.

The installed ``mailroom-supervisor`` runs on PostgreSQL and moto's SES over HTTP
with its ``/metrics`` listener.  A planned restart (``ctl restart``, ``SIGHUP``)
and a crash count apart in ``mailroom_worker_restarts_total{reason}``; no
``_created`` series; rates carry the README's unit (recipients per second); and
every series and label the README's alert rules name is one the supervisor
exports, so none of those alerts is silently empty.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from collector_util import wait_for
from prometheus_client.parser import text_string_to_metric_families
from ses_emulator import free_port
from supervisor_util import SupervisorProcess, supervisor_env

from mailroom.control.client import ControlClient

README = Path(__file__).resolve().parent.parent / "README.md"


class Scraped:
    """One scrape: the raw text, and each sample's value by name and labels."""

    def __init__(self, port: int) -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        self.text = urllib.request.urlopen(url, timeout=10).read().decode()
        self.samples: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        self.help: dict[str, str] = {}
        for family in text_string_to_metric_families(self.text):
            self.help[family.name] = family.documentation
            for sample in family.samples:
                self.samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples[name][frozenset(labels.items())]


@pytest.fixture
def metered(db, base_env, moto) -> Iterator[tuple[SupervisorProcess, int, str]]:
    """A supervisor with /metrics on a free port: (process, port, control socket)."""
    port = free_port()
    env = supervisor_env(base_env, db, moto.url, metrics_addr=f"127.0.0.1:{port}")
    sup = SupervisorProcess(env)
    try:
        wait_for(lambda: _scrapes(port), timeout=30, what="/metrics")
        sup.worker("sender")
        sup.worker("collector")
        yield sup, port, env["MAILROOM_CONTROL_SOCKET"]
    finally:
        sup.kill()


def _scrapes(port: int) -> bool:
    try:
        Scraped(port)
        return True
    except OSError:
        return False


def restarts(port: int, worker: str, reason: str) -> float:
    return Scraped(port).value("mailroom_worker_restarts_total", worker=worker, reason=reason)


def test_planned_restarts_and_crashes_are_counted_apart(metered):
    sup, port, socket_path = metered
    for worker in ("collector", "sender"):
        for reason in ("planned", "crash"):
            assert restarts(port, worker, reason) == 0  # there from the start: rate() sees the first
    with ControlClient(socket_path, timeout=30) as ctl:
        ctl.connect()
        ctl.request("restart", worker="sender")
    wait_for(lambda: restarts(port, "sender", "planned") == 1, timeout=30, what="ctl restart counted planned")
    wait_for(lambda: len(sup.started("sender")) == 2, timeout=30, what="the second sender")
    sup.signal(signal.SIGHUP)
    wait_for(lambda: restarts(port, "sender", "planned") == 2 and restarts(port, "collector", "planned") == 1,
             timeout=30, what="SIGHUP counted planned for both workers")
    wait_for(lambda: len(sup.started("sender")) == 3, timeout=30, what="the third sender")
    os.kill(sup.worker("sender"), signal.SIGKILL)
    wait_for(lambda: restarts(port, "sender", "crash") == 1, timeout=30, what="a killed sender counted a crash")
    scraped = Scraped(port)
    assert scraped.value("mailroom_worker_restarts_total", worker="sender", reason="planned") == 2
    assert scraped.value("mailroom_worker_restarts_total", worker="collector", reason="crash") == 0
    assert sup.stop() == 0


def test_no_created_series_and_rates_in_recipients_per_second(metered):
    _, port, _ = metered
    scraped = Scraped(port)
    assert "_created" not in scraped.text
    # The unit of the README, `ctl set-rate` and MAILROOM_SES_MAX_SEND_RATE.
    for name in ("mailroom_send_rate_limit", "mailroom_ses_max_send_rate"):
        assert "recipients per second" in scraped.help[name], scraped.help[name]
    assert "email" not in scraped.help["mailroom_send_rate_limit"].lower()
    # The configured 100000 recipients/s, as the sender applies it.
    wait_for(lambda: Scraped(port).value("mailroom_send_rate_limit") == 100_000, what="the rate limit gauge")
    readme = README.read_text()
    assert "recipients per second" in readme[readme.index("**Metrics.**"):]


def _alert_rules() -> list[dict[str, str]]:
    """The alert rules of the README's YAML blocks."""
    rules = []
    for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S):
        for group in (yaml.safe_load(block) or {}).get("groups", []):
            rules += [rule for rule in group["rules"] if "alert" in rule]
    return rules


def test_the_readme_alerts_use_series_the_supervisor_exports(metered):
    _, port, _ = metered
    rules = _alert_rules()
    assert {"MailroomWorkerCrashing", "MailroomSesPaused", "MailroomQueueStuck"} <= {r["alert"] for r in rules}
    crashing = next(r for r in rules if r["alert"] == "MailroomWorkerCrashing")
    assert 'reason="crash"' in crashing["expr"]  # a reload must not page anyone
    named = {name for rule in rules for name, _ in re.findall(r"\b(mailroom_\w+)(\{[^}]*\})?", rule["expr"])}
    # Some series appear with the first report of the worker that feeds them
    # (mailroom_template_ok once the sender has checked its templates): wait for them.
    wait_for(lambda: named <= Scraped(port).samples.keys(), timeout=30, what="the series the alerts name")
    scraped = Scraped(port)
    for rule in rules:
        for name, matchers in re.findall(r"\b(mailroom_\w+)(\{[^}]*\})?", rule["expr"]):
            assert name in scraped.samples, f"{rule['alert']}: {name} is not exported"
            wanted = set(re.findall(r'(\w+)="([^"]*)"', matchers))
            assert any(wanted <= labels for labels in scraped.samples[name]), (
                f"{rule['alert']}: no {name} series with {matchers}")
