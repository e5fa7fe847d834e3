# ext/simd.h: SHA-NI compressions and SSSE3 base64url, used when the CPU has them.

from libc.stdint cimport uint32_t


cdef extern from "simd.h" nogil:
    int simd_has_sha()
    int simd_has_ssse3()
    void simd_sha256_1(uint32_t *h, const unsigned char *block)
    void simd_sha256_x2(uint32_t *ha, const unsigned char *blocka,
                        uint32_t *hb, const unsigned char *blockb)
    void simd_b64url_60(const unsigned char *src, char *dst)
