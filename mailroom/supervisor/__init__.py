"""``mailroom-supervisor``: forks, routes between and watches the two workers.

The arbiter (:mod:`~mailroom.supervisor.arbiter`) knows processes, signals and
restarts; the router (:mod:`~mailroom.supervisor.router`) knows the batches in
flight; :mod:`~mailroom.supervisor.messages` types what crosses the pipes.
:mod:`~mailroom.supervisor.workers` holds the two worker entry points and is only
imported in a child after the fork: nothing in the supervisor's own process
imports psycopg, boto3 or the worker engines.
"""
