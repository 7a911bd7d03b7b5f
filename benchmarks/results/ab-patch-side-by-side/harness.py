"""Latency of one paced live scan, split by stage: a publish's patches side by side or one after another.

    python harness.py [--patches auto|side-by-side|one-after-another] [--apart] [--fps 150] [--tiledwriter-batch 1]

A real RunEngine flies the simulated detector (40x40, 64x64 frames, paced, a flush every 0.1 s)
with TiledWriter and the callback (small network, micro-batches of 64, a publish every 0.5 s)
into the embedded Tiled server in this process, or with ``--apart`` into ``tiled serve catalog``
in its own process. ``--patches``: ``auto`` is the shipped choice (side by side unless the server
runs in this process); before 821a0cb they went one after another. Prints one JSON line: the latency median and its parts, medians over the submissions:
frame reaching the callback -> stitched, stitched -> start of the publish that carries it, that publish.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for machine.py
from machine import describe, device_name, free_port  # noqa: E402

import bluesky_ptychonn.live.sink as sink  # noqa: E402
from bluesky_ptychonn.core.engine import LiveReconstruction  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patches", choices=("auto", "side-by-side", "one-after-another"), default="auto")
    parser.add_argument("--apart", action="store_true", help="tiled serve in its own process")
    parser.add_argument("--fps", type=float, default=150.0)
    parser.add_argument("--tiledwriter-batch", type=int, default=1)
    parser.add_argument("--max-wait", type=float, default=0.2, help="LiveOptions.max_wait_s")
    parser.add_argument("--switch-interval", type=float, default=0.005, help="sys.setswitchinterval (GIL)")
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval)
    if args.patches != "auto":
        made = sink.TiledSink.__init__

        def forced(self, *a, **k):
            made(self, *a, **k)
            self.side_by_side = args.patches == "side-by-side"

        sink.TiledSink.__init__ = forced

    stitched: list[tuple[float, int]] = []
    publishes: list[tuple[float, float]] = []
    reconstruct, publish = LiveReconstruction._reconstruct, LiveReconstruction._publish

    def timed_reconstruct(self, *a, **k):
        reconstruct(self, *a, **k)
        stitched.append((time.time(), self.stitcher.frames))

    def timed_publish(self):
        t0 = time.time()
        ok = publish(self)
        publishes.append((t0, time.time()))
        return ok

    LiveReconstruction._reconstruct, LiveReconstruction._publish = timed_reconstruct, timed_publish

    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.servers import FacilityServer, connect, start_embedded_server, subscribe_archive
    from bluesky_ptychonn.core.checkpoint import CheckpointInfo
    from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
    from bluesky_ptychonn.core.engine import LiveOptions
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.network import PtychoNN
    from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback

    with tempfile.TemporaryDirectory() as tmp:
        archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
        facility = FacilityServer(Path(tmp) / "apart", secrets.token_hex(16), readable=[archive.data_dir])
        facility.port, facility.log = free_port(), Path(tmp) / "tiled.log"
        try:
            client = archive.client
            if args.apart:
                facility.start()
                client, _ = connect(facility.uri, api_key=facility.api_key)
            torch.manual_seed(0)
            net = NetworkConfig.preset("small")
            info = CheckpointInfo(net, PreprocessRecipe(scale=0.01), content_hash="small")
            predictor = Predictor(PtychoNN(net).eval(), info, device="cpu")
            run_engine = RunEngine({})
            subscribe_archive(run_engine, client, batch_size=args.tiledwriter_batch)
            options = LiveOptions(batch_size=64, publish_interval_s=0.5, max_wait_s=args.max_wait)
            callback = PtychoNNCallback(predictor, client, CallbackConfig(data_roots=[archive.data_dir], live=options))
            run_engine.subscribe(callback)
            stage = SimStage(name="stage")
            detector = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample="sim-features-0")
            detector.settings = detector.settings.updated(paced=True, chunk_frames=8)
            plan = ptycho_fly_scan(
                detector, stage, step_m=6e-7, shape=(40, 40), exposure_s=1 / args.fps, flush_period_s=0.1
            )
            (uid,) = run_engine(plan)
            callback.wait(uid, 1800)
            live = callback.runs[uid].live
        finally:
            facility.stop()
            archive.close()

    parts = []
    for t_submit, count in live.submit_log:
        t_stitched = next((t for t, done in stitched if done >= count), None)
        t_end = next((t for t, done in live.publish_log if done >= count), None)
        t_start = next((s for s, e in publishes if t_end is not None and abs(e - t_end) < 0.01), None)
        if None not in (t_stitched, t_end, t_start):
            parts.append((t_end - t_submit, t_stitched - t_submit, t_start - t_stitched, t_end - t_start))
    p = np.median(np.asarray(parts), axis=0)
    print(
        json.dumps(
            {
                "device": device_name(describe("cpu")),
                "patches": args.patches,
                "side_by_side": live.sink.side_by_side,
                "tiled": "own process" if args.apart else "embedded, in process",
                "fps": args.fps,
                "tiledwriter_batch": args.tiledwriter_batch,
                "max_wait_s": args.max_wait,
                "switch_interval_s": args.switch_interval,
                "latency_median_s": round(float(p[0]), 3),
                "to_stitched_s": round(float(p[1]), 3),
                "stitched_to_publish_s": round(float(p[2]), 3),
                "publish_s": round(float(p[3]), 3),
                "publish_mean_s": round(float(np.mean([e - s for s, e in publishes])), 3),
                "inference_frames_per_s": round(live.metadata["frames_done"] / live.timings["inference_s"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
