"""mailroom.tokens.verify, the web application's half, over both implementations."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from mailroom import tokens, wire
from mailroom.wire import _py as _wire_py

DATA = Path(__file__).parent / "data"
KEY_HEX = "deadbeef" * 8
KEY = bytes.fromhex(KEY_HEX)
FORCED_C = os.environ.get("MAILROOM_IMPL", "").strip().lower() == "c"

# fixture.sql tokens 1 and 4, whose signed form is in expected-limit3.txt.
RECOVERY_SECRET, RECOVERY_CODE = bytes([0x11]) * 32, "35866"
ACTIVATION_SECRET = bytes.fromhex("ffeeddccbbaa99887766554433221100" * 2)


@pytest.fixture(params=["python", "c"])
def impl(request, monkeypatch):
    """Make mailroom.tokens use each implementation in turn."""
    if request.param == "python":
        module = _wire_py
    else:
        try:
            from mailroom.wire import _wire as module
        except ImportError as exc:
            if FORCED_C:
                pytest.fail(f"MAILROOM_IMPL=c but the compiled extension is not built: {exc}")
            pytest.skip("compiled extension mailroom.wire._wire is not built")
    monkeypatch.setattr(wire, "Signer", module.Signer)
    return module


def vector_tokens() -> dict[str, str]:
    """The signed tokens of fixture tokens 1 (recovery) and 4 (activation)."""
    first, second = (DATA / "expected-limit3.txt").read_text().splitlines()
    return {"recovery": first.split(",")[3], "activation": second.split(",")[3]}


def test_vectors_verify(impl):
    found = vector_tokens()
    assert tokens.verify(KEY_HEX, found["activation"], "activation") == ACTIVATION_SECRET
    assert tokens.verify(KEY, found["activation"], 1) == ACTIVATION_SECRET
    assert tokens.verify(KEY_HEX, found["recovery"], "password_recovery", RECOVERY_CODE) == RECOVERY_SECRET
    assert tokens.verify(KEY_HEX.upper().encode(), found["recovery"], 2, code=RECOVERY_CODE) == RECOVERY_SECRET


def test_good_tokens_both_actions(impl):
    signer = impl.Signer(KEY)
    secret = os.urandom(32)
    assert tokens.verify(KEY_HEX, signer.sign(1, secret, None), "activation") == secret
    assert tokens.verify(KEY_HEX, signer.sign(2, secret, "01234"), "password_recovery", "01234") == secret


def flip(token: str, bit: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=="))
    raw[bit // 8] ^= 1 << (bit % 8)
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


def test_every_flipped_bit_is_rejected(impl):
    token = vector_tokens()["recovery"]
    for bit in range(64 * 8):
        assert tokens.verify(KEY_HEX, flip(token, bit), 2, RECOVERY_CODE) is None, bit


def test_every_changed_character_is_rejected(impl):
    token = vector_tokens()["activation"]
    for index in range(len(token)):
        other = "B" if token[index] == "A" else "A"
        assert tokens.verify(KEY_HEX, token[:index] + other + token[index + 1 :], 1) is None, index


def test_non_canonical_last_character_is_rejected(impl):
    """86 characters carry 4 spare bits: setting them must not give a second valid token."""
    token = vector_tokens()["activation"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    value = alphabet.index(token[-1])
    for low in range(1, 16):
        assert tokens.verify(KEY_HEX, token[:-1] + alphabet[value | low], 1) is None


def test_wrong_action_code_or_key(impl):
    found = vector_tokens()
    assert tokens.verify(KEY_HEX, found["activation"], "password_recovery", "38022") is None
    assert tokens.verify(KEY_HEX, found["recovery"], "activation") is None
    assert tokens.verify(KEY_HEX, found["recovery"], 2, "35867") is None
    assert tokens.verify(KEY_HEX, found["recovery"], 2, "") is None
    assert tokens.verify(KEY_HEX, found["recovery"], 2, "\udcff") is None
    assert tokens.verify("00" * 32, found["activation"], 1) is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:85],  # too short
        lambda t: t + "A",  # too long
        lambda t: t + "==",  # padded
        lambda t: t[:10] + "+" + t[11:],  # standard base64, not base64url
        lambda t: t[:10] + "!" + t[11:],
        lambda t: t[:10] + " " + t[11:],
        lambda t: t[:10] + "é" + t[11:],
        lambda t: t[:10] + "\udcff" + t[11:],
        lambda t: "",
        lambda t: None,
        lambda t: t.encode(),
        lambda t: 12345,
    ],
)
def test_malformed_tokens_give_none(impl, mangle):
    assert tokens.verify(KEY_HEX, mangle(vector_tokens()["activation"]), "activation") is None


def test_bad_key_raises_without_echo(impl):
    token = vector_tokens()["activation"]
    for bad in ("deadbeef" * 7, "zz" + KEY_HEX[2:], KEY[:31], b"\xff" * 40, None):
        with pytest.raises(ValueError) as caught:
            tokens.verify(bad, token, 1)
        message = str(caught.value)
        assert "deadbeef" not in message and "zz" not in message and "\\x" not in message


def test_unknown_action_raises(impl):
    token = vector_tokens()["activation"]
    for action in (0, 3, "recovery", "ACTIVATION", True, None, 1.0):
        with pytest.raises(ValueError, match="unknown action"):
            tokens.verify(KEY_HEX, token, action)


def test_recovery_needs_a_code(impl):
    token = vector_tokens()["recovery"]
    with pytest.raises(TypeError, match="code"):
        tokens.verify(KEY_HEX, token, "password_recovery")
    with pytest.raises(TypeError, match="code"):
        tokens.verify(KEY_HEX, token, 2, code=35866)
