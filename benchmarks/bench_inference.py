"""Model-only inference throughput and latency per network, precision and batch size, against the ceiling.

Frames are already preprocessed and in host memory; the figure is the shipped
:class:`~bluesky_ptychonn.core.inference.Predictor` path (copy to the device, forward, copy back),
so it is what the live pipeline can at best reach. Each row gives FLOPs per frame, the achieved
FLOP/s and its fraction of the same device's ceiling in the same precision (the larger of dense
matmul and convolution), measured by ``bench_ceiling`` in the same run.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from bench_ceiling import ceilings
from bench_engine import devices

from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.inference import PINNED_FRAMES, Predictor, resolve_precision
from bluesky_ptychonn.core.network import PtychoNN, flops_per_frame

from machine import describe, device_name


def _throughput(predictor: Predictor, batch: int, seconds: float) -> tuple[float, float]:
    """(frames/s, median seconds per call) of ``predictor`` on batches of ``batch`` frames.

    On a GPU each call holds up to four batches (at most one page-locked block), as a stream of
    frames would: the host stages one batch while the device computes the one before.
    """
    n = predictor.patch_pixels
    frames = batch if predictor.device.type == "cpu" else max(batch, min(4 * batch, PINNED_FRAMES))
    x = np.random.default_rng(0).random((frames, n, n), dtype=np.float32)
    predictor.batch_size = batch
    predictor.predict_preprocessed(x)  # warm-up: kernel selection, allocation
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 3:
        t0 = time.perf_counter()
        predictor.predict_preprocessed(x)  # returns host arrays: the device is synchronised
        times.append(time.perf_counter() - t0)
    return frames * len(times) / sum(times), float(np.median(times)) * batch / frames


def _resident(predictor: Predictor, batch: int, seconds: float) -> float:
    """Frames/s of the forward pass alone, frames already on the device (what a GPU-resident pipeline would see)."""
    n = predictor.patch_pixels
    x = torch.rand(batch, 1, n, n, device=predictor.device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(predictor.device.type, torch.bfloat16, enabled=predictor.bf16):
        predictor.model(x)
        torch.cuda.synchronize()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            predictor.model(x)
            runs += 1
        torch.cuda.synchronize()
    return batch * runs / (time.perf_counter() - started)


def run(quick: bool = False) -> dict:
    results = []
    for dev_name in devices():
        device = torch.device(dev_name)
        machine = describe(dev_name)
        ceiling = ceilings(device, 0.5 if quick else 1.5)
        batches = [1, 16, 64, 256] if dev_name == "cpu" else [1, 256, 1024, 8192]  # nhwc upsampling: < 2^31 elements
        if quick:
            batches = batches[1:3]
        for preset in ("paper", "small"):
            config = NetworkConfig.preset(preset)
            flops = flops_per_frame(config)
            info = CheckpointInfo(config, PreprocessRecipe(), content_hash=preset)
            native = resolve_precision("auto", device) == "bfloat16"
            # Emulated bf16 (no AVX-512 BF16 or AMX) ran 20x slower than float32: not worth minutes here.
            # On the CPU, also the frozen graph (Predictor(compile=True)) in the native precision, at
            # the batches that run best eager; on a GPU bench_compile measures the graph.
            variants = [(p, False, batches) for p in (("float32", "bfloat16") if native else ("float32",))]
            if dev_name == "cpu":
                variants.append(("bfloat16" if native else "float32", True, [64] if quick else [16, 64]))
            for precision, compiled, sizes in variants:
                tag = "fp32" if precision == "float32" else "bf16"
                for batch in sizes:
                    seconds = 0.5 if quick else (2.0 if dev_name == "cpu" else 1.0)
                    t0 = time.perf_counter()  # a compiled predictor builds its graph for `batch` here
                    predictor = Predictor(
                        PtychoNN(config), info, device=dev_name, precision=precision, compile=compiled, batch_size=batch
                    )
                    made_s = time.perf_counter() - t0
                    fps, per_batch = _throughput(predictor, batch, seconds)
                    achieved = fps * flops / 1e9
                    row = {
                        "device": device_name(machine),
                        "device_type": dev_name,
                        "network": preset,
                        "precision": precision
                        + (" channels-last" if precision == "bfloat16" else "")
                        + (" compiled" if predictor.compiled else ""),
                        "batch": batch,
                        "frames_per_s": round(fps, 1),
                        "batch_latency_ms": round(per_batch * 1e3, 2),
                        "gflop_per_frame": round(flops / 1e9, 3),
                        "achieved_gflop_per_s": round(achieved, 1),
                        "fraction_of_ceiling": round(achieved / ceiling[f"ceiling_{tag}_gflop_per_s"], 3),
                    }
                    if compiled:  # inductor's on-disk cache may hold the graph from a run before
                        row["compile_s"] = round(made_s, 1)
                    if dev_name == "cuda":
                        row["forward_only_frames_per_s"] = round(_resident(predictor, batch, seconds), 1)
                    results.append(row)
                    print(
                        f"   {dev_name} {preset:5s} {tag}{' compiled' if compiled else ''} batch {batch:5d}: "
                        f"{fps:10.1f} frames/s, "
                        f"{row['batch_latency_ms']} ms/batch, {row['achieved_gflop_per_s']} GFLOP/s = "
                        f"{row['fraction_of_ceiling']:.2f} of the {tag} ceiling"
                        + (f"; forward only {row['forward_only_frames_per_s']} frames/s" if dev_name == "cuda" else "")
                    )
        auto = Predictor(PtychoNN(NetworkConfig.preset("paper")), info, device=dev_name).precision
        print(f"   {dev_name} ceiling {ceiling}; Predictor precision='auto' picks {auto} here")
        results.append({"device": device_name(machine), "device_type": dev_name, "auto_precision": auto, **ceiling})
    return {
        "benchmark": "model-only inference",
        "machine": describe(devices()[-1]),
        "results": results,
        "note": (
            "Predictor.predict_preprocessed on host frames: copies, forward and copies back included "
            "(on a GPU, calls of up to four batches, overlapped, and batch_latency_ms a call's time per batch); "
            "forward only: frames already on the device"
        ),
    }
