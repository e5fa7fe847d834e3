/* SHA-256's compression function, the one primitive the HMAC of ext/hmac.pxi needs.
 *
 * HMAC with precomputed keyed states (a "midstate") needs to compress one 64-byte
 * block into a given state.  OpenSSL's only public way to do that is SHA256_Transform,
 * deprecated since OpenSSL 3.0 with no replacement: EVP digests neither expose nor
 * accept an intermediate state, so an EVP-based HMAC would re-hash the key's pad
 * blocks for every token (four compressions per row instead of two).
 *
 * Where the CPU has SHA-NI the row loop does not come here at all (simd.h).  Elsewhere
 * the default build uses SHA256_Transform (OpenSSL picks AVX2, SSSE3 or plain code
 * for the CPU).  What replaces it when OpenSSL drops it is the FIPS 180-4 compression
 * below, used when asked for (MAILROOM_BUILD=portable: setup.py defines
 * MAILROOM_PORTABLE, which also turns simd.h off) and when this OpenSSL's headers hide
 * the deprecated API (OPENSSL_NO_DEPRECATED_3_0).  tests/test_wire.py runs the
 * conformance vectors against the portable build ("c-portable").  It is plain C: a
 * 1,000-row batch takes 480 us where the SHA-NI path takes 80 us and OpenSSL's
 * SHA256_Transform 125 us, on the benchmark machine of README.md.
 */
#ifndef MAILROOM_SHA256_H
#define MAILROOM_SHA256_H

#include <stdint.h>
#include <string.h>

/* The initial hash value H(0) of FIPS 180-4, section 5.3.3. */
static const uint32_t sha256_iv[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

/* The constants K of FIPS 180-4, section 4.2.2 (also read by simd.h's SHA-NI rounds). */
static const uint32_t sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#ifndef MAILROOM_PORTABLE
#include <openssl/sha.h> /* defines OPENSSL_NO_DEPRECATED_3_0 when it hides the API */
#endif

#if !defined(MAILROOM_PORTABLE) && !defined(OPENSSL_NO_DEPRECATED_3_0)

#define SHA256_IMPL "openssl"

/* Compress one 64-byte block into the state h. */
static inline void sha256_compress(uint32_t h[8], const unsigned char *block)
{
    SHA256_CTX ctx; /* SHA256_Transform reads and writes ctx.h only */
    memcpy(ctx.h, h, 32);
    SHA256_Transform(&ctx, block);
    memcpy(h, ctx.h, 32);
}

#else /* no deprecated OpenSSL call */

#define SHA256_IMPL "portable"

static inline uint32_t sha256_rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/* Compress one 64-byte block into the state h (FIPS 180-4, section 6.2.2). */
static inline void sha256_compress(uint32_t h[8], const unsigned char *block)
{
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16
             | (uint32_t)block[4 * i + 2] << 8 | block[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = sha256_rotr(w[i - 15], 7) ^ sha256_rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = sha256_rotr(w[i - 2], 17) ^ sha256_rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (i = 0; i < 64; i++) {
        t1 = k + (sha256_rotr(e, 6) ^ sha256_rotr(e, 11) ^ sha256_rotr(e, 25))
               + ((e & f) ^ (~e & g)) + sha256_k[i] + w[i];
        t2 = (sha256_rotr(a, 2) ^ sha256_rotr(a, 13) ^ sha256_rotr(a, 22))
               + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1;
        d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

#endif /* SHA256_Transform or not */

#endif /* MAILROOM_SHA256_H */
