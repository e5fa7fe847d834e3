"""The sender: batches of decoded rows in, one outcome per token out.

:class:`~mailroom.sender.engine.Sender` is the engine (split, call, classify, retry,
pause); :mod:`~mailroom.sender.ses` the SES client, requests and answers;
:mod:`~mailroom.sender.pacing` the rate limit and retry schedule;
:func:`~mailroom.sender.stdin.run_stdin` the compatibility mode.
"""

from mailroom.sender.calls import SendPolicy
from mailroom.sender.engine import Sender
from mailroom.vocabulary import Outcome

__all__ = ["Outcome", "SendPolicy", "Sender"]
