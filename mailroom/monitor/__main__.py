"""``python -m mailroom.monitor``: what ``mailroom monitor --web`` runs per browser session."""

import sys

from mailroom.monitor import main

sys.exit(main())
