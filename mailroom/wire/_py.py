"""Pure-Python implementation of the wire format (the compiled ``mailroom.wire._wire`` twin).

Used when the extension is not built, or with ``MAILROOM_IMPL=python``.  Its output
and its errors are byte for byte those of the compiled module; only speed differs.
Import the public API from :mod:`mailroom.wire`, not from here.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence

from mailroom.wire._base import (
    E_ACTION,
    E_AFTER_QUOTE,
    E_FIELD_COUNT,
    E_LINE_BREAK,
    E_QUOTE_IN_FIELD,
    E_UNTERMINATED,
    E_UTF8,
    SECRET_LENGTH,
    TOKEN_LENGTH,
    WireFields,
    bad_row_item,
    check_token,
    wire_error,
)

__all__ = ["Signer", "decode_line"]

_PREFIX = {1: b"/activate", 2: b"/recover"}
_ACTION_TEXT = {1: "1", 2: "2"}
_ACTION_VALUE = {"1": 1, "2": 2}

# binascii speaks standard base64; base64url differs only in these two characters.
_TO_URL = bytes.maketrans(b"+/", b"-_")
_FROM_URL = bytes.maketrans(b"-_", b"+/")

_NEEDS_QUOTES = re.compile('[,"\r\n]').search
_BASE64URL_RUN = re.compile(r"[A-Za-z0-9_-]*").fullmatch
# A whole quoted field: possessive, so a stray quote cannot make the regex backtrack.
_QUOTED_SPLIT = re.compile(r'("(?:[^"]++|"")*+")').split
_UNQUOTED_BAD = re.compile(rb'["\r\n]').search
# 86 characters carry 516 bits for 512: a canonical token's last character has its
# low 4 bits clear.  Rejecting the others keeps tokens non-malleable.
_CANONICAL_TOKEN = re.compile(r"[A-Za-z0-9_-]{85}[AQgw]").fullmatch


def _is_action(value: object) -> bool:
    if value.__class__ is int:  # the common case, checked first
        return value == 1 or value == 2
    # int subclasses count, except bool: True must not pass for "activation".
    return isinstance(value, int) and not isinstance(value, bool) and value in (1, 2)


class Signer:
    """Signs token secrets with HMAC-SHA256 and encodes batch lines.

    ``key`` is the 32 raw bytes of ``MAILROOM_SECRET_KEY`` (see ``parse_key``).
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            # Never show the key, not even its repr.
            raise ValueError("key must be exactly 32 raw bytes (use parse_key() for the hex form)")
        # HMAC's two keyed hash states, computed once: each signature then costs one
        # copy + update per state instead of hashing the 64-byte pads again.
        block = bytes(key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def _token(self, action: int, secret: bytes, code: str | None) -> str:
        # Callers have validated the arguments (_check_row).
        data = _PREFIX[action] + secret
        if action == 2 and code:
            data += code.encode("utf-8")
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        # 64 bytes -> 88 characters with "==" padding; the token drops the padding.
        text = binascii.b2a_base64(secret + outer.digest(), newline=False)
        return text[:TOKEN_LENGTH].translate(_TO_URL).decode("ascii")

    def sign(self, action: int, secret: bytes, code: str | None) -> str:
        """Return the 86-character base64url token of ``secret`` for ``action``.

        ``code`` is signed for password recovery (action 2) only; None signs as "".
        """
        _check_row(None, action, "", "", secret, code)
        return self._token(action, bytes(secret), code)

    def encode_batch(self, rows: Iterable[Sequence[object]]) -> bytes:
        """Sign every row and return the batch line (UTF-8, ending in ``b"\\n"``).

        Each row's items 0-4 are action, email, login, secret, code; later items are
        ignored.  A bad row raises ValueError or TypeError naming its index.
        """
        if type(rows) is not list and type(rows) is not tuple:  # as the compiled twin does
            rows = list(rows)
        fields: list[str] = []
        add = fields.append
        token = self._token
        for index, row in enumerate(rows):
            try:
                size = len(row)
            except TypeError:
                size = -1
            if size < 5:
                raise bad_row_item(index, "row", row)
            action, email, login, secret, code = row[0], row[1], row[2], row[3], row[4]
            _check_row(index, action, email, login, secret, code)
            if code is None:
                code = ""
            add(_ACTION_TEXT[action])
            add('"' + email.replace('"', '""') + '"' if _NEEDS_QUOTES(email) else email)
            add('"' + login.replace('"', '""') + '"' if _NEEDS_QUOTES(login) else login)
            add(token(action, bytes(secret), code))
            add('"' + code.replace('"', '""') + '"' if _NEEDS_QUOTES(code) else code)
        return (",".join(fields) + "\n").encode("utf-8")

    def verify(self, token: str, action: int, code: str | None) -> bytes | None:
        """Return the 32-byte secret if ``token`` is authentic for ``action`` (and
        ``code``, for recovery), else None.  A malformed token gives None, not an error.
        """
        # Bad action or code arguments raise (placeholders stand in for the rest).
        _check_row(None, action, "", "", b"\0" * SECRET_LENGTH, code)
        if not isinstance(token, str) or not _CANONICAL_TOKEN(token):
            return None
        raw = binascii.a2b_base64(token.encode("ascii").translate(_FROM_URL) + b"==")
        secret = raw[:SECRET_LENGTH]
        expected = self._token(action, secret, code)
        # Compare the whole tokens in constant time: equal secrets, so equal MACs.
        return secret if hmac.compare_digest(expected, token) else None


def _check_row(index: int | None, action: object, email: object, login: object, secret: object, code: object) -> None:
    """Raise the shared error for the first unusable item of a row, if any."""
    if not _is_action(action):
        raise bad_row_item(index, "action", action)
    if not isinstance(email, str):
        raise bad_row_item(index, "email", email)
    if not isinstance(login, str):
        raise bad_row_item(index, "login", login)
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_LENGTH:
        raise bad_row_item(index, "secret", secret)
    if code is not None and not isinstance(code, str):
        raise bad_row_item(index, "code", code)
    # Lone surrogates cannot be written as UTF-8.  str.isascii() is a cheap first test.
    for item, value in (("email", email), ("login", login), ("code", code)):
        if value and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_row_item(index, item, value) from None


def decode_line(line: bytes) -> list[WireFields]:
    """Parse one batch line into ``(action, email, login, token, code)`` tuples.

    Accepts the line with or without its trailing ``\\n`` (or ``\\r\\n``); an empty
    line gives ``[]``.  Raises :class:`WireError` naming the row, field and byte offset
    of the first problem.
    """
    if isinstance(line, (bytearray, memoryview)):
        line = bytes(line)
    elif not isinstance(line, bytes):
        raise TypeError(f"decode_line expects bytes, got {type(line).__name__}")
    if line.endswith(b"\n"):
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if not line:
        return []
    # Fast path: split with str methods and one regex, validate in bulk.  Any doubt
    # (bad UTF-8, odd quoting, a bad field) goes to the exact scanner, which is slow
    # but finds the first problem and words the error.
    try:
        fields = _split_fields(line.decode("utf-8"))
    except UnicodeDecodeError:
        fields = None
    if fields is None or len(fields) % 5:
        return _decode_exact(line)
    actions = fields[0::5]
    tokens = fields[3::5]
    if not set(actions) <= {"1", "2"}:
        return _decode_exact(line)
    if set(map(len, tokens)) != {TOKEN_LENGTH} or not _BASE64URL_RUN("".join(tokens)):
        return _decode_exact(line)
    values = [1 if action == "1" else 2 for action in actions]
    return list(zip(values, fields[1::5], fields[2::5], tokens, fields[4::5], strict=True))


def _split_fields(text: str) -> list[str] | None:
    """The fields of a well-formed line, unquoted; None if the quoting looks wrong.

    ``_QUOTED_SPLIT`` cuts the line into unquoted stretches (even indexes) around
    quoted fields (odd indexes).  A quoted field must fill its field: a comma or the
    line's end on both sides, so the stretches around it start / end with ",".
    """
    if '"' not in text:  # the usual line
        if "\r" in text or "\n" in text:
            return None
        return text.split(",")
    parts = _QUOTED_SPLIT(text)
    last = len(parts) - 1
    fields: list[str] = []
    for k in range(0, last + 1, 2):
        stretch = parts[k]
        if '"' in stretch or "\r" in stretch or "\n" in stretch:
            return None
        pieces = stretch.split(",")
        if k > 0:  # after a closing quote: "," or the end of the line
            if pieces.pop(0):
                return None
            if not pieces and k < last:  # two quoted fields glued together
                return None
        if k < last:  # before an opening quote: ","  or the start of the line
            if pieces.pop():
                return None
        fields.extend(pieces)
        if k < last:
            fields.append(parts[k + 1][1:-1].replace('""', '"'))
    return fields


def _decode_exact(data: bytes) -> list[WireFields]:
    """Field-by-field scanner: RFC 4180 quoting, then UTF-8, then the field's rules.

    Problems are reported in line order, the first one wins; a row cut short by the
    end of the line is reported last.  ``data`` has no line terminator.
    """
    size = len(data)
    values: list[object] = []
    pos = 0
    count = 0  # fields seen
    while True:
        row, field = count // 5 + 1, count % 5 + 1
        start = pos
        if pos < size and data[pos] == 0x22:  # '"': quoted field
            search = pos + 1
            while True:
                close = data.find(b'"', search)
                if close < 0:
                    raise wire_error(E_UNTERMINATED, row, field, start)
                if close + 1 < size and data[close + 1] == 0x22:  # doubled quote
                    search = close + 2
                    continue
                break
            content, content_at, end = data[pos + 1 : close], pos + 1, close + 1
            if end < size and data[end] != 0x2C:
                raise wire_error(E_AFTER_QUOTE, row, field, end, data[end])
        else:
            comma = data.find(b",", pos)
            end = size if comma < 0 else comma
            content, content_at = data[pos:end], pos
            bad = _UNQUOTED_BAD(content)
            if bad is not None:
                byte = content[bad.start()]
                if byte == 0x22:
                    raise wire_error(E_QUOTE_IN_FIELD, row, field, pos + bad.start())
                raise wire_error(E_LINE_BREAK, row, field, pos + bad.start(), byte)
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise wire_error(E_UTF8, row, field, content_at + exc.start, exc.reason) from None
        if content_at != start:
            text = text.replace('""', '"')
        if field == 1:
            if text not in _ACTION_VALUE:
                raise wire_error(E_ACTION, row, field, start, text)
            values.append(_ACTION_VALUE[text])
        else:
            if field == 4:
                check_token(text, row, start)
            values.append(text)
        count += 1
        if end >= size:
            break
        pos = end + 1  # past the comma
    if count % 5:
        raise wire_error(E_FIELD_COUNT, count // 5 + 1, count % 5 + 1, size, count)
    return [tuple(values[i : i + 5]) for i in range(0, count, 5)]  # type: ignore[misc]

