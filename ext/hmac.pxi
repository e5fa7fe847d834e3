# HMAC-SHA256 of the tokens (RFC 2104), included by _wire.pyx.
#
# HMAC(key, m) = H(key^opad || H(key^ipad || m)).  The states after the two pad blocks
# depend on the key alone: HmacKey keeps them, so a token costs two compressions (the
# message with its padding, then the inner digest with its padding) on blocks whose
# fixed parts are prepared here too.

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset

from sha256 cimport sha256_compress, sha256_iv
from simd cimport simd_has_sha, simd_sha256_1, simd_sha256_x2

#: Whether this CPU runs ext/simd.h's SHA-NI compressions (decided once, at import).
cdef bint _SHANI = simd_has_sha()


cdef extern from *:
    uint32_t bswap32 "__builtin_bswap32" (uint32_t) nogil
    uint64_t bswap64 "__builtin_bswap64" (uint64_t) nogil


cdef struct HmacKey:
    uint32_t inner[8]  # SHA-256 state after key^ipad
    uint32_t outer[8]  # SHA-256 state after key^opad
    # The single message block of an activation signature, with its padding and
    # length already in place; only the 32 secret bytes change per row.
    unsigned char activate_block[64]
    # "/recover" then zeros: a recovery's block before its secret, code and padding.
    unsigned char recover_block[64]
    # The outer block: room for the inner digest, then fixed padding for 96 bytes.
    unsigned char outer_block[64]


cdef inline void compress(uint32_t *h, const unsigned char *block) noexcept nogil:
    """One SHA-256 compression: SHA-NI inline where the CPU has it, else sha256.h's."""
    if _SHANI:
        simd_sha256_1(h, block)
    else:
        sha256_compress(h, block)


cdef inline void store_digest(unsigned char *dst, const uint32_t *h) noexcept nogil:
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


cdef void hmac_init(HmacKey *k, const unsigned char *key) noexcept nogil:
    """Prepare ``k`` for the 32-byte ``key``."""
    cdef unsigned char pad[64]
    cdef int i
    for i in range(64):  # the key zero-padded to one block, xor ipad
        pad[i] = (key[i] if i < 32 else 0) ^ 0x36
    memcpy(k.inner, sha256_iv, 32)
    compress(k.inner, pad)
    for i in range(64):  # now xor opad
        pad[i] ^= 0x36 ^ 0x5C
    memcpy(k.outer, sha256_iv, 32)
    compress(k.outer, pad)
    memset(pad, 0, 64)  # do not leave key material on the stack
    # Activation: "/activate" (9) + secret (32) = 41 bytes, padded in one block.
    memset(k.activate_block, 0, 64)
    memcpy(k.activate_block, b"/activate", 9)
    k.activate_block[41] = 0x80
    store_length(k.activate_block, 64 + 41)
    memset(k.recover_block, 0, 64)
    memcpy(k.recover_block, b"/recover", 8)
    # Outer message after the opad block: the 32-byte inner digest.
    memset(k.outer_block, 0, 64)
    k.outer_block[32] = 0x80
    store_length(k.outer_block, 64 + 32)


cdef inline void absorb(uint32_t *h, unsigned char *buf, Py_ssize_t *used,
                        const void *data, Py_ssize_t size) noexcept nogil:
    """Append ``size`` bytes to the partial block ``buf[:used]``, compressing full blocks."""
    cdef const unsigned char *p = <const unsigned char *>data
    cdef Py_ssize_t take
    while size > 0:
        take = min(64 - used[0], size)
        memcpy(buf + used[0], p, take)
        used[0] += take
        p += take
        size -= take
        if used[0] == 64:
            compress(h, buf)
            used[0] = 0


cdef void hash_long_recovery(uint32_t *h, const unsigned char *secret,
                             const char *code, Py_ssize_t code_len) noexcept nogil:
    """Absorb "/recover" + secret + code and SHA-256's padding into ``h`` (any length;
    the rare codes too long for the one-block path of hmac_token)."""
    cdef unsigned char buf[64]
    cdef Py_ssize_t used = 0
    absorb(h, buf, &used, b"/recover", 8)
    absorb(h, buf, &used, secret, 32)
    absorb(h, buf, &used, code, code_len)
    buf[used] = 0x80
    used += 1
    if used > 56:  # no room left for the length: it goes in one more block
        memset(buf + used, 0, 64 - used)
        compress(h, buf)
        used = 0
    memset(buf + used, 0, 56 - used)
    store_length(buf, 64 + 8 + 32 + code_len)
    compress(h, buf)


cdef struct TokenInput:
    # What a token signs: "/activate" + secret (action 1) or "/recover" + secret + code.
    int action
    const unsigned char *secret  # 32 bytes
    const char *code  # UTF-8
    Py_ssize_t code_len


cdef inline bint inner_block(const HmacKey *k, const TokenInput *t,
                             unsigned char *block) noexcept nogil:
    """Write the token's message and padding as the block after key^ipad; False when
    the message does not fit in one block (a recovery code of 16 bytes or more)."""
    cdef Py_ssize_t size
    if t.action == 1:
        memcpy(block, k.activate_block, 64)
        memcpy(block + 9, t.secret, 32)
        return True
    size = 8 + 32 + t.code_len
    if size > 55:
        return False
    memcpy(block, k.recover_block, 64)
    memcpy(block + 8, t.secret, 32)
    memcpy(block + 40, t.code, t.code_len)
    block[size] = 0x80
    store_length(block, 64 + size)
    return True


cdef void hmac_token(const HmacKey *k, const TokenInput *t, unsigned char *raw) noexcept nogil:
    """Write ``secret || HMAC-SHA256(key, message)`` (the 64 bytes of a token) into ``raw``."""
    cdef uint32_t h[8]
    cdef unsigned char block[64]
    memcpy(raw, t.secret, 32)
    memcpy(h, k.inner, 32)
    if inner_block(k, t, block):
        compress(h, block)
    else:
        hash_long_recovery(h, t.secret, t.code, t.code_len)
    memcpy(block, k.outer_block, 64)
    store_digest(block, h)
    memcpy(h, k.outer, 32)
    compress(h, block)
    store_digest(raw + 32, h)


cdef inline void hmac_token_pair(const HmacKey *k, const TokenInput *a, unsigned char *raw_a,
                                 const TokenInput *b, unsigned char *raw_b) noexcept nogil:
    """hmac_token() for two tokens, their compressions interleaved on SHA-NI (simd.h)."""
    cdef uint32_t ha[8]
    cdef uint32_t hb[8]
    cdef unsigned char block_a[64]
    cdef unsigned char block_b[64]
    if not _SHANI or not inner_block(k, a, block_a) or not inner_block(k, b, block_b):
        hmac_token(k, a, raw_a)
        hmac_token(k, b, raw_b)
        return
    memcpy(raw_a, a.secret, 32)
    memcpy(raw_b, b.secret, 32)
    memcpy(ha, k.inner, 32)
    memcpy(hb, k.inner, 32)
    simd_sha256_x2(ha, block_a, hb, block_b)
    memcpy(block_a, k.outer_block, 64)
    memcpy(block_b, k.outer_block, 64)
    store_digest(block_a, ha)
    store_digest(block_b, hb)
    memcpy(ha, k.outer, 32)
    memcpy(hb, k.outer, 32)
    simd_sha256_x2(ha, block_a, hb, block_b)
    store_digest(raw_a + 32, ha)
    store_digest(raw_b + 32, hb)
