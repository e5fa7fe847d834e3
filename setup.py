"""Build script for the compiled hot path (``ext/_wire.pyx`` -> ``mailroom.wire._wire``).

Cython is needed only when the generated C file is missing (as in a git checkout);
an sdist that ships ``ext/_wire.c`` builds with a C compiler alone.  The extension
links OpenSSL's libcrypto for SHA-256 (SHA-NI accelerated where the CPU has it).

The extension is optional, as psycopg's C layer is: where it cannot be built (no C
compiler, no Python or OpenSSL headers) the install still succeeds, says so once, and
the package uses its pure-Python twin (``MAILROOM_IMPL=c`` then refuses to start).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PYX = os.path.join("ext", "_wire.pyx")
C_SOURCE = os.path.join("ext", "_wire.c")
#: The compiled module's import name.
EXTENSION = "mailroom.wire._wire"


class optional_build_ext(build_ext):
    """build_ext that turns a failed compile or link into one warning instead of an error."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all: distutils' PlatformError and kin
            self._skipped(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError: missing headers or libcrypto
            self._skipped(exc)

    def _skipped(self, exc: Exception) -> None:
        detail = " ".join(str(exc).split())
        sys.stderr.write(
            f"WARNING: mailroom's compiled extension ({EXTENSION}) could not be built ({detail}); "
            "installing the pure-Python implementation only (same behaviour, slower). "
            "For the fast path install a C compiler and the Python and OpenSSL headers "
            "(Debian/Ubuntu: apt-get install gcc python3-dev libssl-dev) and reinstall; if the "
            "error names SHA256_Transform, this OpenSSL lacks its deprecated API: "
            "MAILROOM_BUILD=portable builds without it.\n"
        )


#: What the C file includes or Cython reads besides the .pyx: a change rebuilds.
DEPENDS = [os.path.join("ext", name) for name in (
    "base64url.pxi", "cpythonx.pxd", "hmac.pxi", "openssl.pxd", "rows.pxi", "sha256.h",
    "sha256.pxd", "simd.h", "simd.pxd", "text.pxi",
)]
#: ``MAILROOM_BUILD=portable``: build without OpenSSL's deprecated SHA256_Transform and
#: without SIMD (ext/sha256.h says why it exists); tests/test_wire.py builds it so.  The
#: generated C is the same: only the macros given to the C compiler differ.
PORTABLE = os.environ.get("MAILROOM_BUILD", "").strip().lower() == "portable"


def extensions() -> list:
    macros = [("MAILROOM_PORTABLE", "1")] if PORTABLE else [("OPENSSL_SUPPRESS_DEPRECATED", "1")]
    common = dict(
        name=EXTENSION,
        libraries=["crypto"],
        include_dirs=["ext"],
        depends=DEPENDS,
        # A header that drops a deprecated function must fail the build, not leave
        # an undefined symbol for import time (ext/sha256.h: MAILROOM_BUILD=portable).
        extra_compile_args=["-O3", "-Werror=implicit-function-declaration"],
        define_macros=macros,
    )
    if os.path.exists(os.path.join(HERE, PYX)):
        from Cython.Build import cythonize

        return cythonize(
            [Extension(sources=[PYX], **common)],
            language_level=3,
            include_path=["ext"],
            compiler_directives={"boundscheck": False, "wraparound": False},
        )
    return [Extension(sources=[C_SOURCE], **common)]


setup(ext_modules=extensions(), cmdclass={"build_ext": optional_build_ext})
