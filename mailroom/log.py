"""Logging set-up shared by every process: one line per event on stderr.

Lines look like the original's: ``2024/04/20 13:37:00 [PG] connected``, where the
tag says which process wrote it (``PG`` collector, ``SES`` sender, ``SUP`` supervisor).
"""

from __future__ import annotations

import logging
import sys

DATE_FORMAT = "%Y/%m/%d %H:%M:%S"


def setup(tag: str, level: str = "INFO") -> None:
    """Send all logging to stderr with the ``[tag]`` prefix, replacing earlier handlers.

    Called again in a forked worker to switch the tag (the supervisor's handler is
    inherited through fork).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{tag}] %(message)s", DATE_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # botocore and psycopg are chatty at INFO/DEBUG; their warnings still show.
    for noisy in ("botocore", "boto3", "urllib3", "psycopg"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
