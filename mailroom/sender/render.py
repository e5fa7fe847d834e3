"""Does a configured template render with the data mailroom sends?  Asked of SES.

SES accepts a ``SendBulkTemplatedEmail`` whose template uses a variable the data
does not fill, and then drops those emails (a rendering-failure event at best).
``TestRenderTemplate`` with the data one destination would carry answers the
question before anything is sent: the sender asks it at start and on SIGHUP
(:mod:`mailroom.sender.template_hold`), ``mailroom templates check`` on demand.

The sample data is built by :func:`mailroom.sender.ses.template_data`, the same
function that builds every destination's data, so the check cannot drift from
what is sent.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

from mailroom._process import one_line
from mailroom.config import Settings
from mailroom.sender import ses
from mailroom.vocabulary import Action

#: Sample values: a signed token is always 86 characters, a code 5 digits.
SAMPLE_LOGIN = "sample-login"
SAMPLE_SECRET = "A" * 86
SAMPLE_CODE = "12345"


def sample_data(action: int) -> str:
    """The ``ReplacementTemplateData`` of one destination of ``action``, with sample values."""
    return ses.template_data(action, SAMPLE_LOGIN, SAMPLE_SECRET, SAMPLE_CODE)


def configured(settings: Settings) -> dict[Action, str]:
    """The template name configured for each action."""
    return {Action.ACTIVATION: settings.ses_template_activation,
            Action.RECOVERY: settings.ses_template_recovery}


class Verdict(enum.StrEnum):
    """What SES said of a template rendered with the sample data."""

    RENDERS = "renders"
    MISSING = "missing"  # no template of that name
    BROKEN = "broken"  # a variable the data does not fill, or another rendering error
    UNKNOWN = "unknown"  # no answer about the template (connection, 5xx, access denied)


class RenderResult(NamedTuple):
    """The verdict and, unless it renders, one line saying why (without the
    template's name: the caller puts it first)."""

    verdict: Verdict
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.RENDERS


_NO_TEMPLATE = ses.NO_TEMPLATE_CODES  # one list for both questions
#: Codes meaning the template exists but does not render with this data.
_BROKEN = {"MissingRenderingAttribute", "MissingRenderingAttributeException",
           "InvalidRenderingParameter", "InvalidRenderingParameterException", "InvalidTemplate",
           "InvalidTemplateException"}


def is_missing_template(code: str) -> bool:
    """True for an SES error code saying that a template does not exist."""
    return code in _NO_TEMPLATE


def render(client: Any, template: str, action: int) -> RenderResult:
    """Render ``template`` through SES's ``TestRenderTemplate`` with ``action``'s sample data."""
    from botocore.exceptions import ClientError

    try:
        client.test_render_template(TemplateName=template, TemplateData=sample_data(action))
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "") or "Unknown"
        message = error.get("Message", "")
        if code in _NO_TEMPLATE:
            return RenderResult(Verdict.MISSING, "does not exist in SES")
        if code in _BROKEN:
            # SES: "Attribute 'code' is not present in the rendering data."
            return RenderResult(Verdict.BROKEN, f"does not render: {message or code}")
        # Anything else (throttling, 5xx, access denied to TestRenderTemplate
        # itself) says nothing of the template: holding an action on it would
        # stop sending for a permission that sending does not need.
        return RenderResult(Verdict.UNKNOWN, f"{code}: {message}" if message else code)
    except Exception as exc:  # noqa: BLE001 - connection errors, credentials: no verdict
        return RenderResult(Verdict.UNKNOWN, one_line(exc, named=True))
    return RenderResult(Verdict.RENDERS)


def exists(client: Any, template: str) -> bool | None:
    """Does SES have ``template`` (``GetTemplate``)?  None when SES does not say.

    A weaker question than :func:`render`, for a sender that may not call
    ``TestRenderTemplate``: enough to tell that a template reported missing is back.
    """
    from botocore.exceptions import ClientError

    try:
        client.get_template(TemplateName=template)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code", "") in _NO_TEMPLATE:
            return False
        return None
    except Exception:  # noqa: BLE001 - connection errors, credentials: no answer
        return None
    return True
