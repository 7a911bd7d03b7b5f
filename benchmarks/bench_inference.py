"""Model-only inference throughput of the paper and small networks, batch sizes 1 to 256.

Frames are already preprocessed and on the device; the figure is frames per second of the
forward pass, its FLOPs per frame, and the achieved FLOP/s. Runs on every device present.
"""

from __future__ import annotations

import time

import torch

from bluesky_ptychonn.core.config import NetworkConfig
from bluesky_ptychonn.core.network import PtychoNN, flops_per_frame

from machine import describe, device_name


def _throughput(model: torch.nn.Module, batch: int, device: torch.device, seconds: float) -> float:
    x = torch.rand(batch, 1, 64, 64, device=device)
    autocast = device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        model(x)  # warm-up (kernel selection, allocation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        frames, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(x)
            frames += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return frames / (time.perf_counter() - started)


def run(quick: bool = False) -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    batches = [1, 16, 256] if quick else [1, 4, 16, 64, 256]
    results = []
    for dev_name in devices:
        device = torch.device(dev_name)
        machine = describe(dev_name)
        for preset in ("paper", "small"):
            config = NetworkConfig.preset(preset)
            model = PtychoNN(config).to(device).eval()
            flops = flops_per_frame(config)
            for batch in batches:
                seconds = 0.5 if quick else (2.0 if dev_name == "cpu" else 1.0)
                fps = _throughput(model, batch, device, seconds)
                row = {
                    "device": device_name(machine),
                    "device_type": dev_name,
                    "network": preset,
                    "batch": batch,
                    "frames_per_s": round(fps, 1),
                    "gflop_per_frame": round(flops / 1e9, 3),
                    "achieved_gflop_per_s": round(fps * flops / 1e9, 1),
                }
                results.append(row)
                print(
                    f"   {row['device'][:40]:40s} {preset:5s} batch {batch:3d}: {fps:9.1f} frames/s, "
                    f"{row['gflop_per_frame']} GFLOP/frame, {row['achieved_gflop_per_s']} GFLOP/s"
                )
    best = {
        p: max(r["frames_per_s"] for r in results if r["network"] == p and r["device_type"] == "cpu")
        for p in ("paper", "small")
    }
    print(
        f"   best CPU throughput: paper {best['paper']} frames/s, small {best['small']} frames/s "
        f"(small/paper = {best['small'] / best['paper']:.2f})"
    )
    return {
        "benchmark": "model-only inference",
        "machine": describe(devices[-1]),
        "results": results,
        "note": "bf16 autocast on CUDA, float32 on CPU; frames preprocessed and resident on the device",
    }
