"""A/B of paced in-process scans: the predictor's forward batch and Python's thread switch interval.

Each mode is ``nice:switch:forward_batch`` (the inference thread's nice increment, the value given
to ``sys.setswitchinterval``, ``Predictor.batch_size``); modes alternate in one process and one
embedded Tiled server. Each trial: a 60x60 scan paced at RATE frames/s (argv 2, default 180) with
TiledWriter and the callback subscribed, micro-batches of 64, as ``bench_live`` does; printed: the
mean micro-batch, the latency figures, the publishes and the inference thread's seconds per frame.

    PRESET=paper python ab_paced.py 10:5e-3:16,10:5e-3:64,10:5e-3:64,10:5e-3:16 100
"""
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import torch
from bench_live import _latency_figures, _scan

from bluesky_ptychonn.archive.servers import start_embedded_server
from bluesky_ptychonn.core import engine
from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN

torch.manual_seed(0)
preset = os.environ.get("PRESET", "small")
net = NetworkConfig.preset(preset)
predictor = Predictor(PtychoNN(net).eval(), CheckpointInfo(net, PreprocessRecipe(scale=0.01), content_hash=preset), device="cpu")
rate = float(sys.argv[2]) if len(sys.argv) > 2 else 180
sizes: list[int] = []
reconstruct = engine.LiveReconstruction._reconstruct


def counted(self, ids, *args, **kwargs):
    sizes.append(len(ids))
    return reconstruct(self, ids, *args, **kwargs)


engine.LiveReconstruction._reconstruct = counted
with tempfile.TemporaryDirectory() as tmp:
    archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
    try:
        for mode in sys.argv[1].split(","):
            nice, switch, forward = mode.split(":")
            sys.setswitchinterval(float(switch))
            predictor.batch_size = int(forward)
            options = LiveOptions(batch_size=64, publish_interval_s=0.5, worker_nice=int(nice))
            sizes.clear()
            live = _scan(archive.client, archive.data_dir, predictor, options, 60, 1 / rate)[0]
            print(json.dumps({
                "preset": preset, "mode": mode, "rate": rate, "mean_batch": round(sum(sizes) / len(sizes), 1),
                **_latency_figures(live), "publishes": len(live.publish_log),
                "inference_us_per_frame": round(live.timings["inference_s"] / live.metadata["frames_done"] * 1e6),
            }), flush=True)
    finally:
        archive.close()
