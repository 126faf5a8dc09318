"""``python -m launcher …``: the recgpt CLI without an install (what a Ray job's working dir runs)."""

import sys

from launcher.cli import main

sys.exit(main())
