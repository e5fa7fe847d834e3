"""Pieces shared by both wire-format implementations (compiled and pure Python).

Nothing here is on the hot path: the constants, the error type, the key parser, and
the functions that turn a detected problem into an exception.  Both implementations
call the same message builders, so an error reads the same whichever one is loaded
(the test suite checks this).  Import the public API from :mod:`mailroom.wire`.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

TOKEN_LENGTH = 86
SECRET_LENGTH = 32
KEY_LENGTH = 32

#: Names of the five fields of a row, in line order (used in error messages).
FIELD_NAMES = ("action", "email", "login", "secret", "code")

#: The base64url alphabet (RFC 4648 section 5).
BASE64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

#: The five fields of a decoded batch row: (action, email, login, signed token, code).
#: (The package's ``Row``, a claimed ledger row, is :data:`mailroom.vocabulary.Row`.)
WireFields = tuple[int, str, str, str, str]

# Problem kinds reported by the decoders.  The compiled decoder passes these numbers
# to wire_error() so that the wording lives in one place.
E_UNTERMINATED = 1  # opening quote never closed
E_AFTER_QUOTE = 2  # something other than "," or end of line after a closing quote
E_QUOTE_IN_FIELD = 3  # a '"' inside an unquoted field
E_LINE_BREAK = 4  # CR or LF inside an unquoted field
E_UTF8 = 5  # invalid UTF-8 in a field (detail: the codec's reason)
E_ACTION = 6  # action other than "1" / "2" (detail: the field text)
E_TOKEN_LENGTH = 7  # token not 86 characters (detail: its length)
E_TOKEN_CHAR = 8  # token holds a non-base64url character (detail: (index, char))
E_FIELD_COUNT = 9  # the line ends inside a row (detail: number of fields)


class WireError(ValueError):
    """A batch line that does not follow the wire format.

    The message says where the problem is: 1-based row and field numbers, the field's
    name and the 0-based byte offset in the line, e.g.
    ``row 2 field 4 (secret) at byte 137: expected 86 base64url characters, got 85``.
    The same facts are available as attributes for callers that report them otherwise.
    """

    def __init__(self, row: int, field: int, offset: int, problem: str) -> None:
        self.row = row
        self.field = field
        self.offset = offset
        self.problem = problem
        name = FIELD_NAMES[(field - 1) % 5]
        super().__init__(f"row {row} field {field} ({name}) at byte {offset}: {problem}")

    def __reduce__(self) -> tuple[type[WireError], tuple[int, int, int, str]]:  # picklable (it crosses process pipes)
        return (type(self), (self.row, self.field, self.offset, self.problem))


def _show_byte(value: int) -> str:
    """Render one byte for a message: printable ASCII quoted, anything else in hex."""
    if 0x20 <= value < 0x7F:
        return repr(chr(value))
    return f"byte 0x{value:02x}"


def _show_value(text: str) -> str:
    """A bad action field for a message: shown only when very short.

    When the framing is off, the field in the action position may be a token or a
    code; error messages end up in logs, which must not hold token material.
    """
    if len(text) <= 3:
        return repr(text)
    return f"a {len(text)}-character value"


def wire_error(kind: int, row: int, field: int, offset: int, detail: Any = None) -> WireError:
    """Build the :class:`WireError` for a problem found by a decoder.

    ``row`` and ``field`` are 1-based, ``field`` counts within the row (1..5), and
    ``offset`` is the 0-based byte offset in the line.
    """
    if kind == E_UNTERMINATED:
        problem = "quoted field is never closed (missing closing '\"')"
    elif kind == E_AFTER_QUOTE:
        problem = f"expected ',' or end of line after closing quote, got {_show_byte(int(detail))}"
    elif kind == E_QUOTE_IN_FIELD:
        problem = "'\"' inside an unquoted field (such a field must be quoted)"
    elif kind == E_LINE_BREAK:
        name = "CR" if detail == 0x0D else "LF"
        problem = f"line break ({name}) inside an unquoted field (such a field must be quoted)"
    elif kind == E_UTF8:
        problem = f"invalid UTF-8 ({detail})"
    elif kind == E_ACTION:
        problem = f"expected action 1 or 2, got {_show_value(str(detail))}"
    elif kind == E_TOKEN_LENGTH:
        problem = f"expected {TOKEN_LENGTH} base64url characters, got {detail}"
    elif kind == E_TOKEN_CHAR:
        index, char = detail  # the decoders pass (index, character) here
        problem = f"character {index + 1} of the token, {char!r}, is not base64url"
    elif kind == E_FIELD_COUNT:
        problem = f"line ends after {detail} fields; each row needs 5"
    else:  # pragma: no cover - a decoder passed an unknown kind
        problem = f"malformed line (problem {kind})"
    return WireError(row, field, offset, problem)


def check_token(text: str, row: int, offset: int) -> None:
    """Raise the WireError for a token field that is not 86 base64url characters.

    ``offset`` is where the field starts in the line; the message points inside it.
    """
    if len(text) != TOKEN_LENGTH:
        raise wire_error(E_TOKEN_LENGTH, row, 4, offset, len(text))
    for index, char in enumerate(text):
        if char not in BASE64URL_ALPHABET:
            raise wire_error(E_TOKEN_CHAR, row, 4, offset, (index, char))


def _utf8_problem(value: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not encodable as UTF-8 ({exc.reason} at index {exc.start})"
    return None


def bad_row_item(index: int | None, item: str, value: object) -> Exception:
    """Return the exception for a row that ``encode_batch``/``sign`` cannot use.

    ``item`` names what is wrong with row number ``index`` (0-based, as in ``rows[i]``;
    None for the arguments of ``sign``/``verify``):
    ``"row"`` (the row itself), or one of ``action``, ``email``, ``login``, ``secret``,
    ``code``.  The caller has already decided that ``value`` is unusable; this only
    picks the exception type (TypeError for a wrong type, ValueError for a wrong value)
    and the wording, identically for both implementations.
    """
    where = "" if index is None else f"rows[{index}]: "
    kind = type(value).__name__
    if item == "row":
        try:
            size = len(value)  # type: ignore[arg-type]
        except TypeError:
            return TypeError(f"{where}expected a sequence (action, email, login, secret, code), got {kind}")
        return ValueError(f"{where}expected at least 5 items (action, email, login, secret, code), got {size}")
    if item == "action":
        if isinstance(value, bool) or not isinstance(value, int):
            return TypeError(f"{where}action must be an int (1 or 2), got {kind}")
        return ValueError(f"{where}action must be 1 (activation) or 2 (password recovery), got {value}")
    if item == "secret":
        if not isinstance(value, (bytes, bytearray)):
            return TypeError(f"{where}secret must be bytes, got {kind}")
        return ValueError(f"{where}secret must be {SECRET_LENGTH} bytes, got {len(value)}")
    if item == "code" and value is not None and not isinstance(value, str):
        return TypeError(f"{where}code must be a str or None, got {kind}")
    if item in ("email", "login") and not isinstance(value, str):
        return TypeError(f"{where}{item} must be a str, got {kind}")
    if isinstance(value, str):
        problem = _utf8_problem(value)
        if problem is not None:
            return ValueError(f"{where}{item} {problem}")
    return ValueError(f"{where}unusable {item}")  # pragma: no cover - callers disagree


def parse_key(key: bytes | str) -> bytes:
    """Return the 32-byte signing key from ``key``.

    ``key`` is either the 32 raw bytes, or the 64 hexadecimal characters of
    ``MAILROOM_SECRET_KEY`` (as ``str`` or ASCII ``bytes``; surrounding whitespace is
    ignored).  Raises ValueError otherwise; the message never contains the key.
    """
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        if len(raw) == KEY_LENGTH:
            return raw
        try:
            key = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(
                f"secret key must be {KEY_LENGTH} raw bytes or {2 * KEY_LENGTH} hexadecimal characters, "
                f"got {len(raw)} bytes"
            ) from None
    if not isinstance(key, str):
        raise ValueError(f"secret key must be bytes or str, got {type(key).__name__}")
    text = key.strip()
    if len(text) != 2 * KEY_LENGTH:
        raise ValueError(
            f"secret key must be {2 * KEY_LENGTH} hexadecimal characters ({KEY_LENGTH} bytes), "
            f"got {len(text)} characters"
        )
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        # `from None`: the binascii error text could quote part of the key.
        raise ValueError(
            f"secret key must be {2 * KEY_LENGTH} hexadecimal characters, and it holds a non-hex character"
        ) from None


class SignerProtocol(Protocol):
    """The signer class of an implementation module."""

    def __init__(self, key: bytes) -> None: ...

    def sign(self, action: int, secret: bytes, code: str | None) -> str:
        """Return the 86-character token for one row."""
        ...

    def encode_batch(self, rows: Iterable[Sequence[object]]) -> bytes:
        """Sign and encode ``rows`` into one batch line ending in ``b"\\n"``."""
        ...

    def verify(self, token: str, action: int, code: str | None) -> bytes | None:
        """Return the 32-byte secret if ``token`` is authentic, else None."""
        ...


class WireImplementation(Protocol):
    """What ``mailroom.wire._wire`` (compiled) and ``mailroom.wire._py`` both provide."""

    @property
    def Signer(self) -> type[SignerProtocol]:  # noqa: N802 - a class, named as one
        """The implementation's signer class."""
        ...

    def decode_line(self, line: bytes) -> list[WireFields]:
        """Parse and validate one batch line into its rows."""
        ...
