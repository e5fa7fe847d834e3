"""The control plane (OPERATIONS.md 1-3): the supervisor's control socket, its clients
(``mailroom ctl``, the monitor) and the Prometheus metrics.

- :mod:`~mailroom.control.protocol`: framing, validation, error codes, the command table.
- :mod:`~mailroom.control.server`: :class:`ControlServer`, served from the supervisor's loop.
- :mod:`~mailroom.control.sockfile`: the socket's path, permissions, stale files.
- :mod:`~mailroom.control.client`: :class:`ControlClient` and :class:`AsyncControlClient`.
- :mod:`~mailroom.control.ctl`: ``mailroom ctl``.
- :mod:`~mailroom.control.metrics`: :class:`Metrics` and :class:`MetricsServer`.

Imports flow one way: this package uses ``config`` and ``protocol`` only, never a
worker's modules, and imports no database or SES client.
"""
