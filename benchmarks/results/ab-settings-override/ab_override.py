"""A/B: the embedded server with tiled's settings override (FastAPI rebuilds dependencies per request) and without.

Alternates modes (argv: e.g. none,override,override,none); each trial: an unpaced 100x100 scan
(end-to-end frames/s) and a paced 60x60 scan at 180 frames/s (latency; run1 was a 70x70 scan at
300 frames/s, faster than this slow VM kept up with), small network, batch 64, as bench_live does.
"""
import sys, tempfile, time, json
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
import numpy as np, torch
from tiled.server.settings import get_settings
from bench_live import _scan, _latency_figures
from bluesky_ptychonn.archive.servers import start_embedded_server
from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN

torch.manual_seed(0)
net = NetworkConfig.preset("small")
predictor = Predictor(PtychoNN(net).eval(), CheckpointInfo(net, PreprocessRecipe(scale=0.01), content_hash="small"), device="cpu")
options = LiveOptions(batch_size=64, publish_interval_s=0.5)
order = sys.argv[1].split(",")
with tempfile.TemporaryDirectory() as tmp:
    archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
    ov = archive.server.app.dependency_overrides
    try:
        for mode in order:
            ov.clear()
            if mode == "override":
                ov[get_settings] = get_settings
            live, _, _ = _scan(archive.client, archive.data_dir, predictor, options, 100)
            frames = live.metadata["frames_done"]
            e2e = frames / (live.publish_log[-1][0] - live.metadata["first_frame"])
            paced = _latency_figures(_scan(archive.client, archive.data_dir, predictor, options, 60, 1 / 180)[0])
            print(json.dumps({"mode": mode, "e2e": round(e2e, 1), **paced}), flush=True)
    finally:
        ov.setdefault(get_settings, get_settings)
        archive.close()
