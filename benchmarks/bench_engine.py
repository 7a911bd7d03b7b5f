"""The live engine without documents or Tiled: frames submitted in memory -> preprocessing, inference, trust, stitching.

End-to-end through the RunEngine and Tiled is ``bench_live``; this isolates the analysis's own
overhead: frames per second of :class:`~bluesky_ptychonn.core.engine.LiveReconstruction` (the
shipped base model, trust map on, no sink) against the same Predictor's model-only rate at the same
batch size, and the seconds per frame each stage took (in the last round). Runs on every device present.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from bluesky_ptychonn.core.base_model import base_model_path
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.engine import LiveOptions, LiveReconstruction
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.preprocess import preprocess
from bluesky_ptychonn.sim.physics import simulate_scan

from machine import describe, device_name


def devices() -> list[str]:
    """The devices to measure: ``$BENCH_DEVICES`` (comma-separated), else the CPU and CUDA when present."""
    named = os.environ.get("BENCH_DEVICES")
    if named:
        return named.split(",")
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _engine(name: str, scan, geometry: DetectorGeometry, compiled: bool, quick: bool, pipeline: str = "auto") -> dict:
    """One device's engine row (eager, or with the network compiled)."""
    machine = describe(name)
    batch = 64 if name == "cpu" else 1024
    predictor = Predictor.from_checkpoint(base_model_path(), device=name, batch_size=batch, compile=compiled)
    repeats = 1 if (quick or name == "cpu") else 20  # frames: 1,024 per repeat
    frames = np.concatenate([scan.frames] * repeats)
    positions = np.concatenate([scan.positions_m] * repeats)
    pixel_size_m = predictor.info.recipe.pixel_size_m(geometry)
    grid = ObjectGrid.covering(scan.positions_m, pixel_size_m, predictor.patch_pixels)
    x = preprocess(frames[:batch], predictor.info.recipe)
    predictor.predict_preprocessed(x)  # warm-up (and compilation)
    options = LiveOptions(batch_size=batch, max_wait_s=0.05, max_queued_frames=len(frames), pipeline=pipeline)
    # Model-only and engine in turns, best of each: the ratio's two rates are measured seconds apart,
    # not a minute apart, on machines (a shared VM) whose speed drifts.
    model_only = engine = 0.0
    rounds = 1 if quick else 3
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(max(1, len(frames) // batch)):
            predictor.predict_preprocessed(x)
        model_only = max(model_only, max(1, len(frames) // batch) * batch / (time.perf_counter() - t0))
        live = LiveReconstruction(predictor, grid, None, {"raw_uid": "bench"}, options, probe=scan.probe)
        t0 = time.perf_counter()
        for s in range(0, len(frames), batch):
            live.submit(np.arange(s, s + batch), frames[s : s + batch], positions[s : s + batch])
        live.finish()
        live.wait()
        engine = max(engine, len(frames) / (time.perf_counter() - t0))
    per_frame = {k: round(v / len(frames) * 1e6, 1) for k, v in live.timings.items() if k != "publish_s"}
    row = {
        "device": device_name(machine),
        "precision": predictor.precision + (" compiled" if predictor.compiled else ""),
        "pipeline": "host (numpy)" if pipeline == "host" else "device (torch)",
        "batch": batch,
        "frames": len(frames),
        "rounds": rounds,
        "engine_frames_per_s": round(engine, 1),
        "model_only_frames_per_s": round(model_only, 1),
        "ratio": round(engine / model_only, 3),
        **{f"{k.removesuffix('_s')}_us_per_frame": v for k, v in per_frame.items()},
    }
    print(
        f"   {name}{' compiled' if compiled else ''}, {row['pipeline']} pipeline: engine {engine:.0f} frames/s "
        f"vs model only {model_only:.0f} "
        f"frames/s (ratio {row['ratio']:.2f}); per frame (us): {per_frame}"
    )
    return row


def run(quick: bool = False) -> dict:
    geometry = DetectorGeometry(frame_pixels=64)
    scan = simulate_scan(geometry=geometry, scan_shape=(32, 32))
    results = []
    for name in devices():
        for compiled in (False, True):
            results.append(_engine(name, scan, geometry, compiled, quick))
        if name == "cpu":  # the numpy path beside the default torch one, on the same frames
            results.append(_engine(name, scan, geometry, False, quick, pipeline="host"))
    return {"benchmark": "live engine in memory", "machine": describe(devices()[-1]), "results": results}
