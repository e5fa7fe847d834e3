"""What the operator may see of the supervisor and ask of it: a narrow Protocol.

:class:`~mailroom.supervisor.operator.Operator` answers control commands beside
the arbiter.  It needs the workers' slots (to report them), the router (batches in
flight) and a handful of requests (send a worker a message, restart one, stop).
Typing it against the arbiter's class would make the two modules import each other
(the arbiter builds the operator); against this Protocol the dependency runs one way,
and the operator cannot reach the arbiter's loop, pipes or phases by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from typing import Protocol

from mailroom.config import Settings
from mailroom.supervisor.messages import WorkerStats
from mailroom.supervisor.router import Router
from mailroom.vocabulary import Role

__all__ = ["SupervisorView", "WorkerView"]


class WorkerView(Protocol):
    """One worker slot as the operator reports it (read-only)."""

    @property
    def process(self) -> BaseProcess | None: ...
    @property
    def started_at(self) -> float: ...
    @property
    def last_seen(self) -> float: ...
    @property
    def restarts(self) -> int: ...
    @property
    def stats(self) -> WorkerStats | None: ...
    @property
    def up(self) -> bool: ...


class SupervisorView(Protocol):
    """The supervisor as its operator sees it: state to report, five requests."""

    @property
    def settings(self) -> Settings: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def workers(self) -> Mapping[Role, WorkerView]: ...
    @property
    def router(self) -> Router: ...

    def send(self, role: Role, message: object) -> bool:
        """Write ``message`` to ``role``'s pipe; False when that worker is not up."""
        ...

    def request_restart(self, role: Role) -> None: ...
    def handle_term(self) -> None: ...
    def stop_now(self) -> None: ...
