"""IPython startup snippet for a beamline profile: live PtychoNN in the RunEngine's process.

Copy into ``~/.ipython/profile_<beamline>/startup/`` after the file that creates ``RE``.
Settings come from the same TOML file as the out-of-process consumer (``PTYCHONN_CONFIG``).
For production prefer the out-of-process consumer; in process, inference still runs on its own
thread and a failure is recorded, never raised into the scan.
"""

import os
from pathlib import Path

from bluesky_ptychonn.live.service import build_callback, load_config

_config = load_config(os.environ.get("PTYCHONN_CONFIG", Path(__file__).with_name("ptychonn.toml")))
ptychonn_callback = build_callback(_config)
ptychonn_token = RE.subscribe(ptychonn_callback)  # noqa: F821 (RE comes from the profile)
