"""A/B: result arrays stored as one chunk vs in tiles, on a paced in-process scan (embedded Tiled)."""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
import numpy as np, torch
import bench_live
import bluesky_ptychonn.live.sink as sink
from bluesky_ptychonn.archive.servers import start_embedded_server
from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN

tiles = sink._tiles
rate = float(sys.argv[1]); rows = int(sys.argv[2]); pairs = int(sys.argv[3])
torch.manual_seed(0)
net = NetworkConfig.preset("small")
predictor = Predictor(PtychoNN(net).eval(), CheckpointInfo(net, PreprocessRecipe(scale=0.01), content_hash="s"), device="cpu")
options = LiveOptions(batch_size=64, publish_interval_s=0.5)
with tempfile.TemporaryDirectory() as tmp:
    archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
    try:
        bench_live._scan(archive.client, archive.data_dir, predictor, options, 12, 1 / rate)  # warm-up
        for p in range(pairs):
            for tiled in ((False, True) if p % 2 == 0 else (True, False)):
                sink._tiles = tiles if tiled else (lambda n: (n,))
                c0 = time.process_time(); w0 = time.time()
                live, det, _ = bench_live._scan(archive.client, archive.data_dir, predictor, options, rows, 1 / rate)
                cpu = (time.process_time() - c0) / (time.time() - w0)
                lat = bench_live._latencies(live)
                print(json.dumps({"tiles": tiled, "grid": list(live.stitcher.grid.shape), "median": round(float(np.median(lat)), 3),
                      "p95": round(float(np.percentile(lat, 95)), 3), "trial": bench_live._keeps_up(live, rate),
                      "cores": round(cpu, 2), "inference_fps_in_thread": round(live.stitcher.frames / live.timings["inference_s"]),
                      "publishes": len(live.publish_log),
                      "publish_mean": round(live.timings["publish_s"] / max(1, len(live.publish_log)), 3)}), flush=True)
    finally:
        archive.close()
