"""The SES side of the sender: client, request building, response classification.

Everything here is stateless or thread-safe and knows nothing about batches or
scheduling; :mod:`mailroom.sender` drives it.  The pieces:

- :func:`make_client` builds the boto3 SES client with botocore's own retries off
  (our policy decides what is retried) and bounded timeouts.
- :func:`normalize_address` / :func:`destination` / :func:`bulk_request` build the
  ``SendBulkTemplatedEmail`` parameters; template data is always ``json.dumps``.
- :func:`classify_status` / :func:`classify_exception` turn a per-destination status
  or a failed call into a :class:`Verdict` (sent, retry, pause, fail).
- :mod:`mailroom.sender.raw` keeps the raw HTTP response of a failed call on disk,
  as the original sender did.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.parse
from typing import Any, NamedTuple, TextIO

import idna

from mailroom._process import one_line
from mailroom.config import Settings
from mailroom.vocabulary import Action, SesResult, SesVerdict

log = logging.getLogger("mailroom.sender")

#: The SES limit of destinations per SendBulkTemplatedEmail call.
MAX_DESTINATIONS = 50

# Template data every destination overrides completely; SES still requires a default.
_DEFAULT_DATA: dict[int, str] = {
    Action.ACTIVATION: json.dumps({"login": "", "secret": ""}),
    Action.RECOVERY: json.dumps({"login": "", "secret": "", "code": ""}),
}

class Verdict(NamedTuple):
    """What one attempt meant for one destination."""

    kind: SesVerdict
    detail: str | None  # the MessageId for SENT, else the reason


# --- client ---------------------------------------------------------------------------


def make_client(settings: Settings, *, connect_timeout: float, read_timeout: float, pool_size: int) -> Any:
    """Return a boto3 SES client for ``settings``.

    Credentials and region come from boto3's standard chain; the region falls back to
    us-east-1 when none is configured.  botocore's retries are disabled: a hidden
    retry would both hide throttling from the rate policy and double-count attempts.
    """
    import boto3  # heavy; only the process that sends imports it
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # One connection per sending thread, plus one for GetSendQuota.
        max_pool_connections=pool_size + 1,
    )
    client = session.client(
        "ses",
        region_name=session.region_name or "us-east-1",
        endpoint_url=settings.ses_endpoint_url,
        config=config,
    )
    # Before the signer, which is registered on the same event.
    client.meta.events.register_first("request-created.ses.SendBulkTemplatedEmail", _encode_form_once)
    return client


def _encode_form_once(request: Any, **_: Any) -> None:
    """Turn the query-protocol form (a dict) into its urlencoded bytes, once.

    botocore urlencodes a dict body each time the request is prepared: once to sign
    it and once to send it.  For 50 destinations that was ~40 % of the sender's CPU
    time; with bytes, both reuse the same body.  Same encoding as botocore's (UTF-8,
    ``quote_plus``), so the bytes on the wire do not change.
    """
    if isinstance(request.data, dict):
        request.data = urllib.parse.urlencode(list(request.data.items())).encode("ascii")


def read_send_quota(client: Any) -> dict[str, float] | None:
    """The account's send quota (``max_send_rate``, ``max_24h_send``,
    ``sent_last_24h``), or None when it cannot be read (logged at DEBUG: the
    caller decides how loud a failure is)."""
    try:
        quota = client.get_send_quota()
    except Exception as exc:  # noqa: BLE001 - any failure has the same answer
        log.debug("cannot read the SES send quota: %s", one_line(exc, named=True))
        return None
    return {"max_send_rate": float(quota.get("MaxSendRate") or 0),
            "max_24h_send": float(quota.get("Max24HourSend") or 0),
            "sent_last_24h": float(quota.get("SentLast24Hours") or 0)}


def read_send_rate(client: Any) -> float | None:
    """Return the account's ``MaxSendRate`` (recipients/s), or None for no limit.

    A failure is logged as a warning and means "no limit": better to send and be
    throttled (which we retry) than not to send at all.
    """
    try:
        quota = client.get_send_quota()
    except Exception as exc:  # noqa: BLE001 - any failure has the same answer
        log.warning("cannot read the SES send quota (%s); sending without a rate limit", one_line(exc, named=True))
        return None
    rate = float(quota.get("MaxSendRate") or 0)
    if rate <= 0:  # SES uses -1 for "unlimited"
        return None
    return rate


class PrintingClient:
    """Debug mode's stand-in for the SES client: prints each request, sends nothing.

    Each ``SendBulkTemplatedEmail`` request is written to ``out`` as one JSON
    object per line, and every destination is answered with :data:`STATUS`,
    which the sender records as ``emitted`` (printed, not sent): an operator who
    turns debug mode on in production must not find those emails marked sent.
    """

    STATUS = "PrintedNotSent"

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send_bulk_templated_email(self, **request: Any) -> dict[str, Any]:
        """Print ``request``; answer as SES would, with one status per destination."""
        with self._lock:
            self._out.write(json.dumps(request, ensure_ascii=False) + "\n")
            self._out.flush()
        return {"Status": [{"Status": self.STATUS}] * len(request["Destinations"])}


# --- requests ---------------------------------------------------------------------------


class AddressError(ValueError):
    """An address SES cannot take as it is; ``str()`` is the reason."""


# RFC 5321 local part: a dot-atom, or a quoted string of printable ASCII.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def normalize_address(email: str) -> str:
    """Return ``email`` as SES takes it, or raise :class:`AddressError`.

    SES has no SMTPUTF8: the local part must be ASCII, and an internationalised
    domain must be sent in its IDNA (punycode) form, which this function produces.
    """
    at = email.rfind("@")
    if at <= 0 or at == len(email) - 1:
        raise AddressError("not an email address (expected local-part@domain)")
    local, domain = email[:at], email[at + 1 :]
    if not local.isascii():
        raise AddressError("the local part has non-ASCII characters, which SES cannot send to "
                           "(no SMTPUTF8)")
    if len(local) > 64:
        raise AddressError("the local part is longer than 64 characters")
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED.fullmatch(local)):
        raise AddressError("the local part is not valid address syntax")
    if not domain.isascii():
        # UTS 46 / IDNA 2008 (the idna package), not Python's "idna" codec, which is
        # IDNA 2003 and maps straße.example to strasse.example: another domain.
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise AddressError(f"the domain cannot be encoded as IDNA ({exc})") from None
    labels = domain.split(".")
    if len(domain) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError("the domain is not a valid host name")
    return f"{local}@{domain}"


def template_data(action: int, login: str, token: str, code: str) -> str:
    """Return one destination's ``ReplacementTemplateData`` (JSON, never pasted)."""
    if action == Action.ACTIVATION:
        data = {"login": login, "secret": token}
    else:
        data = {"login": login, "secret": token, "code": code}
    # Non-ASCII stays as UTF-8 (smaller than \\u escapes); the JSON is equivalent.
    return json.dumps(data, ensure_ascii=False)


def destination(address: str, data: str) -> dict[str, Any]:
    """One entry of ``Destinations``: a single recipient with its template data."""
    return {"Destination": {"ToAddresses": [address]}, "ReplacementTemplateData": data}


def bulk_request(settings: Settings, action: int, destinations: list[dict[str, Any]]) -> dict[str, Any]:
    """The keyword arguments of one ``SendBulkTemplatedEmail`` call."""
    template = settings.ses_template_activation if action == Action.ACTIVATION else settings.ses_template_recovery
    return {
        "Source": settings.ses_source,
        "Template": template,
        "ConfigurationSetName": settings.ses_config_set,
        "DefaultTemplateData": _DEFAULT_DATA[action],
        "Destinations": destinations,
    }


# --- responses --------------------------------------------------------------------------

_STATUS_RETRY = {"TransientFailure", "AccountThrottled"}
# A daily quota is a pause too: nothing will go out for a while, and burning
# attempts on it would fail tokens that can be sent tomorrow.
_STATUS_PAUSE = {"AccountSendingPaused", "ConfigurationSetSendingPaused", "AccountDailyQuotaExceeded"}

_ERROR_RETRY = {
    "Throttling",
    "ThrottlingException",
    "AccountThrottled",
    "RequestThrottled",
    "TooManyRequestsException",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
}
# The template named in the call does not exist (moto and SES spell it both ways).
NO_TEMPLATE_CODES = {"TemplateDoesNotExist", "TemplateDoesNotExistException"}
_ERROR_PAUSE = {
    "AccountSendingPausedException",
    "ConfigurationSetSendingPausedException",
    "AccountSendingPaused",
    "ConfigurationSetSendingPaused",
    "AccountDailyQuotaExceeded",
}


def classify_status(entry: dict[str, Any]) -> Verdict:
    """Classify one ``Status`` entry of a SendBulkTemplatedEmail response."""
    status = entry.get("Status", "")
    if status == PrintingClient.STATUS:
        return Verdict(SesVerdict.EMITTED, None)
    # moto leaves Status out of its answers; a MessageId alone means accepted too.
    if status == "Success" or (not status and entry.get("MessageId") and not entry.get("Error")):
        return Verdict(SesVerdict.SENT, entry.get("MessageId"))
    reason = f"{status or 'no status'}: {entry['Error']}" if entry.get("Error") else status or "no status"
    if not status:
        # Not accepted, not refused: sending once more beats losing the email.
        return Verdict(SesVerdict.RETRY, reason)
    if status in _STATUS_RETRY:
        return Verdict(SesVerdict.RETRY, reason)
    if status in _STATUS_PAUSE:
        return Verdict(SesVerdict.PAUSE, reason)
    return Verdict(SesVerdict.FAIL, reason)


def _unreadable() -> tuple[type[BaseException], ...]:
    from botocore.parsers import ResponseParserError

    # Not XML at all (ResponseParserError), or XML without the elements the
    # operation's shape expects: botocore's parser then fails on a lookup.
    return (ResponseParserError, KeyError, IndexError, TypeError)


def classify_exception(exc: BaseException) -> Verdict:
    """Classify a call that failed as a whole (applies to all its destinations)."""
    from botocore import exceptions as bce

    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "") or "Unknown"
        message = error.get("Message", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        reason = f"{code}: {message}" if message else code
        if code in NO_TEMPLATE_CODES:
            return Verdict(SesVerdict.NO_TEMPLATE, reason)
        if code in _ERROR_PAUSE or (code == "Throttling" and "daily" in message.lower()):
            return Verdict(SesVerdict.PAUSE, reason)
        if code in _ERROR_RETRY or status >= 500 or status == 429:
            return Verdict(SesVerdict.RETRY, reason if status < 500 else f"HTTP {status} {reason}")
        return Verdict(SesVerdict.FAIL, reason)
    if isinstance(exc, _unreadable()):
        # An answer that is not SES's XML (a proxy's page, a truncated body): the
        # call may well succeed next time.  The body is only in the raw response
        # file, never in a log line or last_error (it can be anything, any length).
        return Verdict(SesVerdict.RETRY, "SES answered with a body that is not the expected XML")
    # Connection refused/reset, connect and read timeouts; and credentials that could
    # not be fetched right now (instance metadata can fail for a moment).
    if isinstance(
        exc,
        (bce.ConnectionError, bce.HTTPClientError, bce.NoCredentialsError, bce.CredentialRetrievalError),
    ):
        return Verdict(SesVerdict.RETRY, one_line(exc, named=True))
    return Verdict(SesVerdict.FAIL, one_line(exc, named=True))


_THROTTLED = {"Throttling", "ThrottlingException", "AccountThrottled", "RequestThrottled",
              "TooManyRequestsException"}


def call_result(exc: BaseException | None) -> SesResult:
    """How a call ended as a whole, for ``mailroom_ses_requests_total``: ``ok``
    when SES answered (``exc`` None), ``throttled`` when it said slow down."""
    if exc is None:
        return SesResult.OK
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _THROTTLED or status == 429:
            return SesResult.THROTTLED
    return SesResult.ERROR


def is_service_error(exc: BaseException) -> bool:
    """True when SES answered, with an error document or an unreadable body
    (there is a raw response to keep)."""
    from botocore.exceptions import ClientError

    return isinstance(exc, (ClientError, *_unreadable()))
