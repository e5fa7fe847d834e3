"""Verify mailroom's signed tokens in a web application, without a database lookup.

The emails mailroom sends carry an 86-character token: the token's 32-byte secret
followed by an HMAC-SHA256 over it (and over the 5-digit code, for password
recovery), base64url-encoded.  :func:`verify` checks such a token with the same
``MAILROOM_SECRET_KEY`` and returns the secret, which the application then looks up
in its ``tokens`` table (``WHERE secret = %s``) to find the account.

Example, a Flask view behind ``https://app.example/activate?token=...``::

    import os
    from flask import abort, request
    from mailroom import tokens

    KEY = os.environ["MAILROOM_SECRET_KEY"]  # 64 hex characters

    @app.get("/activate")
    def activate():
        secret = tokens.verify(KEY, request.args.get("token", ""), "activation")
        if secret is None:
            abort(404)  # forged, truncated or mangled link: never an exception
        ...  # find the token row by secret, check it is not expired or consumed

For password recovery pass the code the user typed as well:
``tokens.verify(KEY, token, "password_recovery", code=form["code"])``.

Rotating the key without breaking the links already in inboxes (Django's
``SECRET_KEY_FALLBACKS`` pattern): give every key still accepted, the current one
first, and links signed with any of them verify; mailroom signs with the current
key only (``MAILROOM_SECRET_KEY``; the older ones are ``MAILROOM_SECRET_KEY_FALLBACKS``)::

    KEYS = [os.environ["MAILROOM_SECRET_KEY"],
            *filter(None, os.environ.get("MAILROOM_SECRET_KEY_FALLBACKS", "").split(","))]
    secret = tokens.verify(None, request.args.get("token", ""), "activation", keys=KEYS)

:func:`match` also says which key matched (``mailroom tokens verify`` shows it).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
from collections.abc import Sequence

from mailroom import wire
from mailroom.vocabulary import Action

__all__ = ["Action", "KeyMatch", "match", "token_secret", "verify"]

#: A key as :func:`verify` takes it: 64 hexadecimal characters or 32 raw bytes.
Key = bytes | str


def _action(action: int | str) -> Action:
    for known in Action:
        if isinstance(action, str) and action == known.db_name:
            return known
        if isinstance(action, int) and not isinstance(action, bool) and action == known.value:
            return known
    names = ", ".join(f"{known.value} or {known.db_name!r}" for known in Action)
    raise ValueError(f"unknown action {action!r}: expected {names}")


@dataclasses.dataclass(frozen=True)
class KeyMatch:
    """Which key signed a token: ``index`` 0 is the first key given (the current
    one), 1 the first fallback, ...; ``secret`` is the token's 32-byte secret."""

    index: int
    secret: bytes = dataclasses.field(repr=False)


def _check_code(action: Action, code: str | None) -> bool:
    """Raise for a bad ``code`` argument; False for a code no token was ever signed with."""
    if action is Action.RECOVERY and code is None:
        raise TypeError("verify() needs the code for a password recovery token")
    if code is not None:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if not code.isascii():
            try:
                code.encode("utf-8")
            except UnicodeEncodeError:
                # Lone surrogates (a form decoded with surrogateescape): no token was
                # ever signed with such a code, and it is user input, so no exception.
                return False
    return True


def match(keys: Sequence[Key], token: str, action: int | str, code: str | None = None) -> KeyMatch | None:
    """Which of ``keys`` (the current key first, then the older ones) signed ``token``;
    None when none did. Every key is tried, whichever matches, so the time taken
    does not tell an attacker how far down the list a forgery got. Raises like
    :func:`verify` for bad keys, action or code, and ValueError for no keys."""
    if isinstance(keys, (str, bytes, bytearray)):
        raise TypeError("keys must be a list of keys, not one key")
    signers = [wire.Signer(wire.parse_key(key)) for key in keys]
    if not signers:
        raise ValueError("no key to verify with")
    number = _action(action)
    if not _check_code(number, code):
        return None
    found: KeyMatch | None = None
    for index, signer in enumerate(signers):
        secret = signer.verify(token, int(number), code)
        if secret is not None and found is None:
            found = KeyMatch(index, secret)
    return found


def verify(key: Key | None, token: str, action: int | str, code: str | None = None, *,
           keys: Sequence[Key] | None = None) -> bytes | None:
    """Return the 32-byte token secret if ``token`` is authentic, else None.

    ``key`` is ``MAILROOM_SECRET_KEY``: 64 hex characters, or the 32 raw bytes. During
    a key rotation pass ``keys=[current, older, ...]`` instead (and ``key=None``): a
    token signed with any of them is authentic.
    ``action`` is 1 / ``"activation"`` or 2 / ``"password_recovery"``; a recovery token
    is only authentic together with its ``code``.

    A malformed token (not a str, wrong length, not base64url, a flipped bit, signed
    for the other action or code) gives None and never an exception.  The MAC is
    compared in constant time.  Raises ValueError for a bad or missing key or an
    unknown action, TypeError when ``action`` is recovery and ``code`` is None, or
    when both ``key`` and ``keys`` are given.
    """
    if key is not None and keys is not None:
        raise TypeError("verify() takes key or keys=[...], not both")
    if key is None and keys is None:
        raise ValueError("no secret key given: pass the key, or keys=[current, older, ...]")
    found = match([key] if key is not None else list(keys or ()), token, action, code)
    return found.secret if found is not None else None


def token_secret(token: str) -> bytes | None:
    """The 32-byte secret a well-formed token carries, unchecked (to look its row up
    before knowing which key or code to check it with); None if malformed."""
    if not isinstance(token, str) or len(token) != wire.TOKEN_LENGTH:
        return None
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii") + b"==")
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    # Only the canonical spelling: re-encoding must give the same characters back.
    if not hmac.compare_digest(base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), token):
        return None
    return raw[:wire.SECRET_LENGTH]
