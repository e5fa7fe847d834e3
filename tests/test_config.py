"""Configuration: defaults of the original, and a clear refusal of every bad value."""

from __future__ import annotations

import subprocess

import pytest
from pgutil import SECRET_KEY_HEX, console_script

from mailroom import config

GOOD = {"MAILROOM_DATABASE_URL": "postgresql://127.0.0.1/x", "MAILROOM_SECRET_KEY": SECRET_KEY_HEX}


def test_defaults_are_the_originals():
    s = config.load(GOOD, require=(config.DATABASE, config.SECRET))
    assert s.secret_key == bytes.fromhex(SECRET_KEY_HEX)
    assert (s.channel_name, s.queue_name) == ("token_insert", "mailroom")
    assert (s.healthcheck_interval, s.batch_timeout, s.batch_limit) == (270000, 5000, 10)
    assert s.debug is False
    assert (s.ses_config_set, s.ses_source, s.ses_output_path) == ("default", "noreply@localhost", "./output")
    assert (s.ses_template_activation, s.ses_template_recovery) == ("activationv1", "passwordrecoveryv1")
    assert s.claim_timeout == 300000 and s.send_max_attempts == 5 and s.ses_concurrency is None
    assert s.ses_max_send_rate is None and s.ses_endpoint_url is None
    assert s.batch_mode == "adaptive" and s.max_in_flight is None  # None: auto
    auto = config.load(dict(GOOD, MAILROOM_SES_CONCURRENCY="auto", MAILROOM_MAX_IN_FLIGHT="8"))
    assert (auto.ses_concurrency, auto.max_in_flight) == (None, 8)


def test_values_are_parsed():
    env = dict(GOOD, MAILROOM_BATCH_LIMIT="3", MAILROOM_DEBUG="TRUE", MAILROOM_SES_MAX_SEND_RATE="14.5",
               MAILROOM_BATCH_TIMEOUT="100", MAILROOM_HEALTHCHECK_INTERVAL="100")
    s = config.load(env)
    assert (s.batch_limit, s.debug, s.ses_max_send_rate, s.batch_timeout) == (3, True, 14.5, 100)
    assert config.load(dict(GOOD, MAILROOM_BATCH_MODE=" Fixed")).batch_mode == "fixed"
    guard = config.load(dict(GOOD, MAILROOM_PAUSE_BOUNCE_RATE="0.04", MAILROOM_PAUSE_COMPLAINT_RATE=" 0.0008",
                             MAILROOM_PAUSE_MIN_SENDS="200"))
    assert (guard.pause_bounce_rate, guard.pause_complaint_rate, guard.pause_min_sends) == (0.04, 0.0008, 200)
    off = config.load(dict(GOOD, MAILROOM_PAUSE_BOUNCE_RATE="off"))
    assert (off.pause_bounce_rate, off.pause_complaint_rate, off.pause_min_sends) == (None, None, 1000)
    # A trailing comma is no key (the README's web-app code reads the list the same way);
    # a URL read from a file may keep its newline.
    keys = config.load(dict(GOOD, MAILROOM_SECRET_KEY_FALLBACKS=f"{'ab' * 32},"))
    assert keys.secret_key_fallbacks == (bytes.fromhex("ab" * 32),)
    assert config.load(dict(GOOD, MAILROOM_DATABASE_URL=GOOD["MAILROOM_DATABASE_URL"] + "\n")).database_url \
        == GOOD["MAILROOM_DATABASE_URL"]


BAD = [
    ({"MAILROOM_SECRET_KEY": "abc"}, "MAILROOM_SECRET_KEY", "64 hexadecimal"),
    ({"MAILROOM_SECRET_KEY": "zz" * 32}, "MAILROOM_SECRET_KEY", "non-hex"),
    ({"MAILROOM_SECRET_KEY": SECRET_KEY_HEX + "00"}, "MAILROOM_SECRET_KEY", "got 66"),
    ({"MAILROOM_BATCH_LIMIT": "ten"}, "MAILROOM_BATCH_LIMIT", "'ten'"),
    ({"MAILROOM_BATCH_LIMIT": "0"}, "MAILROOM_BATCH_LIMIT", "greater than zero"),
    ({"MAILROOM_BATCH_LIMIT": "-5"}, "MAILROOM_BATCH_LIMIT", "positive"),
    ({"MAILROOM_BATCH_LIMIT": "2.5"}, "MAILROOM_BATCH_LIMIT", "whole number"),
    ({"MAILROOM_BATCH_MODE": "nagle"}, "MAILROOM_BATCH_MODE", "adaptive or fixed"),
    ({"MAILROOM_BATCH_TIMEOUT": "0"}, "MAILROOM_BATCH_TIMEOUT", "greater than zero"),
    ({"MAILROOM_BATCH_TIMEOUT": ""}, "MAILROOM_BATCH_TIMEOUT", "positive"),
    ({"MAILROOM_HEALTHCHECK_INTERVAL": "1000"}, "MAILROOM_HEALTHCHECK_INTERVAL", "at least MAILROOM_BATCH_TIMEOUT"),
    ({"MAILROOM_DEBUG": "maybe"}, "MAILROOM_DEBUG", "true or false"),
    ({"MAILROOM_SES_MAX_SEND_RATE": "nan"}, "MAILROOM_SES_MAX_SEND_RATE", "finite"),
    ({"MAILROOM_SES_CONCURRENCY": "many"}, "MAILROOM_SES_CONCURRENCY", "whole number"),
    ({"MAILROOM_CHANNEL_NAME": ""}, "MAILROOM_CHANNEL_NAME", "1 to 63"),
    # Found by a review: each of these was accepted and then failed far away.
    ({"MAILROOM_SECRET_KEY": "00 11 " + "ab" * 29}, "MAILROOM_SECRET_KEY", "non-hex"),  # fromhex skips spaces
    ({"MAILROOM_SECRET_KEY_FALLBACKS": "00 11 " + "ab" * 29}, "MAILROOM_SECRET_KEY_FALLBACKS", "non-hex"),
    ({"MAILROOM_CHANNEL_NAME": "token_insert "}, "MAILROOM_CHANNEL_NAME", "trailing whitespace"),
    ({"MAILROOM_QUEUE_NAME": "mailroom "}, "MAILROOM_QUEUE_NAME", "trailing whitespace"),
    ({"MAILROOM_SES_SOURCE": " noreply@example.com"}, "MAILROOM_SES_SOURCE", "leading or trailing"),
    ({"MAILROOM_SES_TEMPLATE_ACTIVATION": "activationv1 "}, "MAILROOM_SES_TEMPLATE_ACTIVATION", "template name"),
    ({"MAILROOM_SES_TEMPLATE_RECOVERY": "recovery.v1"}, "MAILROOM_SES_TEMPLATE_RECOVERY", "template name"),
    ({"MAILROOM_BATCH_LIMIT": "++5"}, "MAILROOM_BATCH_LIMIT", "expected a positive whole number, got '++5'"),
    ({"MAILROOM_DATABASE_URL": " "}, "MAILROOM_DATABASE_URL", "empty"),
    ({"MAILROOM_CONTROL_SOCKET": " "}, "MAILROOM_CONTROL_SOCKET", "path or off"),
    ({"MAILROOM_CONTROL_SOCKET": "/x/" + "s" * 120}, "MAILROOM_CONTROL_SOCKET", "107 bytes"),
    ({"MAILROOM_CONTROL_GROUP": "no-such-group-here"}, "MAILROOM_CONTROL_GROUP", "no such group"),
    ({"MAILROOM_CONTROL_GROUP": ""}, "MAILROOM_CONTROL_GROUP", "empty"),
    ({"MAILROOM_METRICS_ADDR": "9464"}, "MAILROOM_METRICS_ADDR", "host:port"),
    ({"MAILROOM_METRICS_ADDR": "127.0.0.1:"}, "MAILROOM_METRICS_ADDR", "host:port"),
    ({"MAILROOM_METRICS_ADDR": ":9464"}, "MAILROOM_METRICS_ADDR", "host:port"),
    ({"MAILROOM_METRICS_ADDR": "127.0.0.1:0"}, "MAILROOM_METRICS_ADDR", "1 to 65535"),
    ({"MAILROOM_METRICS_ADDR": "127.0.0.1:65536"}, "MAILROOM_METRICS_ADDR", "1 to 65535"),
    ({"MAILROOM_METRICS_ADDR": "localhost:http"}, "MAILROOM_METRICS_ADDR", "host:port"),
    ({"MAILROOM_METRICS_ADDR": "::1:9464"}, "MAILROOM_METRICS_ADDR", "brackets"),
    ({"MAILROOM_PAUSE_BOUNCE_RATE": "4%"}, "MAILROOM_PAUSE_BOUNCE_RATE", "ratio such as 0.04"),
    ({"MAILROOM_PAUSE_COMPLAINT_RATE": "1"}, "MAILROOM_PAUSE_COMPLAINT_RATE", "between 0 and 1"),
    ({"MAILROOM_PAUSE_MIN_SENDS": "0"}, "MAILROOM_PAUSE_MIN_SENDS", "greater than zero"),
    ({"MAILROOM_SES_EVENTS_QUEUE_URL": "ses-events"}, "MAILROOM_SES_EVENTS_QUEUE_URL", "SQS queue URL"),
    ({"MAILROOM_SES_EVENTS_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com"}, "MAILROOM_SES_EVENTS_QUEUE_URL",
     "SQS queue URL"),
]


@pytest.mark.parametrize("override,variable,fragment", BAD)
def test_bad_values_are_refused(override, variable, fragment):
    with pytest.raises(config.ConfigError) as info:
        config.load(dict(GOOD, **override))
    message = str(info.value)
    assert message.startswith(variable + ":") and fragment in message
    assert "\n" not in message
    assert SECRET_KEY_HEX not in message and "zz" * 32 not in message


def test_control_plane_settings():
    s = config.load(GOOD)
    assert (s.control_socket, s.control_group, s.metrics_addr) == (None, None, None)
    s = config.load(dict(GOOD, MAILROOM_CONTROL_SOCKET="/run/m/c.sock", MAILROOM_CONTROL_GROUP="nogroup",
                         MAILROOM_METRICS_ADDR="127.0.0.1:9464"))
    assert (s.control_socket, s.control_group, s.metrics_addr) == ("/run/m/c.sock", "nogroup", "127.0.0.1:9464")
    s = config.load(dict(GOOD, MAILROOM_CONTROL_SOCKET="OFF", MAILROOM_CONTROL_GROUP="65534",
                         MAILROOM_METRICS_ADDR="off"))
    assert (s.control_socket, s.control_group, s.metrics_addr) == ("off", "65534", None)
    assert config.split_host_port("[::1]:9464") == ("::1", 9464)
    assert config.split_host_port("0.0.0.0:1") == ("0.0.0.0", 1)


def test_required_values():
    with pytest.raises(config.ConfigError, match="MAILROOM_DATABASE_URL: is required"):
        config.load({}, require=(config.DATABASE,))
    with pytest.raises(config.ConfigError, match="MAILROOM_SECRET_KEY: is required"):
        config.load({"MAILROOM_DATABASE_URL": "x"}, require=(config.DATABASE, config.SECRET))


def test_settings_repr_hides_the_key():
    s = config.load(GOOD)
    assert SECRET_KEY_HEX not in repr(s) and "secret_key" not in repr(s)


@pytest.mark.parametrize("script", ["mailroom-collector", "mailroom-supervisor", "mailroom-sender", "mailroom"])
def test_console_scripts_exit_2_with_one_line(script, base_env):
    secret = "ab" * 31 + "zz"   # 64 characters, not hex: must never be echoed
    env = dict(base_env, MAILROOM_DATABASE_URL="postgresql://127.0.0.1/none",
               MAILROOM_SECRET_KEY=secret, MAILROOM_BATCH_LIMIT="ten")
    args = ["status"] if script == "mailroom" else []
    proc = subprocess.run(console_script(script) + args, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == config.EXIT_CONFIG, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    # Every variable that is set is validated, used by this program or not.
    assert lines[0].startswith("mailroom: MAILROOM_SECRET_KEY:")
    assert secret not in proc.stderr and proc.stdout == ""


def test_bad_implementation_choice_is_one_line(base_env):
    env = dict(base_env, MAILROOM_IMPL="rust")
    proc = subprocess.run(console_script("mailroom-sender"), env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == config.EXIT_CONFIG
    assert proc.stderr.strip() == "mailroom: MAILROOM_IMPL: expected c, python or empty (automatic), got 'rust'"


@pytest.mark.parametrize("script", ["mailroom-collector", "mailroom-supervisor"])
def test_malformed_database_url_stops_with_exit_2(script, base_env):
    env = dict(base_env, MAILROOM_DATABASE_URL="host=127.0.0.1 not-a-valid-option")
    proc = subprocess.run(console_script(script), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == config.EXIT_CONFIG, proc.stderr
    assert "MAILROOM_DATABASE_URL:" in proc.stderr and "Traceback" not in proc.stderr
    assert "restarting" not in proc.stderr


def test_bad_ses_endpoint_stops_the_supervisor_with_exit_2(base_env, db):
    env = dict(base_env, MAILROOM_DATABASE_URL=db, MAILROOM_SES_ENDPOINT_URL="not a url",
               AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.run(console_script("mailroom-supervisor"), env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == config.EXIT_CONFIG, proc.stderr
    assert "cannot start the sender" in proc.stderr and "Traceback" not in proc.stderr
