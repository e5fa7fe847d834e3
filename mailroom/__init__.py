"""mailroom: user-lifecycle email sent straight from PostgreSQL through AWS SES.

Public pieces for applications: :mod:`mailroom.tokens` (verify a signed token from a
link). The rest (collector, sender, supervisor) runs as console scripts.
"""

__version__ = "0.1.0"
