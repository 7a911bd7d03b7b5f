"""Importing the package stays cheap, and the core never imports the Bluesky/Tiled edge (at run time;
the import-linter contracts of ``tests/test_layers.py`` check the static imports)."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

#: Every module of the layers that must not load the Bluesky/Tiled stack, even at run time.
PACKAGE = Path(__file__).resolve().parents[1] / "bluesky_ptychonn"
CORE = [
    f"bluesky_ptychonn.{layer}.{module.name}"
    for layer in ("core", "sim", "files")
    for module in pkgutil.iter_modules([str(PACKAGE / layer)])
] + ["bluesky_ptychonn.schema", "bluesky_ptychonn.tiled_paths"]


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
