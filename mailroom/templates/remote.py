"""Templates in SES: read, create, update, with the sender's endpoint and credentials.

The client is the sender's (:func:`mailroom.sender.ses.make_client`): the same
``MAILROOM_SES_ENDPOINT_URL``, credential chain and region, so ``mailroom
templates push`` writes where the sender reads.  Every SES error becomes a
:class:`SesError` whose ``str()`` is one line: ``Code: message``.
"""

from __future__ import annotations

from typing import Any

from mailroom._process import one_line
from mailroom.config import Settings
from mailroom.sender import ses
from mailroom.sender.render import is_missing_template
from mailroom.templates.files import Template


class SesError(Exception):
    """SES refused a call, or could not be reached; ``str()`` is one line."""


def make_client(settings: Settings) -> Any:
    """An SES client as the sender makes it (one connection is plenty here)."""
    return ses.make_client(settings, connect_timeout=5.0, read_timeout=20.0, pool_size=1)


def _error(exc: BaseException) -> SesError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "") or "Unknown"
        message = error.get("Message", "")
        return SesError(one_line(f"{code}: {message}" if message else code))
    return SesError(one_line(exc, named=True))


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code: str = response.get("Error", {}).get("Code", "")
    return code


def get(client: Any, name: str) -> Template | None:
    """SES's copy of template ``name``, or None when it has none."""
    try:
        answer = client.get_template(TemplateName=name)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        if is_missing_template(_code(exc)):
            return None
        raise _error(exc) from None
    return Template.from_ses(answer["Template"])


def push(client: Any, template: Template) -> str:
    """Create or update ``template`` in SES; return ``created``, ``updated`` or ``unchanged``."""
    current = get(client, template.name)
    if current == template:
        return "unchanged"
    try:
        if current is None:
            client.create_template(Template=template.to_ses())
            return "created"
        client.update_template(Template=template.to_ses())
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise _error(exc) from None
    return "updated"
