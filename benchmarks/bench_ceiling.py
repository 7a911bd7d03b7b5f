"""The hardware's own ceiling: dense matmul and convolution FLOP/s in float32 and bfloat16.

Every model figure of ``bench_inference`` is also given as a fraction of these, measured in the
same run on the same device, so "fast" means "close to what this machine can do", not a number
without a scale. The convolution is the kind the networks are made of (3x3, 64 channels on 64x64
maps, batch 64, channels-last as the predictor runs it); the ceiling of a precision is the larger
of the matmul and convolution rates.
"""

from __future__ import annotations

import time

import torch

from machine import describe, device_name

#: The (batch, channels, size) of the convolution probe: the widest layers of the paper network.
CONV = (64, 64, 64)


def _rate(step, flops: float, seconds: float, device: torch.device) -> float:
    """FLOP/s of ``step()`` run repeatedly for about ``seconds`` (after a warm-up)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return runs * flops / (time.perf_counter() - started)


def ceilings(device: torch.device, seconds: float) -> dict[str, float]:
    """GFLOP/s of matmul and conv, fp32 and bf16, on ``device``, and the larger of the two per precision."""
    from bluesky_ptychonn.core.inference import resolve_precision

    native_bf16 = resolve_precision("auto", device) == "bfloat16"
    batch, channels, pixels = CONV
    batch *= 16 if device.type == "cuda" else 1
    out = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        # Emulated bf16 runs at a fraction of a GFLOP/s: a smaller product measures it in seconds, not minutes.
        size = 8192 if device.type == "cuda" else (2048 if dtype is torch.float32 or native_bf16 else 512)
        a = torch.rand(size, size, device=device, dtype=dtype)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
        x = torch.rand(batch, channels, pixels, pixels, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            matmul = _rate(lambda a=a: a @ a, 2 * size**3, seconds, device) / 1e9
            flops = 2 * batch * channels * channels * 9 * pixels * pixels
            convolution = _rate(lambda conv=conv, x=x: conv(x), flops, seconds, device) / 1e9
        out |= {f"matmul_{tag}": matmul, f"conv_{tag}": convolution, f"ceiling_{tag}": max(matmul, convolution)}
    return {f"{k}_gflop_per_s": round(v, 1) for k, v in out.items()}


def run(quick: bool = False) -> dict:
    from bench_engine import devices

    results = []
    for name in devices():
        machine = describe(name)
        measured = ceilings(torch.device(name), 0.5 if quick else 2.0)
        row = {"device": device_name(machine), "device_type": name, **measured}
        results.append(row)
        print("   " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return {"benchmark": "hardware ceiling", "machine": describe(devices()[-1]), "results": results}
