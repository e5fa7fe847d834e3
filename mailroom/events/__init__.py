"""The events worker (DESIGN.md 11): what SES says became of each email.

- :mod:`~mailroom.events.parse`: SES event JSON (SNS-wrapped or raw) ->
  :class:`mailroom.vocabulary.DeliveryEvent`, pure functions.
- :mod:`~mailroom.events.worker`: the loop the supervisor forks when
  ``MAILROOM_SES_EVENTS_QUEUE_URL`` is set: long-poll SQS, record a batch in one
  ledger transaction (:func:`mailroom.ledger.events.record_events`), then delete.
- :mod:`~mailroom.events.setup`: ``mailroom ses setup-events``, the configuration set,
  SNS topic, SQS queues, policy and subscription the worker reads from.
"""
