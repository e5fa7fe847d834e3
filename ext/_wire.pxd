# Declarations and small inline helpers for ext/_wire.pyx (the compiled hot path):
# OpenSSL and CPython declarations, then HMAC, base64url, quoting and scanning as
# plain C on byte buffers (no Python objects).  setup.py builds ext/_wire.pyx as
# mailroom.wire._wire while ext/ is not a package, so Cython does not pair this file with
# the .pyx by name: the .pyx cimports it as a declarations-only module (externs and
# inline functions only, hence no import at run time).

from cpython.object cimport PyObject
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef extern from "openssl/sha.h" nogil:
    # Only h[] is touched directly; the real struct comes from the header.
    ctypedef struct SHA256_CTX:
        unsigned int h[8]
    int SHA256_Init(SHA256_CTX *c)
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t length)
    int SHA256_Final(unsigned char *md, SHA256_CTX *c)
    # One compression of a 64-byte block into c.h (SHA-NI accelerated by OpenSSL).
    void SHA256_Transform(SHA256_CTX *c, const unsigned char *data)


cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void *a, const void *b, size_t length)  # constant time
    void OPENSSL_cleanse(void *ptr, size_t length)


# C-level views of the CPython API on borrowed PyObject* (no reference counting in the
# row loop: the rows stay referenced by the list/tuple we were handed).
cdef extern from "Python.h":
    Py_ssize_t seq_size "PySequence_Fast_GET_SIZE" (PyObject *o)
    PyObject *seq_item "PySequence_Fast_GET_ITEM" (PyObject *o, Py_ssize_t i)
    bint is_tuple "PyTuple_Check" (PyObject *o)
    bint is_list "PyList_Check" (PyObject *o)
    bint is_exact_tuple "PyTuple_CheckExact" (object o)
    bint is_exact_list "PyList_CheckExact" (object o)
    bint is_str "PyUnicode_Check" (PyObject *o)
    bint is_bytes "PyBytes_Check" (PyObject *o)
    bint is_bytearray "PyByteArray_Check" (PyObject *o)
    bint is_int "PyLong_Check" (PyObject *o)
    bint is_bool "PyBool_Check" (PyObject *o)
    char *bytes_data "PyBytes_AS_STRING" (PyObject *o)
    Py_ssize_t bytes_size "PyBytes_GET_SIZE" (PyObject *o)
    char *bytearray_data "PyByteArray_AS_STRING" (PyObject *o)
    Py_ssize_t bytearray_size "PyByteArray_GET_SIZE" (PyObject *o)
    long as_long "PyLong_AsLongAndOverflow" (PyObject *o, int *overflow)
    # NULL with an exception set when the str holds lone surrogates.
    const char *str_utf8 "PyUnicode_AsUTF8AndSize" (PyObject *o, Py_ssize_t *size)
    # New references, NULL on error: their results are stolen by tuple_set.
    PyObject *decode_utf8 "PyUnicode_DecodeUTF8" (const char *s, Py_ssize_t n, const char *errors)
    PyObject *new_str "PyUnicode_New" (Py_ssize_t size, Py_UCS4 maxchar)
    void *str_data "PyUnicode_DATA" (PyObject *o)
    bint is_compact_ascii "PyUnicode_IS_COMPACT_ASCII" (PyObject *o)
    Py_ssize_t str_length "PyUnicode_GET_LENGTH" (PyObject *o)
    void tuple_set "PyTuple_SET_ITEM" (object t, Py_ssize_t i, PyObject *o)
    PyObject *new_bytes "PyBytes_FromStringAndSize" (const char *s, Py_ssize_t n)
    int resize_bytes "_PyBytes_Resize" (PyObject **o, Py_ssize_t n)
    void PyErr_Clear()


cdef extern from *:
    uint32_t bswap32 "__builtin_bswap32" (uint32_t) nogil
    uint64_t bswap64 "__builtin_bswap64" (uint64_t) nogil


# Character classes of a byte, for the line scanner and the quoting test.
cdef enum:
    CH_PLAIN = 0
    CH_COMMA = 1
    CH_QUOTE = 2
    CH_BREAK = 3  # CR or LF


cdef struct HmacKey:
    # SHA-256 states after absorbing key^ipad and key^opad: HMAC's keyed prefix,
    # computed once so that each signature costs two compressions.
    SHA256_CTX inner
    SHA256_CTX outer
    # The single message block of an activation signature, with its padding and
    # length already in place; only the 32 secret bytes change per row.
    unsigned char activate_block[64]
    # The outer block: the inner digest, then fixed padding for a 96-byte message.
    unsigned char outer_block[64]


cdef inline void store_digest(unsigned char *dst, const unsigned int *h) noexcept nogil:
    """Write a SHA-256 state as the 32-byte big-endian digest."""
    cdef int i
    cdef uint32_t word
    for i in range(8):
        word = bswap32(h[i])
        memcpy(dst + 4 * i, &word, 4)


cdef inline void store_length(unsigned char *block, uint64_t message_bytes) noexcept nogil:
    """Write SHA-256's trailing big-endian bit count into the last 8 bytes of a block."""
    cdef uint64_t bits = bswap64(message_bytes * 8)
    memcpy(block + 56, &bits, 8)


cdef inline char *b64url_64(const unsigned char *src, char *dst,
                            const char (*pairs)[2], const char *alphabet) noexcept nogil:
    """Encode exactly 64 bytes as 86 base64url characters (no padding); return the end.

    ``pairs`` maps 12 bits to their two characters: half the lookups of a 6-bit table.
    """
    cdef int i
    cdef uint32_t v
    for i in range(21):  # 63 bytes in 21 groups of three
        v = (<uint32_t>src[0] << 16) | (<uint32_t>src[1] << 8) | src[2]
        memcpy(dst, pairs[v >> 12], 2)
        memcpy(dst + 2, pairs[v & 0xFFF], 2)
        src += 3
        dst += 4
    dst[0] = alphabet[src[0] >> 2]  # the 64th byte: 8 bits in two characters
    dst[1] = alphabet[(src[0] & 3) << 4]
    return dst + 2


cdef inline bint needs_quotes(const char *text, Py_ssize_t size,
                              const unsigned char *classes) noexcept nogil:
    """True when the field holds ',', '"', CR or LF (RFC 4180 quoting needed)."""
    cdef Py_ssize_t i = 0, j
    cdef uint64_t word
    # The four special bytes are all below 0x2D ('-'), and emails and logins are mostly
    # letters, digits, '.', '@', '_', '-': test 8 bytes at once for any byte < 0x2D
    # (the "hasless" bit trick, exact for the 0..128 range) and look closer only then.
    while i + 8 <= size:
        memcpy(&word, text + i, 8)
        if (word - 0x2D2D2D2D2D2D2D2DULL) & ~word & 0x8080808080808080ULL:
            for j in range(i, i + 8):
                if classes[<unsigned char>text[j]] != CH_PLAIN:
                    return True
        i += 8
    while i < size:
        if classes[<unsigned char>text[i]] != CH_PLAIN:
            return True
        i += 1
    return False


cdef inline char *put_field(char *dst, const char *text, Py_ssize_t size,
                            const unsigned char *classes) noexcept nogil:
    """Write one text field, quoted only if needed; return the end."""
    cdef Py_ssize_t i
    if not needs_quotes(text, size, classes):
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
    whether the field is pure ASCII).  Eight bytes at a time, as in needs_quotes().
    """
    cdef uint64_t word
    while at + 8 <= size:
        memcpy(&word, s + at, 8)
        if (word - 0x2D2D2D2D2D2D2D2DULL) & ~word & 0x8080808080808080ULL:
            break
        seen[0] |= word
        at += 8
    while at < size and s[at] >= 0x2D:
        seen[0] |= s[at]
        at += 1
    return at


cdef inline void hmac_init(HmacKey *k, const unsigned char *key) noexcept nogil:
    """Prepare ``k`` for the 32-byte ``key``."""
    cdef unsigned char pad[64]
    cdef int i
    for i in range(64):  # the key zero-padded to one block, xor ipad
        pad[i] = (key[i] if i < 32 else 0) ^ 0x36
    SHA256_Init(&k.inner)
    SHA256_Update(&k.inner, pad, 64)
    for i in range(64):  # now xor opad
        pad[i] ^= 0x36 ^ 0x5C
    SHA256_Init(&k.outer)
    SHA256_Update(&k.outer, pad, 64)
    memset(pad, 0, 64)  # do not leave key material on the stack
    # Activation: "/activate" (9) + secret (32) = 41 bytes, padded in one block.
    memset(k.activate_block, 0, 64)
    memcpy(k.activate_block, b"/activate", 9)
    k.activate_block[41] = 0x80
    store_length(k.activate_block, 64 + 41)
    # Outer message after the opad block: the 32-byte inner digest.
    memset(k.outer_block, 0, 64)
    k.outer_block[32] = 0x80
    store_length(k.outer_block, 64 + 32)


cdef inline void hmac_token(const HmacKey *k, int action, const unsigned char *secret,
                            const char *code, Py_ssize_t code_len,
                            unsigned char *raw) noexcept nogil:
    """Write ``secret || HMAC-SHA256(key, data)`` (the 64 bytes of a token) into ``raw``.

    ``data`` is "/activate" + secret (action 1) or "/recover" + secret + code.
    """
    cdef SHA256_CTX ctx  # only ctx.h is used on the one-block paths
    cdef unsigned char block[64]
    cdef Py_ssize_t size = 8 + 32 + code_len
    memcpy(raw, secret, 32)
    if action == 1 or size <= 55:  # one block with its padding: the usual case
        if action == 1:
            memcpy(block, k.activate_block, 64)
            memcpy(block + 9, secret, 32)
        else:
            memset(block, 0, 64)
            memcpy(block, b"/recover", 8)
            memcpy(block + 8, secret, 32)
            memcpy(block + 40, code, code_len)
            block[size] = 0x80
            store_length(block, 64 + size)
        memcpy(ctx.h, k.inner.h, 32)
        SHA256_Transform(&ctx, block)
        memcpy(block, k.outer_block, 64)
        store_digest(block, ctx.h)
    else:  # a long code: let OpenSSL do the buffering and padding
        ctx = k.inner
        SHA256_Update(&ctx, b"/recover", 8)
        SHA256_Update(&ctx, secret, 32)
        SHA256_Update(&ctx, code, code_len)
        memcpy(block, k.outer_block, 64)
        SHA256_Final(block, &ctx)  # the digest lands in block[0:32]
    memcpy(ctx.h, k.outer.h, 32)
    SHA256_Transform(&ctx, block)
    store_digest(raw + 32, ctx.h)


cdef inline bint b64url_decode_86(const unsigned char *chars, unsigned char *raw,
                                  const unsigned char *values) noexcept nogil:
    """Decode an 86-character token into its 64 bytes; False if it is not canonical
    base64url.  ``values`` maps a byte to its 6-bit value, 255 if not in the alphabet.
    """
    cdef int i
    cdef uint32_t v, bad = 0
    for i in range(21):  # 84 characters -> 63 bytes
        v = (values[chars[0]] << 18) | (values[chars[1]] << 12) | (values[chars[2]] << 6) | values[chars[3]]
        bad |= values[chars[0]] | values[chars[1]] | values[chars[2]] | values[chars[3]]
        raw[0] = (v >> 16) & 255
        raw[1] = (v >> 8) & 255
        raw[2] = v & 255
        chars += 4
        raw += 3
    bad |= values[chars[0]] | values[chars[1]]
    raw[0] = ((values[chars[0]] << 2) | (values[chars[1]] >> 4)) & 255
    # 255 has bit 7 set; and 86 characters carry 516 bits for 512: the last one must
    # have its low 4 bits clear, or two different tokens would carry the same bytes.
    return (bad & 0x80) == 0 and (values[chars[1]] & 15) == 0


cdef inline bint is_base64url(const unsigned char *s, Py_ssize_t n,
                              const unsigned char *values) noexcept nogil:
    """True when all ``n`` bytes are base64url characters."""
    cdef Py_ssize_t i
    cdef unsigned char bad = 0
    for i in range(n):  # no early exit: a branch-free loop the compiler can vectorise
        bad |= values[s[i]]
    return (bad & 0x80) == 0
