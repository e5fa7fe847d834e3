"""The collector: LISTEN for new tokens, claim them from the ledger in batches, encode.

:class:`~mailroom.collector.engine.Collector` is the engine; where batches go is a
:class:`~mailroom.collector.engine.BatchSink`: stdout in compatibility mode
(:func:`~mailroom.collector.stdout.run_stdout`), the supervisor's pipe in a worker.
"""

from mailroom.collector.engine import BatchSink, Collector
from mailroom.collector.stdout import StdoutSink, run_stdout

__all__ = ["BatchSink", "Collector", "StdoutSink", "run_stdout"]
