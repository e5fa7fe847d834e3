# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled wire format: HMAC-SHA256 token signing, base64url, batch line encode/decode.

Built into ``mailroom.wire._wire`` by setup.py.  Same interface, output and errors as the
pure-Python ``mailroom.wire._py``; import the public API from :mod:`mailroom.wire`.

Speed comes from doing each row in C: the HMAC keyed states are computed once per
Signer, so a signature is two SHA-256 compressions on prepared blocks; base64url and
RFC 4180 quoting write straight into the output ``bytes``.  Error paths may run Python
code: they build their messages with the shared helpers of ``mailroom.wire._base``.

Layout (as asyncpg's): this file holds the two public entry points and the row
reading; the C-level parts are the .pxi files it includes; the .pxd files declare the
C it calls (CPython, OpenSSL, and the small C helpers of sha256.h and simd.h).  ext/
is not a package: setup.py puts it on the include paths of Cython and of the C compiler.
"""

cimport cython
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_New
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcpy

from cpythonx cimport (
    PyErr_Clear, bytes_data, decode_utf8, is_exact_list, is_exact_tuple, is_list,
    is_str, is_tuple, new_bytes, new_str, resize_bytes, seq_item, seq_size, str_data,
    str_utf8, tuple_set,
)
from openssl cimport CRYPTO_memcmp, OPENSSL_cleanse
from sha256 cimport SHA256_IMPL

from mailroom.wire._base import (
    E_ACTION, E_AFTER_QUOTE, E_FIELD_COUNT, E_LINE_BREAK, E_QUOTE_IN_FIELD,
    E_UNTERMINATED, E_UTF8, bad_row_item, check_token, wire_error,
)

# The implementation, a C-level part each (declarations in the .pxd files beside them):
include "text.pxi"       # str access, RFC 4180 quoting, the field scanner
include "hmac.pxi"       # HMAC-SHA256 on precomputed keyed states
include "base64url.pxi"  # the 86-character token, both ways
include "rows.pxi"       # a row's items, checked and borrowed; a signed row, written

__all__ = ["Signer", "decode_line"]

#: Which SHA-256 compression this build uses: "openssl" or "portable" (ext/sha256.h).
_SHA256 = SHA256_IMPL.decode("ascii")

@cython.auto_pickle(False)  # never serialise key material
@cython.final
cdef class Signer:
    """Signs token secrets with HMAC-SHA256 and encodes batch lines.

    ``key`` is the 32 raw bytes of ``MAILROOM_SECRET_KEY`` (see ``parse_key``).
    """

    cdef HmacKey _key

    def __cinit__(self, key):
        cdef bytes held
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            # Never show the key, not even its repr.
            raise ValueError("key must be exactly 32 raw bytes (use parse_key() for the hex form)")
        held = bytes(key)
        hmac_init(&self._key, <const unsigned char *>held)

    def __dealloc__(self):
        # Key-derived state must not linger in freed memory (OpenSSL's cleanse is not
        # optimised away like a plain memset before free can be).
        OPENSSL_cleanse(&self._key, sizeof(HmacKey))

    def sign(self, action, secret, code):
        """Return the 86-character base64url token of ``secret`` for ``action``.

        ``code`` is signed for password recovery (action 2) only; None signs as "".
        """
        cdef int act = _action(<PyObject *>action)
        cdef const unsigned char *sec
        cdef const char *text = b""
        cdef Py_ssize_t size = 0
        cdef unsigned char raw[64]
        if act == 0:
            raise bad_row_item(None, "action", action)
        sec = _secret(<PyObject *>secret)
        if sec == NULL:
            raise bad_row_item(None, "secret", secret)
        if code is not None:
            if not is_str(<PyObject *>code):
                raise bad_row_item(None, "code", code)
            text = _text(<PyObject *>code, &size, -1, "code")
        cdef char chars[86]
        cdef TokenInput t = TokenInput(act, sec, text, size)
        hmac_token(&self._key, &t, raw)
        b64url_64(raw, chars)
        return PyUnicode_DecodeASCII(chars, 86, NULL)

    def encode_batch(self, rows):
        """Sign every row and return the batch line (UTF-8, ending in ``b"\\n"``).

        Each row's items 0-4 are action, email, login, secret, code; later items are
        ignored.  A bad row raises ValueError or TypeError naming its index.
        """
        if not (is_exact_list(rows) or is_exact_tuple(rows)):
            rows = list(rows)
        cdef PyObject *seq = <PyObject *>rows
        cdef PyObject *row
        cdef Py_ssize_t index = 0, used = 0, need, capacity
        cdef int n, j
        cdef Row pair[2]
        cdef tuple holder  # keeps a generic row's items alive while they are borrowed
        cdef char *p
        # Room for typical rows (~150 bytes); grown by doubling when rows need more.
        capacity = seq_size(seq) * 176 + 16
        cdef PyObject *out = new_bytes(NULL, capacity)
        if out == NULL:
            raise MemoryError()
        try:
            # Re-read the size each time: a generic row runs Python code that could
            # change the list, as it would for the pure-Python loop.
            while index < seq_size(seq):
                row = seq_item(seq, index)
                if is_tuple(row) or is_list(row):
                    _read_row(row, index, &pair[0])
                else:
                    holder = _generic_row(index, <object>row)
                    _read_row(<PyObject *>holder, index, &pair[0])
                # Rows go in pairs so that their hashes interleave (simd.h).  The second
                # is taken only when reading it runs no Python code, which could free
                # what the first one's pointers borrow.
                n = 1
                if index + 1 < seq_size(seq):
                    row = seq_item(seq, index + 1)
                    if is_tuple(row) or is_list(row):
                        _read_row(row, index + 1, &pair[1])
                        n = 2
                if n == 2:
                    hmac_token_pair(&self._key, &pair[0].token, pair[0].raw, &pair[1].token, pair[1].raw)
                else:
                    hmac_token(&self._key, &pair[0].token, pair[0].raw)
                # Worst case: every text byte a doubled quote, plus quotes and commas.
                need = 0
                for j in range(n):
                    need += 2 * (pair[j].email_len + pair[j].login_len + pair[j].token.code_len) + 2 + 3 * 3 + 87 + 2
                if used + need > capacity:
                    capacity = max(2 * capacity, used + need)
                    if resize_bytes(&out, capacity) < 0:
                        raise MemoryError()
                p = bytes_data(out) + used
                for j in range(n):
                    if index + j:
                        p[0] = b','
                        p += 1
                    p = _write_row(p, &pair[j])
                used = p - bytes_data(out)
                index += n
            bytes_data(out)[used] = b'\n'  # `need` kept one byte spare for it
            if resize_bytes(&out, used + 1) < 0:
                raise MemoryError()
            return <object>out
        finally:
            Py_XDECREF(out)  # <object>out above took its own reference

    def verify(self, token, action, code):
        """Return the 32-byte secret if ``token`` is authentic for ``action`` (and
        ``code``, for recovery), else None.  A malformed token gives None, not an error.
        """
        cdef int act = _action(<PyObject *>action)
        cdef const char *text = b""
        cdef Py_ssize_t code_len = 0, size
        cdef const unsigned char *chars
        cdef unsigned char raw[64]
        cdef unsigned char expected[64]
        if act == 0:
            raise bad_row_item(None, "action", action)
        if code is not None:
            if not is_str(<PyObject *>code):
                raise bad_row_item(None, "code", code)
            text = _text(<PyObject *>code, &code_len, -1, "code")
        if not is_str(<PyObject *>token):
            return None
        chars = <const unsigned char *>str_utf8(<PyObject *>token, &size)
        if chars == NULL:
            PyErr_Clear()
            return None
        if size != 86:
            return None
        if not b64url_decode_86(chars, raw):
            return None
        cdef TokenInput t = TokenInput(act, <const unsigned char *>raw, text, code_len)
        hmac_token(&self._key, &t, expected)
        if CRYPTO_memcmp(raw + 32, expected + 32, 32) != 0:
            return None
        return <bytes>(<char *>raw)[:32]


cdef object _field_error(bytes line, Py_ssize_t row, int field, Py_ssize_t start,
                         Py_ssize_t content_at, Py_ssize_t content_end):
    """Raise the WireError for a field whose bytes failed the fast checks.

    Re-does the pure-Python checks in their order (UTF-8, then the field's own rule)
    so the message is the same as the pure-Python decoder's.
    """
    try:
        text = line[content_at:content_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise wire_error(E_UTF8, row, field, content_at + exc.start, exc.reason) from None
    if content_at != start:  # quoted: undo the doubled quotes
        text = text.replace('""', '"')
    if field == 1:
        raise wire_error(E_ACTION, row, field, start, text)
    if field == 4:
        check_token(text, row, start)
    raise SystemError(f"mailroom.wire._wire: row {row} field {field} rejected without a reason")


def decode_line(line):
    """Parse one batch line into ``(action, email, login, token, code)`` tuples.

    Accepts the line with or without its trailing ``\\n`` (or ``\\r\\n``); an empty
    line gives ``[]``.  Raises :class:`WireError` naming the row, field and byte offset
    of the first problem.
    """
    if not isinstance(line, bytes):
        if isinstance(line, (bytearray, memoryview)):
            line = bytes(line)
        else:
            raise TypeError(f"decode_line expects bytes, got {type(line).__name__}")
    cdef bytes data = line
    cdef const unsigned char *s = <const unsigned char *>(<char *>data)
    cdef Py_ssize_t size = len(data)
    cdef Py_ssize_t pos = 0, start, at, end, content_at, count = 0
    cdef const unsigned char *hit
    cdef unsigned char kind
    cdef bint doubled
    cdef uint64_t seen = 0
    cdef int field
    cdef PyObject *text
    cdef list rows = []
    cdef tuple row = None
    if size and s[size - 1] == b'\n':
        size -= 1
        if size and s[size - 1] == b'\r':
            size -= 1
    if size == 0:
        return rows
    while True:
        field = count % 5 + 1
        start = pos
        doubled = False
        text = NULL
        if pos < size and s[pos] == b'"':  # quoted field: find the closing quote
            at = pos + 1
            while True:
                hit = <const unsigned char *>memchr(s + at, b'"', size - at)
                if hit == NULL:
                    raise wire_error(E_UNTERMINATED, count // 5 + 1, field, start)
                at = hit - s
                if at + 1 < size and s[at + 1] == b'"':  # a doubled quote inside
                    doubled = True
                    at += 2
                    continue
                break
            content_at, end = pos + 1, at + 1
            if end < size and s[end] != b',':
                raise wire_error(E_AFTER_QUOTE, count // 5 + 1, field, end, s[end])
            at = end - 1  # content ends before the closing quote
        else:
            at = pos
            seen = 0
            while True:
                at = skip_plain(s, at, size, &seen)
                if at >= size:
                    break
                kind = _CLASSES[s[at]]
                if kind == CH_PLAIN:  # a low byte that is fine, like ' ' or '+'
                    at += 1
                    continue
                if kind == CH_COMMA:
                    break
                if kind == CH_QUOTE:
                    raise wire_error(E_QUOTE_IN_FIELD, count // 5 + 1, field, at)
                raise wire_error(E_LINE_BREAK, count // 5 + 1, field, at, s[at])
            content_at, end = pos, at
        # The field's bytes are s[content_at:at].
        if field == 1:
            row = PyTuple_New(5)
            if at - content_at == 1 and (s[content_at] == b'1' or s[content_at] == b'2'):
                text = <PyObject *>(_ONE if s[content_at] == b'1' else _TWO)
                Py_INCREF(<object>text)
            else:
                _field_error(data, count // 5 + 1, field, start, content_at, at)
        elif field == 4:
            if at - content_at != 86 or not is_base64url(s + content_at, 86):
                _field_error(data, count // 5 + 1, field, start, content_at, at)
            text = new_str(86, 127)  # ASCII: the bytes are the characters
            if text == NULL:
                raise MemoryError()
            memcpy(str_data(text), s + content_at, 86)
        elif content_at == start and seen & 0x8080808080808080ULL == 0:
            text = new_str(at - content_at, 127)  # unquoted ASCII: copy the bytes
            if text == NULL:
                raise MemoryError()
            memcpy(str_data(text), s + content_at, at - content_at)
        else:
            text = decode_utf8(<const char *>s + content_at, at - content_at, NULL)
            if text == NULL:
                PyErr_Clear()
                _field_error(data, count // 5 + 1, field, start, content_at, at)
            if doubled:
                value = (<object>text).replace('""', '"')
                Py_XDECREF(text)
                text = <PyObject *>value
                Py_INCREF(value)
        tuple_set(row, field - 1, text)  # steals the reference
        if field == 5:
            rows.append(row)
        count += 1
        if end >= size:
            break
        pos = end + 1  # past the comma
    if count % 5:
        raise wire_error(E_FIELD_COUNT, count // 5 + 1, count % 5 + 1, size, count)
    return rows

