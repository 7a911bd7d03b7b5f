"""A live scan while the run before it is refined with pty-chi, at nice 0 or lowered.

    python harness.py [--refine-nice 19] [--no-refine] [--fps 350]

In one process, as the consumer runs them: the embedded Tiled server, a real RunEngine with
TiledWriter and the callback (small network, micro-batches of 64, a publish every 0.5 s), and a
:class:`RefineWorker` as the callback's ``after_final`` hook (the consumer's ``[refine]``
defaults). Scan A (24x24, unpaced) ends and its refinement starts; scan B (40x40, paced at
``--fps``, a flush every 0.1 s) then runs beside it. ``--refine-nice`` is added to the nice value
of the refinement: the worker's ``nice`` where the worker refines in a child process, else that
of the worker's thread as it starts (monkeypatched: the commits before refined on that thread;
run them with ``PYTHONPATH`` pointing at their tree). Prints one JSON line: scan B's latency
median and p95, its mean publish, its inference rate, and A's refinement time and epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for machine.py
from machine import describe, device_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refine-nice", type=int, default=0)
    parser.add_argument("--no-refine", action="store_true", help="scan B alone, no refinement beside it")
    parser.add_argument("--fps", type=float, default=350.0)
    args = parser.parse_args()

    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive import refine_worker
    from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_archive
    from bluesky_ptychonn.core.checkpoint import CheckpointInfo
    from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
    from bluesky_ptychonn.core.engine import LiveOptions
    from bluesky_ptychonn.core.host_runtime import lower_thread_priority
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.network import PtychoNN
    from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback
    from bluesky_ptychonn.live.settings import RefineSection

    in_child = hasattr(refine_worker, "REFINE_NICE")
    worker_options = {"nice": args.refine_nice} if in_child else {}
    if not in_child:
        work = refine_worker.RefineWorker._work

        def niced(self):
            lower_thread_priority(args.refine_nice)  # a no-op at 0
            work(self)

        refine_worker.RefineWorker._work = niced

    with tempfile.TemporaryDirectory() as tmp:
        archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
        worker = None
        try:
            torch.manual_seed(0)
            net = NetworkConfig.preset("small")
            info = CheckpointInfo(net, PreprocessRecipe(scale=0.01), content_hash="small")
            predictor = Predictor(PtychoNN(net).eval(), info, device="cpu")
            worker = refine_worker.RefineWorker(archive.client, options=RefineSection().options(), **worker_options)
            run_engine = RunEngine({})
            subscribe_archive(run_engine, archive.client)
            options = LiveOptions(batch_size=64, publish_interval_s=0.5)
            config = CallbackConfig(data_roots=[archive.data_dir], live=options)
            hook = None if args.no_refine else worker.submit
            callback = PtychoNNCallback(predictor, archive.client, config, after_final=hook)
            run_engine.subscribe(callback)
            stage = SimStage(name="stage")
            detector = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample="sim-features-0")
            (uid_a,) = run_engine(ptycho_fly_scan(detector, stage, step_m=6e-7, shape=(24, 24)))
            callback.wait(uid_a, 600)
            a_final = time.time()
            detector.settings = detector.settings.updated(paced=True, chunk_frames=8)
            plan = ptycho_fly_scan(
                detector, stage, step_m=6e-7, shape=(40, 40), exposure_s=1 / args.fps, flush_period_s=0.1
            )
            (uid_b,) = run_engine(plan)
            callback.wait(uid_b, 1800)
            b_end = time.time()
            live = callback.runs[uid_b].live
            worker.wait(1800)
            refined = worker.results.get(uid_a, {})
            refine_s = time.time() - a_final
        finally:
            if worker is not None:
                worker.close(600)
            archive.close()

    lat = []
    for t_submit, count in live.submit_log:
        t_pub = next((t for t, done in live.publish_log if done >= count), None)
        if t_pub is not None:
            lat.append(t_pub - t_submit)
    print(
        json.dumps(
            {
                "device": device_name(describe("cpu")),
                "refine": not args.no_refine,
                "refine_in": "process" if in_child else "thread",
                "refine_nice": args.refine_nice,
                "fps": args.fps,
                "latency_median_s": round(float(np.median(lat)), 3),
                "latency_p95_s": round(float(np.percentile(lat, 95)), 3),
                "publish_mean_s": round(live.timings["publish_s"] / max(1, len(live.publish_log)), 3),
                "inference_frames_per_s": round(live.metadata["frames_done"] / live.timings["inference_s"], 1),
                "scan_b_s": round(b_end - a_final, 2),
                "refine_status": refined.get("status"),
                "refine_epochs": refined.get("epochs"),
                "a_final_to_refined_s": None if args.no_refine else round(refine_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
