"""Training throughput under ``torchrun``: one process against two gloo processes on the CPU.

The same simulated scan and seed are trained with :func:`~bluesky_ptychonn.core.training.fit`
by one process with torch's default threads (every core), by one process with one thread, and by
``torchrun --standalone --nproc_per_node 2`` (gloo, each process its share of the cores). The
one-thread process separates what DDP does from what torch's threading does on a busy machine.
Throughput is training frames times epochs over the seconds ``fit`` reports (per-epoch validation
included), from the writer. On one machine the processes split the same cores, so the ratios show
what DistributedDataParallel costs or gains there; across GPUs or nodes each process brings its own
device.

Run alone (``python bench_distributed.py --worker SCAN EPOCHS``) this file is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import describe, device_name

NETWORK = "small"
FRAME_PIXELS = 64
SCAN_SHAPE = (12, 12)
BATCH_SIZE = 32
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def worker(scan: str, epochs: int) -> None:
    """Train on ``scan`` for ``epochs`` epochs; the writer prints one JSON line of figures."""
    import torch

    from bluesky_ptychonn.core import distributed
    from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe, TrainConfig
    from bluesky_ptychonn.core.training import fit
    from bluesky_ptychonn.files.datasets import training_set_from_files

    data = training_set_from_files([scan])
    network = NetworkConfig.preset(NETWORK, FRAME_PIXELS)
    recipe = PreprocessRecipe(frame_shape=tuple(data.frames.shape[1:]))  # type: ignore[arg-type]
    config = TrainConfig(epochs=epochs, batch_size=BATCH_SIZE, early_stop_patience=epochs, seed=0)
    _, info = fit(data, network, recipe, config, device="cpu", progress=False)
    if distributed.is_writer():
        frames = info.provenance["train_frames"] * info.metrics["epochs_run"]
        seconds = info.metrics["train_seconds"]
        print(
            json.dumps(
                {
                    "processes": distributed.world_size(),
                    "threads_per_process": torch.get_num_threads(),
                    "frames": frames,
                    "seconds": round(seconds, 2),
                    "frames_per_s": round(frames / seconds, 1),
                    "best_val_loss": round(info.metrics["best_val_loss"], 5),
                }
            )
        )


def _launch(processes: int, scan: Path, epochs: int, threads: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env["OMP_NUM_THREADS"] = str(threads or os.cpu_count() or 1)  # explicit: Dask (an earlier bench) may have set 1
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += [__file__, "--worker", str(scan), str(epochs)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    from bluesky_ptychonn.core.config import DetectorGeometry
    from bluesky_ptychonn.files.scanfile import write_scan
    from bluesky_ptychonn.sim.physics import simulate_scan

    epochs = 1 if quick else 2
    machine = describe("cpu")
    with tempfile.TemporaryDirectory() as folder:
        scan = write_scan(
            Path(folder) / "scan.h5",
            simulate_scan(geometry=DetectorGeometry(frame_pixels=FRAME_PIXELS), scan_shape=SCAN_SHAPE),
        )
        results = [_launch(1, scan, epochs), _launch(1, scan, epochs, threads=1), _launch(2, scan, epochs)]
    one = results[0]
    for row in results:
        row |= {"device": device_name(machine), "network": NETWORK, "batch": BATCH_SIZE, "epochs": epochs}
        row["ratio_to_one_process"] = round(row["frames_per_s"] / one["frames_per_s"], 2)
    for row in results:
        print(
            f"   cpu: {row['processes']} process(es) x {row['threads_per_process']} thread(s): "
            f"{row['frames_per_s']:.1f} frames/s, {row['ratio_to_one_process']:.2f} x one process; "
            f"best validation loss {row['best_val_loss']}"
        )
    print(f"   on {device_name(machine)}")
    return {
        "benchmark": "distributed training (torchrun, gloo on the CPU)",
        "machine": machine,
        "results": results,
        "note": "Training frames x epochs per second of fit (per-epoch validation included), from the writer. "
        "All runs share this machine's cores: the ratio is what DDP costs or gains on one node.",
    }


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], int(sys.argv[3]))
