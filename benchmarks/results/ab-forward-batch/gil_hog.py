"""The shipped model's forward rate on a thread, alone and beside a thread running pure Python.

Eager torch re-takes the interpreter lock after every op; a busy Python thread holds it for up
to the switch interval each time. Rates (frames/s, bf16 autocast, 4 s each) of the eager
module at batches of 16 and 64, then at 64 with the thread at nice +10 and with
``sys.setswitchinterval`` at 1 ms and 0.2 ms.

    python gil_hog.py
"""
import sys
import threading
import time

import numpy as np
import torch

from bluesky_ptychonn.core.base_model import base_model_path
from bluesky_ptychonn.core.host_runtime import lower_thread_priority, release_openmp_team
from bluesky_ptychonn.core.inference import Predictor

model = Predictor.from_checkpoint(base_model_path(), device="cpu", batch_size=64).model
x = torch.from_numpy(np.random.default_rng(0).random((64, 1, 64, 64), dtype=np.float32))
x = x.contiguous(memory_format=torch.channels_last)


def rate(nice: int = 0, batch: int = 64, seconds: float = 4.0) -> float:
    out = {}

    def run():
        lower_thread_priority(nice)
        n, t0 = 0, time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            while time.perf_counter() - t0 < seconds:
                model(x[:batch])
                n += batch
        out["rate"] = n / (time.perf_counter() - t0)

    release_openmp_team()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    release_openmp_team()
    return out["rate"]


def hog():
    while True:
        sum(range(1000))


print(f"alone: batch 16 {rate(batch=16):.0f}, batch 64 {rate():.0f} frames/s")
threading.Thread(target=hog, daemon=True).start()
print(f"beside a Python thread: batch 16 {rate(batch=16):.0f}, batch 64 {rate():.0f}")
for interval in (5e-3, 1e-3, 2e-4):
    sys.setswitchinterval(interval)
    print(f"beside a Python thread, switch interval {interval * 1e3:g} ms: {rate():.0f}, nice +10: {rate(10):.0f}")
