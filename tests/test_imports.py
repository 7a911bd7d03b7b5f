"""Importing the package stays cheap, and the core never imports the Bluesky/Tiled edge."""

import json
import subprocess
import sys

CORE = [
    "bluesky_ptychonn.core.config",
    "bluesky_ptychonn.core.geometry",
    "bluesky_ptychonn.sim.physics",
    "bluesky_ptychonn.core.preprocess",
    "bluesky_ptychonn.core.stitching",
    "bluesky_ptychonn.core.metrics",
    "bluesky_ptychonn.core.checkpoint",
    "bluesky_ptychonn.core.network",
    "bluesky_ptychonn.core.inference",
    "bluesky_ptychonn.core.training",
    "bluesky_ptychonn.core.reconstruct",
    "bluesky_ptychonn.files.scanfile",
    "bluesky_ptychonn.files.datasets",
    "bluesky_ptychonn.sim.sample",
    "bluesky_ptychonn.core.iterative",
    "bluesky_ptychonn.core.engine",
    "bluesky_ptychonn.files.readers",
    "bluesky_ptychonn.live.sink",
]


def _modules_after(imports):
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in imports) + "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_package_import_does_not_import_torch():
    loaded = _modules_after(["bluesky_ptychonn"])
    assert not {"torch", "bluesky", "tiled", "event_model", "h5py"} & loaded


def test_core_never_imports_bluesky_event_model_or_tiled():
    loaded = {m.split(".")[0] for m in _modules_after(CORE)}
    assert not {"bluesky", "event_model", "tiled", "ophyd", "databroker"} & loaded
