"""The demo: the paper's protocol on simulated physics, end to end on this machine.

1. Simulate raster scans (64x64 frames, ~50 % probe overlap) of several random-features objects
   of one family, and a target scan of a new object.
2. Train PtychoNN on the other objects plus the first 60 % of the target's scan lines, with
   ground-truth labels (or reuse the cached model from an earlier run with the same settings).
3. Reconstruct the held-out 40 % of the target's lines, compare with the ground truth, and write
   ``summary.json`` and a PNG (PtychoNN beside the truth) to the output folder.

Run ``python examples/demo.py --help`` for the knobs; ``make demo`` runs it with the defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--rows", type=int, default=32, help="scan lines (and points per line) of every scan")
    p.add_argument("--train-objects", type=int, default=2, help="other objects of the family to train on")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--network", choices=("paper", "small"), default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--retrain", action="store_true", help="ignore a cached model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bluesky_ptychonn.checkpoint import save_checkpoint
    from bluesky_ptychonn.config import NetworkConfig, PreprocessRecipe, TrainConfig
    from bluesky_ptychonn.figures import save_figure
    from bluesky_ptychonn.inference import Predictor
    from bluesky_ptychonn.reconstruct import evaluate, reconstruct, split_lines
    from bluesky_ptychonn.simulate import simulate_scan
    from bluesky_ptychonn.training import TrainingSet, fit

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = (args.rows, args.rows)
    print(f"simulating {args.train_objects + 1} scans of {shape[0]}x{shape[1]} points (64x64 frames, 50 % overlap)")
    target = simulate_scan(object_seed=1000, scan_shape=shape, noise_seed=1000)
    train_idx, test_idx = split_lines(target.positions_m, 0.6)

    def labelled(scan, idx, name):
        amp, phase = scan.truth_patches()
        return TrainingSet(scan.frames[idx], amp[idx], phase[idx], scan.positions_m[idx], np.zeros(len(idx), np.int64),
                           [{"scan": name, "label_source": "simulation_truth", "frames": int(len(idx))}])

    network = NetworkConfig.preset(args.network).model_copy(update={"batch_norm": True})
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=0)
    settings = json.dumps({"rows": args.rows, "objects": args.train_objects, "network": network.model_dump(),
                           "train": config.model_dump()}, sort_keys=True)
    ckpt = args.out / f"model-{hashlib.sha256(settings.encode()).hexdigest()[:12]}.safetensors"
    if ckpt.exists() and not args.retrain:
        print(f"reusing the cached model {ckpt}")
        predictor = Predictor.from_checkpoint(ckpt, device=args.device)
        train_seconds = 0.0
    else:
        parts = [labelled(target, train_idx, "target, first 60 % of lines")]
        for k in range(args.train_objects):
            other = simulate_scan(object_seed=k, scan_shape=shape, noise_seed=k)
            parts.append(labelled(other, np.arange(len(other.frames)), f"object {k}"))
        data = TrainingSet.concatenate(parts)
        print(f"training the {args.network} network on {len(data.frames)} frames for up to {args.epochs} epochs")
        model, info = fit(data, network, PreprocessRecipe(transform="sqrt"), config, device=args.device)
        save_checkpoint(ckpt, model, info)
        predictor = Predictor(model, info, device=args.device)
        train_seconds = info.metrics["train_seconds"]

    print(f"reconstructing the held-out {len(test_idx)} frames (last 40 % of lines)")
    t0 = time.perf_counter()
    image = reconstruct(predictor, target.frames[test_idx], target.positions_m[test_idx], grid=target.grid)
    recon_seconds = time.perf_counter() - t0
    metrics = evaluate(image, target.obj, target.grid)
    summary = {
        **{k: round(v, 4) for k, v in metrics.items()},
        "frames": int(len(test_idx)),
        "train_frames": int(len(train_idx)) + args.train_objects * shape[0] * shape[1],
        "device": str(predictor.device),
        "torch_threads": torch.get_num_threads(),
        "network": args.network,
        "model_hash": predictor.info.content_hash,
        "train_seconds": round(train_seconds, 1),
        "reconstruct_seconds": round(recon_seconds, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    figure = save_figure(
        args.out / "reconstruction.png",
        [("PtychoNN", image.amplitude, image.phase), ("ground truth", np.abs(target.obj), np.angle(target.obj))],
        target.grid,
        mask=image.covered(0.5),
        title=f"held-out lines: phase SSIM {metrics['phase_ssim']:.2f}, amplitude SSIM {metrics['amplitude_ssim']:.2f}",
    )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"figure: {figure}\nsummary: {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
