"""Build script for the compiled hot path (``ext/_wire.pyx`` -> ``mailroom.wire._wire``).

Cython is needed only when the generated C file is missing (as in a git checkout);
an sdist that ships ``ext/_wire.c`` builds with a C compiler alone.  The extension
links OpenSSL's libcrypto for SHA-256 (SHA-NI accelerated where the CPU has it).
"""

import os

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PYX = os.path.join("ext", "_wire.pyx")
C_SOURCE = os.path.join("ext", "_wire.c")


def extensions() -> list:
    common = dict(
        name="mailroom.wire._wire",
        libraries=["crypto"],
        extra_compile_args=["-O3"],
        define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", "1")],
    )
    if os.path.exists(os.path.join(HERE, PYX)):
        from Cython.Build import cythonize

        return cythonize(
            [Extension(sources=[PYX], **common)],
            language_level=3,
            compiler_directives={"boundscheck": False, "wraparound": False},
        )
    return [Extension(sources=[C_SOURCE], **common)]


setup(ext_modules=extensions())
