"""The batch wire format: sign tokens, encode a batch into one line, decode it back.

This module picks the implementation once, at import, like psycopg does:

- ``MAILROOM_IMPL=c``: the compiled extension ``mailroom.wire._wire``; ImportError if it is
  not built.
- ``MAILROOM_IMPL=python``: the pure-Python twin ``mailroom.wire._py``.
- unset or empty: the compiled one if it imports, else the pure-Python one;
  :data:`FALLBACK` then says why (the console scripts log it once).

Both produce the same bytes and raise the same errors; :data:`IMPL` says which one is
in use (``"c"`` or ``"python"``).  The rest of the project imports only this module.

Example::

    from mailroom import wire
    from mailroom.vocabulary import Action

    signer = wire.Signer(wire.parse_key(os.environ["MAILROOM_SECRET_KEY"]))
    line = signer.encode_batch([(Action.ACTIVATION, "ann@example.test", "ann", secret, "12345")])
    rows = wire.decode_line(line)  # [(1, "ann@example.test", "ann", "<86 chars>", "12345")]
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, cast

from mailroom.wire._base import (
    SECRET_LENGTH,
    TOKEN_LENGTH,
    SignerProtocol,
    WireError,
    WireFields,
    WireImplementation,
    parse_key,
)

__all__ = [
    "IMPL",
    "SECRET_LENGTH",
    "TOKEN_LENGTH",
    "WireFields",
    "Signer",
    "SignerProtocol",
    "WireError",
    "decode_line",
    "parse_key",
]

ENV_VAR = "MAILROOM_IMPL"
_BUILD_HINT = "build it with `python setup.py build_ext --inplace` or install the package with pip"


def _load() -> tuple[str, WireImplementation]:
    choice = os.environ.get(ENV_VAR, "").strip().lower()
    if choice == "python":
        from mailroom.wire import _py as _wire_py

        return "python", cast(WireImplementation, _wire_py)
    if choice == "c":
        try:
            import mailroom.wire._wire as _wire
        except ImportError as exc:
            raise ImportError(
                f"{ENV_VAR}=c but the compiled extension mailroom.wire._wire is not built or does not "
                f"load ({exc}); {_BUILD_HINT}, or set {ENV_VAR}=python"
            ) from exc
        return "c", cast(WireImplementation, _wire)
    if choice:
        raise ImportError(f"{ENV_VAR} must be 'c', 'python' or empty (automatic), got {choice!r}")
    try:
        import mailroom.wire._wire as _wire
    except ImportError as exc:
        from mailroom.wire import _py as _wire_py

        # Not printed: a library (mailroom.tokens in a web app) must stay quiet.
        # The console scripts log FALLBACK once, after their logging is set up.
        global FALLBACK
        FALLBACK = f"compiled extension not available ({exc}), using the pure-Python wire format (slower)"
        return "python", cast(WireImplementation, _wire_py)
    return "c", cast(WireImplementation, _wire)


#: Why the pure-Python twin is in use although nobody asked for it, else None.
FALLBACK: str | None = None
IMPL, _impl = _load()

if TYPE_CHECKING:  # type checkers see the pure-Python twin: same signatures
    import mailroom.wire._py as _py_checked
    import mailroom.wire._wire as _wire_checked  # its stub, _wire.pyi
    from mailroom.wire._py import Signer, decode_line

    # mypy proves both implementations provide the one interface.
    _both: tuple[WireImplementation, WireImplementation] = (_py_checked, _wire_checked)
else:
    #: Signs token secrets and encodes batch lines (see ``SignerProtocol``).
    Signer = _impl.Signer
    #: ``decode_line(line: bytes) -> list[WireFields]``; raises WireError on a malformed line.
    decode_line = _impl.decode_line
