"""``python -m bluesky_ptychonn``: the command line (what ``torchrun -m bluesky_ptychonn ...`` starts)."""

import sys

from .cli import main

sys.exit(main())
