"""SES templates as files: ``mailroom templates push|pull|diff|check`` against moto's server.

The installed ``mailroom`` script is run as a process, against moto over HTTP
(``MAILROOM_SES_ENDPOINT_URL``); what SES holds afterwards is read back with a
boto3 client of the test's own.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import psycopg
import pytest
from collector_util import insert_accounts, wait_for
from pgutil import console_script
from ses_emulator import aws_isolated, free_port
from supervisor_util import supervisor_env

SHIPPED = Path(__file__).resolve().parents[1] / "templates"
NAMES = ["activationv1", "passwordrecoveryv1"]


@pytest.fixture
def ses(moto):
    """moto with the source verified and no template at all."""
    moto.reset(templates=False)
    return moto


@pytest.fixture
def env(base_env, tmp_path, ses):
    """The command's environment: moto's endpoint, dummy credentials, a copy of the
    shipped templates in a temp directory (MAILROOM_TEMPLATES_DIR)."""
    values = aws_isolated(base_env, tmp_path)
    values["MAILROOM_SES_ENDPOINT_URL"] = ses.url
    shutil.copytree(SHIPPED, tmp_path / "templates")
    values["MAILROOM_TEMPLATES_DIR"] = str(tmp_path / "templates")
    return values


def templates(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*console_script("mailroom"), "templates", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_shipped_templates_use_only_the_data_mailroom_sends_and_build_the_link_from_the_secret():
    for name, variables in (("activationv1", {"login", "secret"}), ("passwordrecoveryv1", {"login", "secret", "code"})):
        folder = SHIPPED / name
        assert sorted(p.name for p in folder.iterdir()) == ["html.html", "subject.txt", "text.txt"]
        for part in folder.iterdir():
            text = part.read_text(encoding="utf-8")
            used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
            assert used <= variables, (part, used)
            if part.name != "subject.txt":
                assert "token={{secret}}" in text
        assert "{{code}}" in (folder / "text.txt").read_text() or name == "activationv1"
        assert 'lang="en"' in (folder / "html.html").read_text()


def test_push_creates_the_templates_then_a_second_push_changes_nothing(env, ses):
    first = templates(env, "push")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "activationv1: created\npasswordrecoveryv1: created\n"
    stored = ses.client().get_template(TemplateName="passwordrecoveryv1")["Template"]
    shipped = SHIPPED / "passwordrecoveryv1"
    assert stored["SubjectPart"] == (shipped / "subject.txt").read_text().rstrip("\n")
    assert stored["HtmlPart"] == (shipped / "html.html").read_text()
    assert stored["TextPart"] == (shipped / "text.txt").read_text()

    second = templates(env, "push", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == [
        {"template": "activationv1", "ok": True, "result": "unchanged"},
        {"template": "passwordrecoveryv1", "ok": True, "result": "unchanged"}]

    text = Path(env["MAILROOM_TEMPLATES_DIR"]) / "activationv1" / "text.txt"
    text.write_text(text.read_text() + "Thanks.\n")
    third = templates(env, "push", "activationv1")
    assert (third.returncode, third.stdout) == (0, "activationv1: updated\n")
    assert ses.client().get_template(TemplateName="activationv1")["Template"]["TextPart"].endswith("Thanks.\n")


def test_pull_writes_what_ses_has_into_the_folders(env, ses, tmp_path):
    ses.client().create_template(Template={"TemplateName": "activationv1", "SubjectPart": "Hi {{login}}",
                                           "TextPart": "Open {{secret}}", "HtmlPart": "<p>{{secret}}</p>"})
    pulled = tmp_path / "pulled"
    result = templates(env, "pull", "--dir", str(pulled))
    assert result.returncode == 1  # passwordrecoveryv1 is not in SES
    assert result.stdout == (f"activationv1: written to {pulled / 'activationv1'}\n"
                             "passwordrecoveryv1: not in SES\n")
    assert (pulled / "activationv1" / "subject.txt").read_text() == "Hi {{login}}\n"
    assert (pulled / "activationv1" / "text.txt").read_text() == "Open {{secret}}"
    assert (pulled / "activationv1" / "html.html").read_text() == "<p>{{secret}}</p>"
    assert not (pulled / "passwordrecoveryv1").exists()


def test_diff_is_clean_after_a_push_and_shows_an_edit_with_exit_1(env):
    assert templates(env, "push").returncode == 0
    clean = templates(env, "diff")
    assert (clean.returncode, clean.stdout) == (0, "activationv1: same\npasswordrecoveryv1: same\n")

    text = Path(env["MAILROOM_TEMPLATES_DIR"]) / "passwordrecoveryv1" / "text.txt"
    text.write_text(text.read_text().replace("enter this code", "type this code"))
    dirty = templates(env, "diff")
    assert dirty.returncode == 1
    assert dirty.stdout.startswith("activationv1: same\n--- ses/passwordrecoveryv1/text.txt\n+++ ")
    assert "\n-and enter this code when asked: {{code}}\n+and type this code when asked: {{code}}\n" in dirty.stdout
    as_json = json.loads(templates(env, "diff", "--json").stdout)
    assert [(r["template"], r["same"], sorted(r["diff"])) for r in as_json] == [
        ("activationv1", True, []), ("passwordrecoveryv1", False, ["text"])]


def test_diff_of_a_template_ses_does_not_have_exits_1(env):
    result = templates(env, "diff", "activationv1")
    assert (result.returncode, result.stdout) == (1, "activationv1: not in SES\n")


def test_a_broken_folder_is_one_error_and_the_other_template_goes_on(env, ses):
    (Path(env["MAILROOM_TEMPLATES_DIR"]) / "passwordrecoveryv1" / "html.html").unlink()
    pushed = templates(env, "push", "--json")
    assert pushed.returncode == 1
    first, second = json.loads(pushed.stdout)
    assert (first["template"], first["ok"], first["result"]) == ("activationv1", True, "created")
    assert (second["template"], second["ok"], second["result"]) == ("passwordrecoveryv1", False, "error")
    assert "html.html" in second["error"]
    names = [t["Name"] for t in ses.client().list_templates()["TemplatesMetadata"]]
    assert names == ["activationv1"]
    diffed = json.loads(templates(env, "diff", "--json").stdout)
    assert [(r["template"], r["same"], "error" in r) for r in diffed] == [
        ("activationv1", True, False), ("passwordrecoveryv1", False, True)]


def test_check_passes_for_the_shipped_templates(env):
    assert templates(env, "push").returncode == 0
    result = templates(env, "check")
    assert (result.returncode, result.stdout) == (0, "activationv1 (activation): renders\n"
                                                         "passwordrecoveryv1 (password_recovery): renders\n")


def test_check_names_the_template_and_the_variable_the_data_does_not_fill(env, ses):
    assert templates(env, "push").returncode == 0
    # Activation data has no code: a template that uses it cannot render.
    ses.client().update_template(Template={"TemplateName": "activationv1", "SubjectPart": "Hi {{login}}",
                                           "TextPart": "Code {{code}}: {{secret}}", "HtmlPart": ""})
    result = templates(env, "check")
    assert result.returncode == 1
    assert result.stdout == ("activationv1 (activation): does not render: Attribute 'code' is not present in the"
                             " rendering data.\npasswordrecoveryv1 (password_recovery): renders\n")
    as_json = json.loads(templates(env, "check", "--json", "activationv1").stdout)
    assert as_json[0]["ok"] is False and "'code'" in as_json[0]["reason"]


def test_check_with_no_template_in_ses_exits_1_naming_each(env):
    result = templates(env, "check")
    assert result.returncode == 1
    assert result.stdout == ("activationv1 (activation): does not exist in SES\n"
                             "passwordrecoveryv1 (password_recovery): does not exist in SES\n")


def test_check_of_a_template_that_is_not_configured_is_a_usage_error(env):
    result = templates(env, "check", "welcomev2")
    assert result.returncode == 2
    assert "welcomev2: not a configured template" in result.stderr


def test_an_unreachable_ses_is_one_line_per_template(env, tmp_path):
    env["MAILROOM_SES_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    result = templates(env, "push")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == NAMES
    assert all("error: EndpointConnectionError" in line for line in lines), lines


# --- held, not failed: a real supervisor --------------------------------------------------


def _deliveries(url: str) -> dict[str, list[tuple[str, int]]]:
    """action -> [(status, attempts)] of every delivery."""
    found: dict[str, list[tuple[str, int]]] = {}
    with psycopg.connect(url) as conn:
        for action, status, attempts in conn.execute(
                "SELECT t.action::text, d.status::text, d.attempts FROM deliveries d"
                " JOIN tokens t ON t.id = d.token ORDER BY d.token"):
            found.setdefault(action, []).append((status, attempts))
    return found


def _insert_both(url: str, n: int, prefix: str) -> None:
    """``n`` activations (new accounts) and ``n`` password recoveries (active accounts)."""
    insert_accounts(url, n, f"{prefix}a")
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO accounts (email, login, status) SELECT %s || i || '@example.test',"
                     " %s || i, 'active' FROM generate_series(1, %s) AS i", (f"{prefix}r", f"{prefix}r", n))
        conn.execute("INSERT INTO tokens (action, account) SELECT 'password_recovery', id FROM accounts"
                     " WHERE status = 'active' AND login LIKE %s", (f"{prefix}r%",))


def _ctl_status(env: dict[str, str]) -> dict:
    result = subprocess.run([*console_script("mailroom"), "ctl", "--json", "status"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _metric(addr: str, line_start: str) -> str | None:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(line_start):
                return line
    return None


def test_a_missing_recovery_template_holds_recoveries_while_activations_flow(db, base_env, env, ses,
                                                                              supervisors):
    assert templates(env, "push", "activationv1").returncode == 0  # the recovery template is missing
    metrics = f"127.0.0.1:{free_port()}"
    sup_env = supervisor_env(base_env, db, ses.url, metrics_addr=metrics)
    sup = supervisors(sup_env)
    wait_for(lambda: "claiming all but password_recovery" in sup.log(), timeout=30, what="the collector told")
    assert "holding password_recovery emails: template passwordrecoveryv1 does not exist in SES" in sup.log()
    _insert_both(db, 5, "h")

    wait_for(lambda: _deliveries(db).get("activation") == [("sent", 1)] * 5, timeout=30, what="activations sent")
    # Held: never claimed, never failed, no attempt spent; the operator can see why.
    assert _deliveries(db)["password_recovery"] == [("queued", 0)] * 5
    status = wait_for(lambda: (s := _ctl_status(sup_env)).get("templates") and s, what="templates in status")
    assert status["templates"] == [
        {"template": "activationv1", "action": "activation", "ok": True, "reason": None},
        {"template": "passwordrecoveryv1", "action": "password_recovery", "ok": False,
         "reason": "template passwordrecoveryv1 does not exist in SES"}]
    assert wait_for(lambda: _metric(metrics, 'mailroom_template_ok{template="passwordrecoveryv1"}'),
                    what="metric").endswith(" 0.0")
    assert _metric(metrics, 'mailroom_template_ok{template="activationv1"}').endswith(" 1.0")
    assert sup.log().count("holding password_recovery emails") == 1  # said once
    assert {call.template for call in ses.bulk_calls()} == {"activationv1"}

    # The fix: push the template, SIGHUP; the held rows go out without a restart of the supervisor.
    assert templates(env, "push").stdout == "activationv1: unchanged\npasswordrecoveryv1: created\n"
    sup.signal(signal.SIGHUP)
    wait_for(lambda: _deliveries(db).get("password_recovery") == [("sent", 1)] * 5, timeout=30,
             what="recoveries sent")
    assert wait_for(lambda: _metric(metrics, 'mailroom_template_ok{template="passwordrecoveryv1"}')
                    .endswith(" 1.0"), what="metric back to 1")
    assert sup.stop() == 0
    recovered = [a for call in ses.bulk_calls() if call.template == "passwordrecoveryv1"
                 for a, _ in call.destinations]
    assert sorted(recovered) == sorted(f"hr{i}@example.test" for i in range(1, 6))


def test_a_template_gone_at_send_time_holds_its_rows_without_spending_attempts(db, base_env, env, ses,
                                                                                supervisors):
    assert templates(env, "push").returncode == 0
    sup_env = supervisor_env(base_env, db, ses.url)
    sup = supervisors(sup_env)
    sup.worker("collector")
    wait_for(lambda: _ctl_status(sup_env).get("templates"), what="the sender up")
    ses.client().delete_template(TemplateName="passwordrecoveryv1")  # after the start check
    _insert_both(db, 3, "g")

    wait_for(lambda: _deliveries(db).get("activation") == [("sent", 1)] * 3, timeout=30, what="activations sent")
    wait_for(lambda: "holding password_recovery emails" in sup.log(), what="the hold")
    # SES refused the call: the rows are queued again with the claim's attempt given back.
    wait_for(lambda: _deliveries(db).get("password_recovery") == [("queued", 0)] * 3, what="recoveries held")
    assert "3 held (template)" in sup.log()  # the batch's summary line
    with psycopg.connect(db) as conn:
        errors = {e for (e,) in conn.execute("SELECT last_error FROM deliveries WHERE status = 'queued'")}
    assert len(errors) == 1 and errors.pop().startswith("held: template passwordrecoveryv1 does not exist in SES")

    assert templates(env, "push").stdout == "activationv1: unchanged\npasswordrecoveryv1: created\n"
    sup.signal(signal.SIGHUP)
    wait_for(lambda: _deliveries(db).get("password_recovery") == [("sent", 1)] * 3, timeout=30,
             what="recoveries sent")
    assert sup.stop() == 0


def test_a_held_template_is_released_by_the_recheck_once_it_renders(ses, caplog):
    """The recheck alone (no SIGHUP): a broken template holds, a fixed one releases."""
    from mailroom.config import Settings
    from mailroom.sender.template_hold import TemplateHold

    client = ses.client()
    client.create_template(Template={"TemplateName": "activationv1", "SubjectPart": "Hi {{login}}",
                                     "TextPart": "{{secret}} {{code}}", "HtmlPart": ""})  # no code in activation data
    hold = TemplateHold(Settings(ses_endpoint_url=ses.url), recheck_every=0.2)
    hold.check(client)
    assert hold.held_actions() == (1, 2)
    assert hold.reason(1) == ("template activationv1 does not render:"
                              " Attribute 'code' is not present in the rendering data.")
    assert hold.reason(2) == "template passwordrecoveryv1 does not exist in SES"
    hold.start()
    try:
        client.update_template(Template={"TemplateName": "activationv1", "SubjectPart": "Hi {{login}}",
                                         "TextPart": "{{secret}}", "HtmlPart": ""})
        wait_for(lambda: hold.held_actions() == (2,), timeout=10, what="activation released")
        assert [s["ok"] for s in hold.states()] == [True, False]
    finally:
        hold.stop()
    assert sum("holding activation emails" in r.getMessage() for r in caplog.records) == 1
    assert any("template activationv1 renders now" in r.getMessage() for r in caplog.records)


class _NoTestRender:
    """The sender's client without ``ses:TestRenderTemplate``: that call is AccessDenied
    (moto cannot deny it), every other call goes to moto over HTTP; ``get_template``
    is counted, so a test can wait for rechecks instead of sleeping."""

    def __init__(self, client, deny_get: bool = False) -> None:
        self.client = client
        self.deny_get = deny_get
        self.gets = 0

    @staticmethod
    def _denied(operation: str):
        from botocore.exceptions import ClientError

        return ClientError({"Error": {"Code": "AccessDenied", "Message": f"not authorized to perform ses:{operation}"}},
                           operation)

    def test_render_template(self, **kwargs):
        raise self._denied("TestRenderTemplate")

    def get_template(self, **kwargs):
        self.gets += 1
        if self.deny_get:
            raise self._denied("GetTemplate")
        return self.client.get_template(**kwargs)


def test_a_send_time_hold_without_test_render_is_released_once_get_template_finds_the_template(ses, caplog):
    """AccessDenied on TestRenderTemplate is no verdict: the recheck asks GetTemplate instead."""
    from mailroom.config import Settings
    from mailroom.sender.template_hold import TemplateHold

    client = _NoTestRender(ses.client())
    hold = TemplateHold(Settings(ses_endpoint_url=ses.url), recheck_every=0.1)
    hold.check(client)
    assert hold.held_actions() == ()  # no verdict at start: nothing held
    hold.missing_at_send(2, "TemplateDoesNotExist: Template passwordrecoveryv1 does not exist")
    assert hold.held_actions() == (2,)
    hold.start()
    try:
        wait_for(lambda: client.gets >= 2, timeout=10, what="two rechecks")
        assert hold.held_actions() == (2,)  # still missing: still held
        ses.client().create_template(Template={"TemplateName": "passwordrecoveryv1", "SubjectPart": "Hi",
                                               "TextPart": "{{code}}", "HtmlPart": ""})
        wait_for(lambda: hold.held_actions() == (), timeout=10, what="recovery released")
        # Logged just after the release (outside the lock): waited for, not asserted at once.
        wait_for(lambda: any("template passwordrecoveryv1 exists now" in r.getMessage() for r in caplog.records),
                 timeout=10, what="the release logged")
    finally:
        hold.stop()


def test_a_send_time_hold_that_nothing_can_check_lasts_one_recheck(ses, caplog):
    """Neither TestRenderTemplate nor GetTemplate: released at the next recheck, so the next
    send asks SES again (and holds again if the template is still missing)."""
    from mailroom.config import Settings
    from mailroom.sender.template_hold import TemplateHold

    client = _NoTestRender(ses.client(), deny_get=True)
    hold = TemplateHold(Settings(ses_endpoint_url=ses.url), recheck_every=0.1)
    hold.check(client)
    hold.missing_at_send(1, "TemplateDoesNotExist: Template activationv1 does not exist")
    assert hold.held_actions() == (1,)
    hold.start()
    try:
        wait_for(lambda: hold.held_actions() == (), timeout=10, what="activation released")
        wait_for(lambda: any(r.getMessage().startswith("template activationv1 cannot be checked (AccessDenied: ")
                             and r.getMessage().endswith(": sending activation emails again")
                             for r in caplog.records), timeout=10, what="the release logged")
    finally:
        hold.stop()


def test_check_of_one_template_for_both_actions_renders_it_with_each_actions_data(env, ses):
    env["MAILROOM_SES_TEMPLATE_ACTIVATION"] = env["MAILROOM_SES_TEMPLATE_RECOVERY"] = "one"
    ses.client().create_template(Template={"TemplateName": "one", "SubjectPart": "Hi {{login}}",
                                           "TextPart": "{{secret}} {{code}}", "HtmlPart": ""})
    expected = ("one (activation): does not render: Attribute 'code' is not present in the rendering data.\n"
                "one (password_recovery): renders\n")
    for args in ((), ("one",)):
        result = templates(env, "check", *args)
        assert (result.returncode, result.stdout) == (1, expected), result.stderr
    as_json = json.loads(templates(env, "check", "--json").stdout)
    assert [(r["template"], r["action"], r["ok"]) for r in as_json] == [
        ("one", "activation", False), ("one", "password_recovery", True)]


def test_check_with_ses_unreachable_is_an_error_line_per_action_on_stderr(env):
    env["MAILROOM_SES_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    result = templates(env, "check")
    assert (result.returncode, result.stdout) == (1, "")
    lines = result.stderr.splitlines()
    assert [line.split(": error: ")[0] for line in lines] == [
        "activationv1 (activation)", "passwordrecoveryv1 (password_recovery)"], lines
    assert all(": error: EndpointConnectionError" in line for line in lines), lines
    as_json = json.loads(templates(env, "check", "--json").stdout)
    assert [(r["ok"], r["result"], r["error"].split(":")[0]) for r in as_json] == [
        (False, "error", "EndpointConnectionError")] * 2
