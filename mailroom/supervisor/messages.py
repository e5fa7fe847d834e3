"""Messages on the supervisor's pipes (tuples; the first item names the message).

collector -> supervisor
    ``("ready",)``                              connected, schema checked, listening
    ``("heartbeat",)``                          the loop is alive
    ``("batch", batch_id, line, token_ids, n_activation, n_recovery, claimed_at)``
supervisor -> sender
    ``("batch", batch_id, line, token_ids)``    ``line`` is the wire format (bytes)
    ``("stop", timeout_s)``                     finish in flight within timeout, exit
sender -> supervisor
    ``("ready",)`` / ``("heartbeat",)``
    ``("outcomes", batch_id, outcomes)``        one ``(token_id, kind, message_id,
                                                error, retry_after)`` per token
supervisor -> collector
    ``("adopt", batch_ids)``                    batches in flight from a former collector
    ``("outcomes", batch_id, outcomes, claimed_at)``  record them in the ledger
    ``("release", batch_id, token_ids, claimed_at)``  never sent: back to the queue
    ``("drain",)``                              stop claiming (shutdown has begun)
    ``("stop",)``                               record what is pending, exit 0

A plain tuple protocol keeps the supervisor free of psycopg and boto3: it routes
messages without understanding the wire format. ``claimed_at`` (the claim's
timestamp) travels with a batch so that a late outcome only changes the claim it
belongs to, never a later claim of the same rows.
"""

READY = "ready"
HEARTBEAT = "heartbeat"
BATCH = "batch"
OUTCOMES = "outcomes"
ADOPT = "adopt"
RELEASE = "release"
DRAIN = "drain"
STOP = "stop"

#: Seconds between heartbeats; a worker silent for HEARTBEAT_TIMEOUT is killed.
HEARTBEAT_INTERVAL = 1.0
