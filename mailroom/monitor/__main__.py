"""``python -m mailroom.monitor``: what ``mailroom monitor --web`` runs per browser session."""

import sys

from mailroom.monitor import bind_to_server, main

# Started by the --web server: end with it, never outlive it as an orphan (web.py).
bind_to_server()
sys.exit(main())
