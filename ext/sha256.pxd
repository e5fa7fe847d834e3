# ext/sha256.h: SHA-256's compression function (OpenSSL's, or its own in a
# MAILROOM_BUILD=portable build) and the initial state.

from libc.stdint cimport uint32_t


cdef extern from "sha256.h" nogil:
    const uint32_t sha256_iv[8]
    const char *SHA256_IMPL  # "openssl" or "portable": which build this is
    void sha256_compress(uint32_t *h, const unsigned char *block)
