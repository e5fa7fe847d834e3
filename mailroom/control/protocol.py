"""The control socket's wire protocol (OPERATIONS.md 2): framing, validation, encoding.

One UTF-8 JSON object per line, at most :data:`MAX_LINE` bytes. Requests are
``{"v":1,"id":N,"cmd":"...","args":{...}}`` (``args`` may be left out when a
command takes none); any other field makes the request ``invalid_request``.
Replies are ``{"v":1,"id":N,"ok":true,"result":{...}}`` or
``{"v":1,"id":N,"ok":false,"error":{"code":"...","message":"..."}}``; events
``{"v":1,"event":"...","seq":N,"ts":"...","data":{...}}``.

Nothing here touches a socket: the server and the clients share it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from mailroom.vocabulary import BATCH_STATES, PAUSABLE, ROLES

VERSION = 1
#: The longest line either side accepts from a peer (bytes, newline excluded).
MAX_LINE = 64 * 1024

# Error codes (OPERATIONS.md 2).
PARSE_ERROR = "parse_error"          # bad JSON / UTF-8; the connection stays open
INVALID_REQUEST = "invalid_request"  # not a request object, extra or missing fields
UNKNOWN_COMMAND = "unknown_command"
INVALID_ARGS = "invalid_args"        # the message names the field
FORBIDDEN = "forbidden"              # a viewer asked for a state change
INVALID_STATE = "invalid_state"      # e.g. resume during shutdown
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"              # the line passed MAX_LINE; the server then closes
INTERNAL = "internal"                # no traceback to the client: the supervisor logs it
ERROR_CODES = frozenset({PARSE_ERROR, INVALID_REQUEST, UNKNOWN_COMMAND, INVALID_ARGS, FORBIDDEN,
                         INVALID_STATE, NOT_FOUND, TOO_LARGE, INTERNAL})

OPERATOR = "operator"
VIEWER = "viewer"

#: Every event the supervisor publishes; ``audit`` is the server's own (one per
#: state-changing request, accepted or refused).
EVENTS = ("batch.claimed", "batch.dispatched", "batch.done", "worker.started", "worker.exited",
          "state.changed", "account.paused", "templates.changed", "tick", "audit")
#: What ``subscribe {topics}`` accepts: an event name or the part before its dot.
TOPICS = frozenset(EVENTS) | {event.split(".")[0] for event in EVENTS}

MAX_BATCHES = 500
#: The longest ``drain`` wait and the highest ``set_rate`` the protocol accepts.
MAX_DRAIN_S = 86_400
MAX_RATE = 1_000_000


class ControlError(Exception):
    """A request refused with one of :data:`ERROR_CODES`; ``message`` is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- argument schema ----------------------------------------------------------------

Check = Callable[[str, Any], Any]


def _string(choices: tuple[str, ...] = (), max_len: int = 256) -> Check:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, str):
            raise ControlError(INVALID_ARGS, f"{name}: expected a string")
        if choices and value not in choices:
            raise ControlError(INVALID_ARGS, f"{name}: expected one of {', '.join(choices)}")
        if not choices and not 0 < len(value) <= max_len:
            raise ControlError(INVALID_ARGS, f"{name}: expected 1 to {max_len} characters")
        return value
    return check


def _number(low: float, high: float, *, integer: bool = False) -> Check:
    """A JSON number in ``(low, high]`` (``[low, high]`` for integers). bool is refused:
    ``true`` is an int to Python, never a rate to an operator."""
    def check(name: str, value: Any) -> Any:
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ControlError(INVALID_ARGS, f"{name}: expected {'an integer' if integer else 'a number'}")
        assert isinstance(value, (int, float))
        if integer and not low <= value <= high:
            raise ControlError(INVALID_ARGS, f"{name}: must be between {low:g} and {high:g}")
        if not integer and not (math.isfinite(value) and low < value <= high):
            raise ControlError(INVALID_ARGS, f"{name}: must be greater than {low:g} and at most {high:g}")
        return value
    return check


def _topics(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > len(TOPICS):
        raise ControlError(INVALID_ARGS, f"{name}: expected a list of topics")
    for topic in value:
        if not isinstance(topic, str) or topic not in TOPICS:
            raise ControlError(INVALID_ARGS, f"{name}: unknown topic {str(topic)[:64]!r}; "
                                             f"known: {', '.join(sorted(TOPICS))}")
    return value


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of a command: its check and whether it must be given."""

    check: Check
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Command:
    """A command of the table: operator-only or not, and its arguments."""

    name: str
    operator_only: bool = False
    args: Mapping[str, Arg] = dataclasses.field(default_factory=dict)


_COMMAND_LIST = (
    Command("hello"),
    Command("status"),
    Command("subscribe", args={"topics": Arg(_topics)}),
    Command("unsubscribe"),
    Command("batches", args={"state": Arg(_string(BATCH_STATES)),
                             "limit": Arg(_number(1, MAX_BATCHES, integer=True))}),
    Command("batch", args={"id": Arg(_string(max_len=128), required=True)}),
    Command("pause", True, {"what": Arg(_string(PAUSABLE), required=True)}),
    Command("resume", True, {"what": Arg(_string(PAUSABLE), required=True)}),
    Command("drain", True, {"timeout_s": Arg(_number(0, MAX_DRAIN_S))}),
    Command("set_rate", True, {"per_second": Arg(_number(0, MAX_RATE), required=True)}),
    Command("restart", True, {"worker": Arg(_string(ROLES), required=True)}),
    Command("shutdown", True, {"mode": Arg(_string(("graceful", "now")))}),
)
#: The command table, by name.
COMMANDS: dict[str, Command] = {command.name: command for command in _COMMAND_LIST}


def commands_for(role: str) -> list[str]:
    """The commands ``role`` may run, in table order."""
    return [c.name for c in _COMMAND_LIST if role == OPERATOR or not c.operator_only]


# -- requests ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Parsed:
    """A request that passed validation (the role is checked by the server)."""

    id: int
    command: Command
    args: dict[str, Any]


_REQUEST_FIELDS = frozenset({"v", "id", "cmd", "args"})
_MAX_ID = 2**53  # exact in every JSON implementation


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_line(line: bytes) -> Any:
    """Decode one line (newline stripped) into a JSON value, or raise ``parse_error``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlError(PARSE_ERROR, f"not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ControlError(PARSE_ERROR, f"not JSON: {str(exc)[:120]}") from None


def request_id(obj: Any) -> int | None:
    """The id to answer with, when the object carries a usable one."""
    if isinstance(obj, dict):
        value = obj.get("id")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID:
            return value
    return None


def validate(obj: Any) -> Parsed:
    """Check a decoded request's shape and command; arguments via :func:`check_args`.

    Raises ``invalid_request`` or ``unknown_command``. The arguments are checked
    separately so that the server can refuse a viewer before looking at them.
    """
    if not isinstance(obj, dict):
        raise ControlError(INVALID_REQUEST, "a request is a JSON object")
    extra = sorted(set(obj) - _REQUEST_FIELDS)
    if extra:
        raise ControlError(INVALID_REQUEST, f"unexpected field {extra[0][:64]!r}")
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise ControlError(INVALID_REQUEST, f"v: expected {VERSION}")
    ident = request_id(obj)
    if ident is None:
        raise ControlError(INVALID_REQUEST, f"id: expected an integer from 0 to {_MAX_ID}")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError(INVALID_REQUEST, "cmd: expected a string")
    command = COMMANDS.get(cmd)
    if command is None:
        raise ControlError(UNKNOWN_COMMAND, f"unknown command {cmd[:64]!r}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ControlError(INVALID_REQUEST, "args: expected an object")
    return Parsed(ident, command, args)


def check_args(command: Command, args: dict[str, Any]) -> dict[str, Any]:
    """Validate ``args`` against the command's schema; ``invalid_args`` names the field."""
    for name in args:
        if name not in command.args:
            raise ControlError(INVALID_ARGS, f"{name[:64]}: {command.name} takes no such argument")
    checked: dict[str, Any] = {}
    for name, spec in command.args.items():
        if name in args:
            checked[name] = spec.check(name, args[name])
        elif spec.required:
            raise ControlError(INVALID_ARGS, f"{name}: required")
    return checked


# -- encoding -----------------------------------------------------------------------

def dumps(value: Any) -> str:
    """Compact JSON, UTF-8 friendly; NaN refused (it is not JSON)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_request(ident: int, cmd: str, args: Mapping[str, Any]) -> bytes:
    """One request line."""
    return (dumps({"v": VERSION, "id": ident, "cmd": cmd, "args": dict(args)}) + "\n").encode()


def encode_reply(ident: int | None, result: Mapping[str, Any]) -> bytes:
    """One success reply line. Raises ``TypeError``/``ValueError`` for a result that is not JSON."""
    return (dumps({"v": VERSION, "id": ident, "ok": True, "result": result}) + "\n").encode()


def encode_error(ident: int | None, code: str, message: str) -> bytes:
    """One error reply line."""
    error = {"code": code, "message": message}
    return (dumps({"v": VERSION, "id": ident, "ok": False, "error": error}) + "\n").encode()


def encode_event(event: str, seq: int, ts: str, data_json: str) -> bytes:
    """One event line; ``data_json`` is already encoded (once per publish, not per client)."""
    return (f'{{"v":{VERSION},"event":{dumps(event)},"seq":{seq},"ts":{dumps(ts)},'
            f'"data":{data_json}}}\n').encode()
