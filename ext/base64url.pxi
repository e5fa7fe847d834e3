# base64url (RFC 4648 section 5, no padding) of the 64 token bytes, both ways;
# included by _wire.pyx.  A token is 86 characters: 21 groups of 3 bytes -> 4
# characters, then the 64th byte in 2.

from libc.stdint cimport uint32_t
from libc.string cimport memcpy, memset

from simd cimport simd_b64url_60, simd_has_ssse3

cdef const char *_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
cdef unsigned char _VALUE[256]  # base64url value of each byte, 255 when not in the alphabet
cdef char _PAIRS[4096][2]  # the two characters of each 12-bit value (scalar encoder)
#: Whether this CPU runs ext/simd.h's SSSE3 encoder (decided once, at import).
cdef bint _SSSE3 = simd_has_ssse3()


cdef void _init_base64url() noexcept:
    cdef int i
    memset(_VALUE, 255, 256)
    for i in range(64):
        _VALUE[<unsigned char>_ALPHABET[i]] = i
    for i in range(4096):
        _PAIRS[i][0] = _ALPHABET[i >> 6]
        _PAIRS[i][1] = _ALPHABET[i & 63]


_init_base64url()


cdef inline char *b64url_64(const unsigned char *src, char *dst) noexcept nogil:
    """Encode exactly 64 bytes as 86 base64url characters (no padding); return the end."""
    cdef int group = 0
    cdef uint32_t v
    if _SSSE3:  # the first 20 groups (60 bytes) at once
        simd_b64url_60(src, dst)
        group, src, dst = 20, src + 60, dst + 80
    while group < 21:  # 12 bits per lookup: half the lookups of a 6-bit table
        v = (<uint32_t>src[0] << 16) | (<uint32_t>src[1] << 8) | src[2]
        memcpy(dst, _PAIRS[v >> 12], 2)
        memcpy(dst + 2, _PAIRS[v & 0xFFF], 2)
        src += 3
        dst += 4
        group += 1
    dst[0] = _ALPHABET[src[0] >> 2]  # the 64th byte: 8 bits in two characters
    dst[1] = _ALPHABET[(src[0] & 3) << 4]
    return dst + 2


cdef inline bint b64url_decode_86(const unsigned char *chars, unsigned char *raw) noexcept nogil:
    """Decode an 86-character token into its 64 bytes; False if it is not canonical
    base64url.
    """
    cdef const unsigned char *values = _VALUE
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


cdef inline bint is_base64url(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    """True when all ``n`` bytes are base64url characters."""
    cdef Py_ssize_t i
    cdef unsigned char bad = 0
    for i in range(n):  # no early exit: a branch-free loop the compiler can vectorise
        bad |= _VALUE[s[i]]
    return (bad & 0x80) == 0
