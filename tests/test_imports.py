"""Importing the package stays cheap, and the core never imports the Bluesky/Tiled edge."""

import json
import subprocess
import sys

CORE = [
    "bluesky_ptychonn.config",
    "bluesky_ptychonn.geometry",
    "bluesky_ptychonn.simulate",
    "bluesky_ptychonn.preprocess",
    "bluesky_ptychonn.stitching",
    "bluesky_ptychonn.metrics",
    "bluesky_ptychonn.checkpoint",
    "bluesky_ptychonn.network",
    "bluesky_ptychonn.inference",
    "bluesky_ptychonn.training",
    "bluesky_ptychonn.reconstruct",
    "bluesky_ptychonn.scanfile",
    "bluesky_ptychonn.datasets",
    "bluesky_ptychonn.sample",
    "bluesky_ptychonn.iterative",
    "bluesky_ptychonn.live",
    "bluesky_ptychonn.assets",
    "bluesky_ptychonn.sink",
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
