# Text fields of a batch line, included by _wire.pyx: a str's UTF-8 without a copy,
# RFC 4180 quoting when writing, and the scan for a field's end when reading.

from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memset

from cpython.object cimport PyObject
from cpythonx cimport PyErr_Clear, is_compact_ascii, str_data, str_length, str_utf8


# Character classes of a byte, for the line scanner and the quoting test.
cdef enum:
    CH_PLAIN = 0
    CH_COMMA = 1
    CH_QUOTE = 2
    CH_BREAK = 3  # CR or LF

cdef unsigned char _CLASSES[256]  # CH_* class of each byte


cdef void _init_classes() noexcept:
    memset(_CLASSES, CH_PLAIN, 256)
    _CLASSES[b','] = CH_COMMA
    _CLASSES[b'"'] = CH_QUOTE
    _CLASSES[b'\r'] = CH_BREAK
    _CLASSES[b'\n'] = CH_BREAK


_init_classes()


cdef inline const char *_text(PyObject *o, Py_ssize_t *size, Py_ssize_t index, str item) except NULL:
    """UTF-8 of an object known to be a str; raise the shared row error if it has
    surrogates.  ``index`` -1 stands for the arguments of sign()/verify().
    """
    cdef const char *text
    if is_compact_ascii(o):  # most emails and logins: the characters are the UTF-8
        size[0] = str_length(o)
        return <const char *>str_data(o)
    text = str_utf8(o, size)  # cached in the str by CPython after the first call
    if text == NULL:
        PyErr_Clear()
        raise bad_row_item(None if index < 0 else index, item, <object>o)
    return text


cdef inline bint has_low_byte(uint64_t word) noexcept nogil:
    """True when one of the 8 bytes of ``word`` is below 0x2D ('-').

    The four bytes RFC 4180 cares about (',', '"', CR, LF) all are, and emails and
    logins are mostly letters, digits, '.', '@', '_', '-', which are not: the
    "hasless" bit trick tests 8 bytes at once (exact for a bound up to 0x80).
    """
    return ((word - 0x2D2D2D2D2D2D2D2DULL) & ~word & 0x8080808080808080ULL) != 0


cdef inline bint needs_quotes(const char *text, Py_ssize_t size) noexcept nogil:
    """True when the field holds ',', '"', CR or LF (RFC 4180 quoting needed)."""
    cdef Py_ssize_t i = 0, j
    cdef uint64_t word
    while i + 8 <= size:
        memcpy(&word, text + i, 8)
        if has_low_byte(word):
            for j in range(i, i + 8):
                if _CLASSES[<unsigned char>text[j]] != CH_PLAIN:
                    return True
        i += 8
    while i < size:
        if _CLASSES[<unsigned char>text[i]] != CH_PLAIN:
            return True
        i += 1
    return False


cdef inline char *put_field(char *dst, const char *text, Py_ssize_t size) noexcept nogil:
    """Write one text field, quoted only if needed; return the end."""
    cdef Py_ssize_t i
    if not needs_quotes(text, size):
        memcpy(dst, text, size)
        return dst + size
    dst[0] = b'"'
    dst += 1
    for i in range(size):
        dst[0] = text[i]
        dst += 1
        if text[i] == b'"':  # RFC 4180: an inner quote is doubled
            dst[0] = b'"'
            dst += 1
    dst[0] = b'"'
    return dst + 1


cdef inline Py_ssize_t skip_plain(const unsigned char *s, Py_ssize_t at, Py_ssize_t size,
                                  uint64_t *seen) noexcept nogil:
    """Index of the first byte from ``at`` on that is below 0x2D, or ``size``.

    Such a byte may end the field (',') or be an error ('"', CR, LF); the others
    cannot.  The bytes skipped are OR-ed into ``seen`` (its high bits then tell
    whether the field is pure ASCII).
    """
    cdef uint64_t word
    while at + 8 <= size:
        memcpy(&word, s + at, 8)
        if has_low_byte(word):
            break
        seen[0] |= word
        at += 8
    while at < size and s[at] >= 0x2D:
        seen[0] |= s[at]
        at += 1
    return at
