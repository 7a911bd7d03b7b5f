"""Does ``torch.compile`` pay on a GPU? The forward pass alone, eager against compiled, per network.

bf16 autocast, channels-last, 1,024 frames already on the device; the compiled graph's outputs
are compared with eager ones, and its compile time is reported beside the speed-up. GPU only:
on the CPU, ``bench_inference`` and ``bench_engine`` measure the shipped frozen graph
(``Predictor(compile=True)``) beside eager.
"""

from __future__ import annotations

import time

import torch
from bench_engine import devices

from bluesky_ptychonn.core.config import NetworkConfig
from bluesky_ptychonn.core.network import PtychoNN, flops_per_frame

from machine import describe, device_name

BATCH = 1024


def _rate(model, x: torch.Tensor, seconds: float) -> float:
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(x)
            runs += 1
        torch.cuda.synchronize()
    return BATCH * runs / (time.perf_counter() - started)


def run(quick: bool = False) -> dict:
    results = []
    for name in devices():
        if not name.startswith("cuda"):
            continue
        machine = describe(name)
        for preset in ("paper", "small"):
            config = NetworkConfig.preset(preset)
            model = PtychoNN(config).to(name).eval().to(memory_format=torch.channels_last)
            x = torch.rand(BATCH, 1, config.input_pixels, config.input_pixels, device=name)
            x = x.contiguous(memory_format=torch.channels_last)
            eager = _rate(model, x, 1.0)
            t0 = time.perf_counter()
            compiled = torch.compile(model)
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
                out, ref = compiled(x), model(x)
            compile_s = time.perf_counter() - t0
            fast = _rate(compiled, x, 1.0)
            row = {
                "device": device_name(machine),
                "network": preset,
                "batch": BATCH,
                "eager_frames_per_s": round(eager, 1),
                "compiled_frames_per_s": round(fast, 1),
                "speedup": round(fast / eager, 3),
                "compile_s": round(compile_s, 1),
                "compiled_gflop_per_s": round(fast * flops_per_frame(config) / 1e9, 1),
                "max_phase_difference": round(float((out[1].float() - ref[1].float()).abs().max()), 5),
            }
            results.append(row)
            print(f"   {preset}: eager {eager:.0f}, compiled {fast:.0f} frames/s ({row['speedup']}x), {row}")
    return {
        "benchmark": "torch.compile, forward only",
        "machine": describe(devices()[-1]),
        "results": results,
        "note": "bf16 autocast, channels-last, frames on the device" if results else "GPU only: no CUDA device here",
    }
