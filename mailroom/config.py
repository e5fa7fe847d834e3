"""Configuration from ``MAILROOM_*`` environment variables, parsed and validated once.

The variables and defaults are the original collector's and sender's (see the README's table);
the variables this project added are documented in the README. Unlike the original,
a malformed value is refused instead of silently replaced by its default: the caller
gets a :class:`ConfigError` naming the variable and the problem, and the console
scripts turn it into one line on stderr and exit code :data:`EXIT_CONFIG`.
The secret key's value is never part of any message or ``repr``.
"""

# A little past the house's ~400 lines: one table of every variable with its parser
# beside it (STYLE.md), so a new variable is one row and one small function here;
# split in two, the table would have to import its parsers from elsewhere.

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from mailroom.vocabulary import BatchMode

#: Exit codes shared by every console script. A worker exiting with a boot-error
#: code tells the supervisor not to restart it (gunicorn's WORKER_BOOT_ERROR idea).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_SCHEMA = 3

#: Settings the whole family needs; every program picks the ones it requires.
DATABASE = "database_url"
SECRET = "secret_key"


class ConfigError(Exception):
    """A missing or malformed configuration value; ``str()`` is one printable line."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration. Durations are milliseconds, as in the environment."""

    database_url: str = dataclasses.field(default="", repr=False)
    #: A direct connection for the collector's LISTEN when ``database_url`` goes
    #: through a transaction pooler (PgBouncer); None: LISTEN on ``database_url``.
    listen_url: str | None = dataclasses.field(default=None, repr=False)
    secret_key: bytes = dataclasses.field(default=b"", repr=False)
    #: Older keys still accepted by ``mailroom tokens verify`` during a rotation;
    #: mailroom never signs with them.
    secret_key_fallbacks: tuple[bytes, ...] = dataclasses.field(default=(), repr=False)
    channel_name: str = "token_insert"
    queue_name: str = "mailroom"
    healthcheck_interval: int = 270_000
    batch_timeout: int = 5_000
    batch_limit: int = 10
    batch_mode: BatchMode = BatchMode.ADAPTIVE
    claim_timeout: int = 300_000
    debug: bool = False
    ses_config_set: str = "default"
    ses_source: str = "noreply@localhost"
    ses_output_path: str = "./output"
    ses_endpoint_url: str | None = None
    ses_template_activation: str = "activationv1"
    ses_template_recovery: str = "passwordrecoveryv1"
    ses_concurrency: int | None = None  # None: auto (follows the quota, at most 16)
    ses_max_send_rate: float | None = None
    send_max_attempts: int = 5
    max_in_flight: int | None = None    # None: auto (what the sender asks for)
    shutdown_timeout: int = 30_000
    worker_timeout: int = 30_000
    log_level: str = "INFO"
    impl: str = ""
    control_socket: str | None = None   # None: the default path; "off": no socket
    control_group: str | None = None
    control_owner: int | None = None    # clients: a uid trusted beside root and their own
    metrics_addr: str | None = None     # "host:port"; None: no metrics listener
    ses_output_max_files: int = 1_000
    ses_output_max_bytes: int = 100 * 1024 * 1024
    send_retry_backoff: int = 30_000
    templates_dir: str = "./templates"
    #: The SQS queue SES events arrive on (DESIGN.md 11); set, the supervisor forks
    #: the events worker.  Its endpoint is boto3's (``AWS_ENDPOINT_URL_SQS``).
    ses_events_queue_url: str | None = None
    #: The supervisor pauses claims by itself past either rate over the last 24 h of
    #: sends (DESIGN.md 11; None: off), once at least ``pause_min_sends`` were sent.
    pause_bounce_rate: float | None = None
    pause_complaint_rate: float | None = None
    pause_min_sends: int = 1_000


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    if raw != raw.strip():
        # A name with a stray space from an env file would be another channel, queue or
        # template that nobody uses: delivery would stop with nothing said.
        raise ValueError(f"has leading or trailing whitespace: {raw!r}")
    return raw


def _identifier(raw: str) -> str:
    # LISTEN takes an identifier; we quote it, but refuse what cannot be a
    # channel name at all rather than fail later inside the worker.
    if not raw or len(raw.encode()) > 63 or "\x00" in raw:
        raise ValueError("must be 1 to 63 bytes long")
    return _text(raw)


def _template_name(raw: str) -> str:
    """An SES template's name: what SES accepts (up to 64 letters, digits, ``-`` or ``_``)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", raw):
        raise ValueError(f"expected an SES template name (up to 64 letters, digits, - or _), got {raw!r}")
    return raw


def _queue_url(raw: str) -> str | None:
    """An SQS queue URL (``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME``, or an
    emulator's ``http://...``); empty: none."""
    text = raw.strip()
    if not text:
        return None
    if not re.match(r"^https?://[^/\s]+/\S+$", text):
        raise ValueError(f"expected an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME), got {raw!r}")
    return text


def _positive_int(raw: str) -> int:
    text = raw.strip()
    if not re.fullmatch(r"\+?[0-9]+", text):
        raise ValueError(f"expected a positive whole number, got {raw!r}")
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be greater than zero, got {value}")
    return value


def _auto_or(parse: Callable[[str], int]) -> Callable[[str], int | None]:
    """``auto`` (None: the program decides) or what ``parse`` accepts."""

    def parse_auto(raw: str) -> int | None:
        if raw.strip().lower() == "auto":
            return None
        try:
            return parse(raw)
        except ValueError as exc:
            raise ValueError(f"{exc} (or auto)") from None

    return parse_auto


def _batch_mode(raw: str) -> BatchMode:
    try:
        return BatchMode(raw.strip().lower())
    except ValueError:
        raise ValueError(f"expected adaptive or fixed, got {raw!r}") from None


def _bounded_int(highest: int) -> Callable[[str], int]:
    """A positive whole number of at most ``highest``.

    Every number has a ceiling: past it PostgreSQL (LIMIT, int4 columns,
    intervals), ``select()`` or the thread count would refuse it later, inside
    a worker, and the supervisor would restart that worker in a loop instead of
    stopping with one line naming the variable.
    """

    def parse(raw: str) -> int:
        value = _positive_int(raw)
        if value > highest:
            raise ValueError(f"must be at most {highest}, got {value}")
        return value

    return parse


def _bounded_float(highest: float) -> Callable[[str], float]:
    """A positive finite number of at most ``highest`` (see :func:`_bounded_int`)."""

    def parse(raw: str) -> float:
        value = _positive_float(raw)
        if value > highest:
            raise ValueError(f"must be at most {highest:g}, got {raw.strip()}")
        return value

    return parse


_DAY_MS = 86_400_000

_URI_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@?#:]*:([^/@?#]*)@")
_KEYWORD_PASSWORD = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def redact(text: str, database_url: str) -> str:
    """``text`` with the password of ``database_url`` replaced by ``***``.

    libpq and psycopg quote the whole connection string in some of their errors
    (a malformed URI); those messages are printed, so the password goes first.
    """
    secrets = [m.group(1) for m in (_URI_PASSWORD.match(database_url.strip()),
                                    _KEYWORD_PASSWORD.search(database_url)) if m]
    for secret in secrets:
        bare = secret.strip("'")
        for candidate in {secret, bare}:
            if candidate:
                text = text.replace(candidate, "***")
    return text


def _database_url(raw: str) -> str:
    # Only what a worker would otherwise trip over in a restart loop: the port.
    # The rest is libpq's to judge (it does, on the first connect, and the
    # worker turns that into exit 2); no psycopg here, the supervisor imports this.
    text = raw.strip()  # a URL read from a file keeps its newline: harmless here
    if not text:
        raise ValueError("must not be empty")
    ports: list[str] = []
    if "://" in text:
        netloc = text.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        for host in netloc.rsplit("@", 1)[-1].split(","):
            host = host.rsplit("]", 1)[-1]
            if ":" in host:
                ports.append(host.rsplit(":", 1)[1])
        query = text.split("?", 1)[1] if "?" in text else ""
        ports += [part[5:] for part in query.split("&") if part.startswith("port=")]
    else:
        ports += [m.group(1).strip("'") for m in re.finditer(r"\bport\s*=\s*('[^']*'|\S+)", text)]
    for listed in ports:
        for port in listed.split(","):
            if port and (not port.isdigit() or not port.isascii() or not 1 <= int(port) <= 65535):
                raise ValueError(f"port must be 1 to 65535, got {redact(port, text)!r}")
    return text


def _optional_database_url(raw: str) -> str | None:
    return _database_url(raw) if raw.strip() else None


def _positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a positive number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number greater than zero, got {raw!r}")
    return value


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def _rate(raw: str) -> float | None:
    """A ratio in (0, 1) such as ``0.04``; empty or ``off``: None."""
    if raw.strip().lower() in ("", "off"):
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a ratio such as 0.04 (4 %) or off, got {raw!r}") from None
    if not 0 < value < 1:
        raise ValueError(f"must be a ratio between 0 and 1 such as 0.04 (4 %), got {raw!r}")
    return value


def _boolean(raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _secret_key(raw: str) -> bytes:
    # Never include the value (not even part of it) in the message.
    text = raw.strip()
    if len(text) != 64:
        raise ValueError(f"must be 64 hexadecimal characters (32 bytes), got {len(text)} characters")
    # Not bytes.fromhex alone: it skips spaces between pairs, and "00 11 ..." of 64
    # characters would be a 31-byte key that every worker then refuses, in a loop.
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", text):
        raise ValueError("must be 64 hexadecimal characters (32 bytes); it contains a non-hex character")
    return bytes.fromhex(text)


def _secret_keys(raw: str) -> tuple[bytes, ...]:
    """Comma-separated keys in the secret key's format; an empty value is no key, and
    empty items (a trailing comma) are none either, as the README's web-app code reads it."""
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if not parts:
        return ()
    keys = []
    for number, part in enumerate(parts, 1):
        try:
            keys.append(_secret_key(part))
        except ValueError as exc:  # says the length or "non-hex", never the value
            raise ValueError(f"key {number} of {len(parts)}: {exc}") from None
    return tuple(keys)


def _impl(raw: str) -> str:
    choice = raw.strip().lower()
    if choice not in {"", "c", "python"}:
        raise ValueError(f"expected c, python or empty (automatic), got {raw!r}")
    return choice


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return level


def _control_socket(raw: str) -> str:
    text = raw.strip()
    if text.lower() == "off":
        return "off"
    if not text:
        raise ValueError("must be a socket path or off")
    if len(text.encode()) > 107 or "\x00" in text:
        raise ValueError("a Unix socket path is at most 107 bytes")
    return text


def _group(raw: str) -> str:
    import grp

    name = raw.strip()
    if not name:
        raise ValueError("must not be empty")
    try:
        grp.getgrnam(name)
    except KeyError:
        if not name.isdigit():
            raise ValueError(f"no such group {name!r}") from None
    return name


def user_id(raw: str) -> int:
    """A user name or numeric uid as a uid; ``ValueError`` for an unknown name."""
    import pwd

    name = raw.strip()
    if name.isdigit() and name.isascii():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError(f"no such user {name!r}") from None


def split_host_port(raw: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as ``(host, port)``; ``ValueError`` if malformed."""
    text = raw.strip()
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets ([::1]:9464), got {raw!r}")
    if not sep or not host or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"expected host:port, got {raw!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1 to 65535, got {port}")
    return host, port


def _host_port(raw: str) -> str | None:
    if raw.strip().lower() in ("", "off"):
        return None
    split_host_port(raw)
    return raw.strip()


# field name -> (environment variable, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "database_url": ("MAILROOM_DATABASE_URL", _database_url),
    "listen_url": ("MAILROOM_LISTEN_URL", _optional_database_url),
    "secret_key": ("MAILROOM_SECRET_KEY", _secret_key),
    "secret_key_fallbacks": ("MAILROOM_SECRET_KEY_FALLBACKS", _secret_keys),
    "channel_name": ("MAILROOM_CHANNEL_NAME", _identifier),
    "queue_name": ("MAILROOM_QUEUE_NAME", _text),
    "healthcheck_interval": ("MAILROOM_HEALTHCHECK_INTERVAL", _bounded_int(_DAY_MS)),
    "batch_timeout": ("MAILROOM_BATCH_TIMEOUT", _bounded_int(3_600_000)),
    "batch_limit": ("MAILROOM_BATCH_LIMIT", _bounded_int(100_000)),
    "batch_mode": ("MAILROOM_BATCH_MODE", _batch_mode),
    "claim_timeout": ("MAILROOM_CLAIM_TIMEOUT", _bounded_int(7 * _DAY_MS)),
    "debug": ("MAILROOM_DEBUG", _boolean),
    "ses_config_set": ("MAILROOM_SES_CONFIG_SET", _text),
    "ses_source": ("MAILROOM_SES_SOURCE", _text),
    "ses_output_path": ("MAILROOM_SES_OUTPUT_PATH", _text),
    "ses_endpoint_url": ("MAILROOM_SES_ENDPOINT_URL", _text),
    "ses_template_activation": ("MAILROOM_SES_TEMPLATE_ACTIVATION", _template_name),
    "ses_template_recovery": ("MAILROOM_SES_TEMPLATE_RECOVERY", _template_name),
    "ses_concurrency": ("MAILROOM_SES_CONCURRENCY", _auto_or(_bounded_int(64))),
    "ses_max_send_rate": ("MAILROOM_SES_MAX_SEND_RATE", _bounded_float(1_000_000.0)),
    "ses_output_max_files": ("MAILROOM_SES_OUTPUT_MAX_FILES", _bounded_int(1_000_000)),
    "ses_output_max_bytes": ("MAILROOM_SES_OUTPUT_MAX_BYTES", _bounded_int(2**50)),
    "send_retry_backoff": ("MAILROOM_SEND_RETRY_BACKOFF", _bounded_int(_DAY_MS)),
    "templates_dir": ("MAILROOM_TEMPLATES_DIR", _text),
    "ses_events_queue_url": ("MAILROOM_SES_EVENTS_QUEUE_URL", _queue_url),
    "pause_bounce_rate": ("MAILROOM_PAUSE_BOUNCE_RATE", _rate),
    "pause_complaint_rate": ("MAILROOM_PAUSE_COMPLAINT_RATE", _rate),
    "pause_min_sends": ("MAILROOM_PAUSE_MIN_SENDS", _bounded_int(1_000_000_000)),
    "send_max_attempts": ("MAILROOM_SEND_MAX_ATTEMPTS", _bounded_int(1_000)),
    "max_in_flight": ("MAILROOM_MAX_IN_FLIGHT", _auto_or(_bounded_int(1_000))),
    "shutdown_timeout": ("MAILROOM_SHUTDOWN_TIMEOUT", _bounded_int(_DAY_MS)),
    "worker_timeout": ("MAILROOM_WORKER_TIMEOUT", _bounded_int(_DAY_MS)),
    "log_level": ("MAILROOM_LOG_LEVEL", _log_level),
    "control_socket": ("MAILROOM_CONTROL_SOCKET", _control_socket),
    "control_group": ("MAILROOM_CONTROL_GROUP", _group),
    "control_owner": ("MAILROOM_CONTROL_OWNER", user_id),
    "metrics_addr": ("MAILROOM_METRICS_ADDR", _host_port),
    # Read by mailroom.wire at import; validated here so a typo is one clear line.
    "impl": ("MAILROOM_IMPL", _impl),
}

VARIABLES: dict[str, str] = {field: var for field, (var, _) in _VARIABLES.items()}


def load(environ: Mapping[str, str], require: Collection[str] = ()) -> Settings:
    """Parse every ``MAILROOM_*`` variable of ``environ`` into :class:`Settings`.

    ``require`` names the fields (e.g. :data:`DATABASE`, :data:`SECRET`) that this
    program cannot run without. Raises :class:`ConfigError` for the first problem.
    """
    values: dict[str, Any] = {}
    for field, (variable, parse) in _VARIABLES.items():
        raw = environ.get(variable)
        if raw is None:
            if field in require:
                raise ConfigError(variable, "is required but not set")
            continue
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            problem = str(exc)
            if field in (DATABASE, "listen_url"):
                problem = redact(problem, raw)
            raise ConfigError(variable, problem) from None
    settings = Settings(**values)
    if settings.healthcheck_interval < settings.batch_timeout:
        raise ConfigError(
            "MAILROOM_HEALTHCHECK_INTERVAL",
            f"must be at least MAILROOM_BATCH_TIMEOUT ({settings.batch_timeout} ms), "
            f"got {settings.healthcheck_interval} ms",
        )
    if settings.worker_timeout < 2_000:
        # Workers beat every second: less than two beats of slack kills healthy ones.
        raise ConfigError("MAILROOM_WORKER_TIMEOUT", f"must be at least 2000 ms, got {settings.worker_timeout} ms")
    return settings
