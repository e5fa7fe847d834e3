"""SES templates as files: push, pull, diff and a render check (design notes, section 12).

A directory (``MAILROOM_TEMPLATES_DIR``, default ``./templates``) holds one folder
per template name with ``subject.txt``, ``html.html`` and ``text.txt``;
:mod:`~mailroom.templates.files` reads and writes them, :mod:`~mailroom.templates.remote`
talks to SES with the sender's endpoint and credentials, and
:mod:`~mailroom.templates.commands` is ``mailroom templates push|pull|diff|check``.
The render check itself is the sender's (:mod:`mailroom.sender.render`), so the
command and the running sender ask SES the same question with the same data.
This package never imports the ledger.
"""
