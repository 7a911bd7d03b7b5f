"""Ad-hoc A/B harness: three 1,600-frame in-process live scans (small network), end-to-end frames/s each.

Run from a checkout: PYTHONPATH=<checkout> python inprocess_live.py
"""

import os
import tempfile
import time
from pathlib import Path

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
    for _ in range(3):
        (uid,) = RE(ptycho_fly_scan(det, stage, step_m=6e-7, shape=(40, 40)))
        cb.wait(uid, 600)
        live = cb.runs[uid].live
        print(
            "e2e",
            round(live.metadata["frames_done"] / (time.time() - live.metadata["first_frame"]), 1),
            "threads now",
            len(os.listdir("/proc/self/task")),
        )
    archive.close()
