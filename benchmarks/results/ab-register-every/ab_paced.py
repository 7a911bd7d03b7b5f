"""A/B of paced in-process scans: frames registered with Tiled at every flush, or merged over a second.

Each mode is a ``register_every_s`` of ``subscribe_archive`` (0: TiledWriter gets every
StreamDatum); modes alternate in one process and one embedded Tiled server. Each trial: a 60x60
scan paced at RATE frames/s (argv 2, default 180, a flush every 0.1 s) with TiledWriter and the
callback subscribed, small network, micro-batches of 64, as ``bench_live`` does.

    python ab_paced.py 0,1,1,0,0,1 180
"""
import functools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import torch
from bench_live import _latency_figures, _scan

from bluesky_ptychonn.archive import servers
from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN

torch.manual_seed(0)
net = NetworkConfig.preset("small")
predictor = Predictor(PtychoNN(net).eval(), CheckpointInfo(net, PreprocessRecipe(scale=0.01), content_hash="small"), device="cpu")
rate = float(sys.argv[2]) if len(sys.argv) > 2 else 180
subscribe = servers.subscribe_archive
with tempfile.TemporaryDirectory() as tmp:
    archive = servers.start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
    try:
        for mode in sys.argv[1].split(","):
            servers.subscribe_archive = functools.partial(subscribe, register_every_s=float(mode))
            live = _scan(archive.client, archive.data_dir, predictor, LiveOptions(batch_size=64, publish_interval_s=0.5), 60, 1 / rate)[0]
            print(json.dumps({
                "register_every_s": float(mode), "rate": rate, **_latency_figures(live), "publishes": len(live.publish_log),
                "inference_us_per_frame": round(live.timings["inference_s"] / live.metadata["frames_done"] * 1e6),
            }), flush=True)
    finally:
        archive.close()
