"""The live engine in memory (no documents, no Tiled) with the shipped model at a given forward batch.

``bench_engine``'s loop: 4,096 frames (a 32x32 simulated scan, four times) submitted in
micro-batches of 64; model-only and engine in turns, three rounds. argv: the forward batch.

    python in_memory.py 16; python in_memory.py 64
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import numpy as np
from bench_engine import (
    DetectorGeometry, LiveOptions, LiveReconstruction, ObjectGrid, Predictor, base_model_path, preprocess, simulate_scan,
)

geometry = DetectorGeometry(frame_pixels=64)
scan = simulate_scan(geometry=geometry, scan_shape=(32, 32))
predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", batch_size=int(sys.argv[1]))
frames, positions = np.concatenate([scan.frames] * 4), np.concatenate([scan.positions_m] * 4)
grid = ObjectGrid.covering(scan.positions_m, predictor.info.recipe.pixel_size_m(geometry), predictor.patch_pixels)
x = preprocess(frames[:64], predictor.info.recipe)
predictor.predict_preprocessed(x)
options = LiveOptions(batch_size=64, max_wait_s=0.05, max_queued_frames=len(frames))
for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(len(frames) // 64):
        predictor.predict_preprocessed(x)
    model = len(frames) / (time.perf_counter() - t0)
    live = LiveReconstruction(predictor, grid, None, {"raw_uid": "ab"}, options, probe=scan.probe)
    t0 = time.perf_counter()
    for s in range(0, len(frames), 64):
        live.submit(np.arange(s, s + 64), frames[s : s + 64], positions[s : s + 64])
    live.finish()
    live.wait()
    rate = len(frames) / (time.perf_counter() - t0)
    per_frame = {k: round(v / len(frames) * 1e6, 1) for k, v in live.timings.items() if k != "publish_s"}
    print(f"forward batch {predictor.batch_size}: model {model:.0f} engine {rate:.0f} frames/s, us/frame {per_frame}")
