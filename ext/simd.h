/* x86 SIMD for the row loop, chosen at run time: SHA-NI compressions, SSSE3 base64url.
 *
 * The extension is compiled for the x86-64 baseline, which promises neither: each
 * function here is compiled for its instructions alone (target attribute) and
 * simd_has_sha() / simd_has_ssse3() say once, at import, whether this CPU may run
 * it.  Elsewhere (other architectures, other compilers, MAILROOM_PORTABLE builds)
 * both say 0 and the callers use sha256.h's compression and a scalar encoder.
 *
 * SHA-NI: OpenSSL's SHA256_Transform uses the same instructions, but a signature is
 * two compressions in a chain (inner, then outer) and one compression is itself a
 * chain of 32 two-round steps, each waiting for the one before: a core can run two
 * such chains side by side in the time of one.  simd_sha256_x2() compresses the
 * blocks of two rows at once, interleaved, so that the row loop signs rows in pairs.
 *
 * base64url: the method of Mula and Lemire ("Faster Base64 Encoding and Decoding
 * using AVX2 Instructions", 2018) on 128-bit registers, 12 input bytes to 16
 * characters in a dozen instructions instead of 16 table lookups.
 */
#ifndef MAILROOM_SIMD_H
#define MAILROOM_SIMD_H

#include "sha256.h"

#if !defined(MAILROOM_PORTABLE) && (defined(__x86_64__) || defined(__i386__)) \
    && (defined(__GNUC__) || defined(__clang__))

#include <cpuid.h>
#include <immintrin.h>

#define SIMD_CPUID1_ECX_SSSE3 (1u << 9)
#define SIMD_CPUID1_ECX_SSE41 (1u << 19)
#define SIMD_CPUID7_EBX_SHA (1u << 29)

static inline int simd_has_ssse3(void)
{
    unsigned int a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & SIMD_CPUID1_ECX_SSSE3);
}

static inline int simd_has_sha(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if (!(c & SIMD_CPUID1_ECX_SSSE3) || !(c & SIMD_CPUID1_ECX_SSE41))
        return 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & SIMD_CPUID7_EBX_SHA);
}

#define SIMD_SHA_TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* Compress block[i] into h[i] for i < n (1 or 2), the n streams interleaved.
 * SHA-NI keeps the state as two registers, ABEF and CDGH (A in the top lane). */
SIMD_SHA_TARGET static inline __attribute__((always_inline)) void
simd_sha256_n(const int n, uint32_t *const h[], const unsigned char *const block[])
{
    /* Byte order of each 32-bit word: the message words are big-endian. */
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i abef[2], cdgh[2], abef0[2], cdgh0[2], w[2][4];
    int i, g;
    for (i = 0; i < n; i++) {
        __m128i dcba = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)h[i]), 0xB1);
        __m128i hgfe = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(h[i] + 4)), 0x1B);
        abef[i] = abef0[i] = _mm_alignr_epi8(dcba, hgfe, 8);
        cdgh[i] = cdgh0[i] = _mm_blend_epi16(hgfe, dcba, 0xF0);
        for (g = 0; g < 4; g++)
            w[i][g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(block[i] + 16 * g)), swap);
    }
#pragma GCC unroll 16
    for (g = 0; g < 16; g++) { /* four rounds per step; w[][g % 4] holds words 4g..4g+3 */
        const __m128i k = _mm_loadu_si128((const __m128i *)(sha256_k + 4 * g));
        for (i = 0; i < n; i++) {
            __m128i wk;
            if (g >= 4) { /* the message schedule: W[t] from W[t-16], W[t-15], W[t-7], W[t-2] */
                __m128i t = _mm_sha256msg1_epu32(w[i][g & 3], w[i][(g + 1) & 3]);
                t = _mm_add_epi32(t, _mm_alignr_epi8(w[i][(g + 3) & 3], w[i][(g + 2) & 3], 4));
                w[i][g & 3] = _mm_sha256msg2_epu32(t, w[i][(g + 3) & 3]);
            }
            wk = _mm_add_epi32(w[i][g & 3], k);
            /* Two rounds each: two rounds on, the old ABEF is the new CDGH, so after
             * both the names are right again. */
            cdgh[i] = _mm_sha256rnds2_epu32(cdgh[i], abef[i], wk);
            abef[i] = _mm_sha256rnds2_epu32(abef[i], cdgh[i], _mm_shuffle_epi32(wk, 0x0E));
        }
    }
    for (i = 0; i < n; i++) {
        __m128i feba = _mm_shuffle_epi32(_mm_add_epi32(abef[i], abef0[i]), 0x1B);
        __m128i dchg = _mm_shuffle_epi32(_mm_add_epi32(cdgh[i], cdgh0[i]), 0xB1);
        _mm_storeu_si128((__m128i *)h[i], _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128((__m128i *)(h[i] + 4), _mm_alignr_epi8(dchg, feba, 8));
    }
}

SIMD_SHA_TARGET static void simd_sha256_1(uint32_t *h, const unsigned char *block)
{
    uint32_t *const hs[1] = {h};
    const unsigned char *const blocks[1] = {block};
    simd_sha256_n(1, hs, blocks);
}

SIMD_SHA_TARGET static void simd_sha256_x2(uint32_t *ha, const unsigned char *blocka,
                                           uint32_t *hb, const unsigned char *blockb)
{
    uint32_t *const hs[2] = {ha, hb};
    const unsigned char *const blocks[2] = {blocka, blockb};
    simd_sha256_n(2, hs, blocks);
}

/* Write the first 80 characters of the base64url encoding of src[0:60] to dst,
 * reading src[0:64] (the last 16-byte load ends at the 64th byte). */
__attribute__((target("ssse3")))
static void simd_b64url_60(const unsigned char *src, char *dst)
{
    /* Per 32-bit lane, the 3 input bytes b0 b1 b2 as b1 b0 b2 b1: each 16-bit half
     * then holds two of the four 6-bit values at known bit positions. */
    const __m128i spread = _mm_setr_epi8(1, 0, 2, 1, 4, 3, 5, 4, 7, 6, 8, 7, 10, 9, 11, 10);
    /* Value ranges -> offset to add: 0-25 'A', 26-51 'a'-26, 52-61 '0'-52, 62 '-', 63 '_'. */
    const __m128i offsets = _mm_setr_epi8('a' - 26, '0' - 52, '0' - 52, '0' - 52, '0' - 52,
                                          '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52,
                                          '0' - 52, '-' - 62, '_' - 63, 'A', 0, 0);
    int i;
    for (i = 0; i < 5; i++) {
        __m128i in = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(src + 12 * i)), spread);
        /* Move the four values of each lane to one byte each, in output order. */
        __m128i hi = _mm_mulhi_epu16(_mm_and_si128(in, _mm_set1_epi32(0x0fc0fc00)),
                                     _mm_set1_epi32(0x04000040));
        __m128i lo = _mm_mullo_epi16(_mm_and_si128(in, _mm_set1_epi32(0x003f03f0)),
                                     _mm_set1_epi32(0x01000010));
        __m128i values = _mm_or_si128(hi, lo);
        /* Range of each value: 52-63 -> 1-12 (saturating), 26-51 -> 0, 0-25 -> 13. */
        __m128i range = _mm_subs_epu8(values, _mm_set1_epi8(51));
        range = _mm_or_si128(range, _mm_and_si128(_mm_cmpgt_epi8(_mm_set1_epi8(26), values),
                                                  _mm_set1_epi8(13)));
        __m128i chars = _mm_add_epi8(values, _mm_shuffle_epi8(offsets, range));
        _mm_storeu_si128((__m128i *)(dst + 16 * i), chars);
    }
}

#else /* no x86 SIMD: the callers never call these */

static inline int simd_has_ssse3(void) { return 0; }
static inline int simd_has_sha(void) { return 0; }
static inline void simd_sha256_1(uint32_t *h, const unsigned char *block) { sha256_compress(h, block); }
static inline void simd_sha256_x2(uint32_t *ha, const unsigned char *blocka,
                                  uint32_t *hb, const unsigned char *blockb)
{
    sha256_compress(ha, blocka);
    sha256_compress(hb, blockb);
}
static inline void simd_b64url_60(const unsigned char *src, char *dst) { (void)src; (void)dst; }

#endif

#endif /* MAILROOM_SIMD_H */
