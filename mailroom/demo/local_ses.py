"""A local SES endpoint for the demo: moto's server mode on 127.0.0.1, spoken to over real HTTP.

The sender reaches it through ``MAILROOM_SES_ENDPOINT_URL`` exactly as it would reach AWS, and
so does ``mailroom templates push``, which puts the shipped templates there at start: through
:class:`mailroom.demo.ses_events.EventRelay`, which publishes SES events for what moto accepted
(moto does not).  The same moto serves SNS and SQS (:attr:`LocalSes.aws_url`), which ``mailroom
ses setup-events`` wires and the events worker reads.  moto keeps everything in memory, in this
process (the server is a thread here).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AWS_ENV", "SOURCE", "LocalSes"]

#: The verified sender address of the demo.
SOURCE = "noreply@mailroom.demo"
#: Dummy credentials: moto accepts any, boto3 insists on having some.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "demo",
    "AWS_SECRET_ACCESS_KEY": "demo",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_REGION = AWS_ENV["AWS_DEFAULT_REGION"]


class LocalSes:
    """moto's SES on 127.0.0.1 (a free port), with :data:`SOURCE` verified.

    No templates: the demo pushes the shipped ones with ``mailroom templates push``,
    as an operator would (see :mod:`mailroom.demo.app`)."""

    def __init__(self) -> None:
        self._server: Any = None
        self.relay: Any = None
        self.url = ""        # SES as the sender reaches it (the relay)
        self.aws_url = ""    # moto itself: SES, SNS, SQS

    def start(self) -> str:
        """Start the server, set it up, and return its URL (``http://127.0.0.1:PORT``)."""
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise RuntimeError("moto's server mode is not installed: pip install 'mailroom[demo]'") from exc
        # Port 0: the kernel picks a free port, so no race with another program.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.aws_url = f"http://{host}:{port}"
        client = self._client()
        client.verify_email_identity(EmailAddress=SOURCE)
        from mailroom.demo.ses_events import EventRelay

        self.relay = EventRelay(self.aws_url, (client, self._client("sns")))
        self.url = self.relay.start()
        return self.url

    def _client(self, service: str = "ses") -> Any:
        import boto3

        session = boto3.session.Session(aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                                        region_name=_REGION)
        return session.client(service, endpoint_url=self.aws_url)

    def accepted(self) -> int:
        """Emails the endpoint accepted in the last 24 hours (its GetSendQuota, over HTTP)."""
        return int(self._client().get_send_quota()["SentLast24Hours"])

    def stop(self) -> None:
        """Stop the server thread (idempotent)."""
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        if self._server is not None:
            self._server.stop()
            self._server = None
