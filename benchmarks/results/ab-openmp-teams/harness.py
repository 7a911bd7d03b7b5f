"""Ad-hoc A/B harness: in-process live scans of the small network (RunEngine, TiledWriter, embedded Tiled).

    PYTHONPATH=<checkout> python harness.py <checkout> unpaced  # three 1,600-frame scans: frames/s each
    PYTHONPATH=<checkout> python harness.py <checkout> paced    # one unpaced, then one paced at 108 frames/s

The unpaced mode gave the in-process table of README.md, the paced mode the idle-release table.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1] + "/benchmarks")
import numpy as np
import torch
from bench_live import _latencies
from bluesky import RunEngine

from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_archive
from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN
from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback

torch.manual_seed(0)
net = NetworkConfig.preset("small")
predictor = Predictor(
    PtychoNN(net).eval(), CheckpointInfo(net, PreprocessRecipe(scale=0.01), content_hash="s"), device="cpu"
)
with tempfile.TemporaryDirectory() as tmp:
    archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
    RE = RunEngine({})
    subscribe_archive(RE, archive.client)
    cb = PtychoNNCallback(
        predictor,
        archive.client,
        CallbackConfig(data_roots=[archive.data_dir], live=LiveOptions(batch_size=64, publish_interval_s=0.5)),
    )
    RE.subscribe(cb)
    stage = SimStage(name="stage")
    det = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample="sim-features-0")
    for _ in range(3 if sys.argv[2] == "unpaced" else 1):
        (uid,) = RE(ptycho_fly_scan(det, stage, step_m=6e-7, shape=(40, 40)))
        cb.wait(uid, 600)
        live = cb.runs[uid].live
        e2e = live.metadata["frames_done"] / (time.time() - live.metadata["first_frame"])
        print("e2e", round(e2e, 1), "threads now", len(os.listdir("/proc/self/task")), flush=True)
    if sys.argv[2] == "paced":
        det.settings = det.settings.updated(paced=True, chunk_frames=8)
        (uid,) = RE(ptycho_fly_scan(det, stage, step_m=6e-7, shape=(40, 40), exposure_s=1 / 108, flush_period_s=0.1))
        cb.wait(uid, 600)
        paced = cb.runs[uid].live
        lat = _latencies(paced)
        publish = paced.timings["publish_s"] / max(1, len(paced.publish_log))
        print(f"latency median {np.median(lat):.2f} p95 {np.percentile(lat, 95):.2f} publish {publish:.2f}", flush=True)
    archive.close()
