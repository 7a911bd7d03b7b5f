"""``python -m bluesky_ptychonn.cli``: the same as the ``bluesky-ptychonn`` command."""

import sys

from . import main

sys.exit(main())
