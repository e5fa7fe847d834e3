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
"""

from __future__ import annotations

from mailroom import wire
from mailroom.vocabulary import Action

__all__ = ["Action", "verify"]


def _action(action: int | str) -> Action:
    for known in Action:
        if isinstance(action, str) and action == known.db_name:
            return known
        if isinstance(action, int) and not isinstance(action, bool) and action == known.value:
            return known
    names = ", ".join(f"{known.value} or {known.db_name!r}" for known in Action)
    raise ValueError(f"unknown action {action!r}: expected {names}")


def verify(key: bytes | str, token: str, action: int | str, code: str | None = None) -> bytes | None:
    """Return the 32-byte token secret if ``token`` is authentic, else None.

    ``key`` is ``MAILROOM_SECRET_KEY``: 64 hex characters, or the 32 raw bytes.
    ``action`` is 1 / ``"activation"`` or 2 / ``"password_recovery"``; a recovery token
    is only authentic together with its ``code``.

    A malformed token (not a str, wrong length, not base64url, a flipped bit, signed
    for the other action or code) gives None and never an exception.  The MAC is
    compared in constant time.  Raises ValueError for a bad key or an unknown action,
    and TypeError when ``action`` is recovery and ``code`` is None.
    """
    number = _action(action)
    if number is Action.RECOVERY and code is None:
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
                return None
    signer = wire.Signer(wire.parse_key(key))
    return signer.verify(token, int(number), code)
