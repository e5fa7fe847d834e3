# OpenSSL's libcrypto, as far as ext/_wire.pyx uses it directly.  SHA-256 itself is
# reached through sha256.h (see the note there on the deprecated SHA256_Transform).

cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void *a, const void *b, size_t length)  # constant time
    void OPENSSL_cleanse(void *ptr, size_t length)  # a memset the compiler keeps
