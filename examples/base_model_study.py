"""How good is the preview? The shipped base model alone, fine-tuned, and self-supervised, against pty-chi.

Two samples: a new region of a sample of the training family (random features) and a sample of a
family never used in pretraining (circuit-like wires). Each is scanned at the dense step (50 %
probe overlap) and at 5x that step, on simulated physics (1e6 photons per frame, the default
zone-plate probe). For each scan:

* **base**: the shipped base model, as installed;
* **fine-tuned**: the base fine-tuned on a labelled prior scan of another region of the same
  sample (labels: simulation truth), as ``train-runs`` does from prior runs;
* **self-supervised**: the base adapted to the scan's own frames, no labels (``fine-tune
  --self-supervised``);
* **pty-chi**: LSQML from a flat start, run until its error stops falling.

All are compared with the truth where the scan lit the sample (SSIM, PSNR, Pearson, FRC).
Writes ``results.json``, ``results.md`` and one PNG per scan to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("study-output"))
    p.add_argument("--rows", type=int, default=24, help="lines (and points per line) of the dense scans")
    p.add_argument("--sparse-factor", type=int, default=5)
    p.add_argument("--checkpoint", default="default-64", help="base model: a shipped name or a checkpoint path")
    p.add_argument("--fine-tune-epochs", type=int, default=6)
    p.add_argument("--adapt-minutes", type=float, default=2.0, help="self-supervised budget per scan")
    p.add_argument("--ptychi-epochs", type=int, default=300, help="most LSQML epochs (it stops when converged)")
    p.add_argument("--samples", default="in-family,unseen-family")
    return p.parse_args(argv)


SAMPLES = {"in-family": ("random_features", 9001), "unseen-family": ("circuit", 9002)}


def scan(obj, grid, probe, centre_m, step_m, rows, seed):
    """Frames, positions and true patches of a raster scan of ``rows`` x ``rows`` points around ``centre_m``."""
    from bluesky_ptychonn.sim.physics import diffraction_patterns, scan_positions

    positions = scan_positions("raster", step_m=step_m, shape=(rows, rows), jitter_m=0.05 * step_m, seed=seed)
    positions = positions + np.asarray(centre_m)
    frames = diffraction_patterns(obj, grid, probe, positions, photons_per_frame=1e6, seed=seed)
    return frames, positions


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bluesky_ptychonn.core.adapt import ADAPT_CONFIG, adapt
    from bluesky_ptychonn.core.base_model import BASE_MODELS, base_model_path
    from bluesky_ptychonn.core.checkpoint import load_model
    from bluesky_ptychonn.core.config import DetectorGeometry, TrainConfig
    from bluesky_ptychonn.core.geometry import ObjectGrid, extract_patches
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.iterative import IterativeOptions
    from bluesky_ptychonn.core.metrics import compare
    from bluesky_ptychonn.core.ptychi_engine import reconstruct_iterative
    from bluesky_ptychonn.core.reconstruct import reconstruct
    from bluesky_ptychonn.core.training import TrainingSet, fit
    from bluesky_ptychonn.files.figures import save_figure
    from bluesky_ptychonn.sim.physics import circuit_object, make_probe, probe_diameter_px, random_features_object

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = base_model_path(args.checkpoint) if args.checkpoint in BASE_MODELS else Path(args.checkpoint)
    base, info = load_model(path)
    geometry = DetectorGeometry()
    n, pixel = geometry.frame_pixels, geometry.pixel_size_m()
    probe = make_probe("zone_plate", n)
    step = 0.5 * probe_diameter_px(probe) * pixel
    ptychi = IterativeOptions(engine="lsqml", epochs=args.ptychi_epochs, stop_tolerance=0.002, stop_window=20)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, no GPU"
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    results: dict = {"base_model": info.content_hash, "machine": machine, "rows": args.rows, "cases": []}
    for name in args.samples.split(","):
        kind, seed = SAMPLES[name]
        side = int(2 * args.rows * step / pixel + 3 * n)
        make = random_features_object if kind == "random_features" else circuit_object
        obj = make((side, 2 * side), seed)
        grid = ObjectGrid(shape=obj.shape, pixel_size_m=pixel, origin_m=(-side / 2 * pixel, -side * pixel))
        span = (args.rows - 1) * step
        left, right = (0.0, -span / 2 - 2e-6), (0.0, span / 2 + 2e-6)
        frames, positions = scan(obj, grid, probe, left, step, args.rows, seed=1)
        patches = extract_patches(obj, grid.patch_corners(positions, n), n)
        data = TrainingSet(
            frames, np.abs(patches), np.angle(patches), positions, np.zeros(len(frames), np.int64), [{"sample": name}]
        )
        t = time.perf_counter()
        config = TrainConfig(epochs=args.fine_tune_epochs, batch_size=16, learning_rate=3e-4)
        tuned, tuned_info = fit(
            data, info.network, info.recipe, config, device="cpu", fit_scale=False, initial_state=base.state_dict()
        )
        tune_seconds = time.perf_counter() - t
        for factor in (1, args.sparse_factor):
            rows = (args.rows - 1) // factor + 1
            frames, positions = scan(obj, grid, probe, right, step * factor, rows, seed=2 + factor)
            label = f"{name}, {'dense' if factor == 1 else f'{factor}x'} step"
            print(f"[{label}] {len(frames)} frames")
            covering = ObjectGrid.covering(positions, pixel, n)
            # The same grid snapped onto the sample's pixels, so the truth is cut without resampling.
            offset = np.round(grid.to_pixels(np.asarray(covering.origin_m)[None])[0]).astype(int)
            origin = grid.to_metres(offset.astype(float)[None])[0]
            sub = ObjectGrid(shape=covering.shape, pixel_size_m=pixel, origin_m=(float(origin[0]), float(origin[1])))
            truth = obj[offset[0] : offset[0] + sub.shape[0], offset[1] : offset[1] + sub.shape[1]]
            t = time.perf_counter()
            adapted, _ = adapt(
                base,
                info,
                frames,
                positions,
                probe,
                pixel,
                photons_per_frame=1e6,
                config=ADAPT_CONFIG.model_copy(update={"budget_s": args.adapt_minutes * 60}),
                device="cpu",
                progress=False,
            )
            adapt_seconds = time.perf_counter() - t
            images, seconds = {}, {"self-supervised": adapt_seconds}
            for method, model, model_info in (
                ("base", base, info),
                ("fine-tuned", tuned, tuned_info),
                ("self-supervised", adapted, info),
            ):
                t = time.perf_counter()
                images[method] = reconstruct(Predictor(model, model_info, device="cpu"), frames, positions, grid=sub)
                seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - t
            iterative = reconstruct_iterative(
                frames, positions, probe, pixel_size_m=pixel, photons_per_frame=1e6, options=ptychi, grid=sub
            )
            mask = iterative.as_image().covered(0.3) & images["base"].covered(0.5)
            row = {"case": label, "frames": int(len(frames)), "methods": {}}
            for method, image in images.items():
                quality = compare(image.amplitude, image.phase, np.abs(truth), np.angle(truth), mask)
                row["methods"][method] = {
                    **{k: round(v, 3) for k, v in quality.items()},
                    "seconds": round(seconds[method], 1),
                }
            quality = compare(iterative.amplitude, iterative.phase, np.abs(truth), np.angle(truth), mask)
            row["methods"]["pty-chi"] = {
                **{k: round(v, 3) for k, v in quality.items()},
                "seconds": round(iterative.seconds, 1),
                "epochs": iterative.epochs,
            }
            row["fine_tune_seconds"] = round(tune_seconds, 1)
            results["cases"].append(row)
            print(json.dumps(row["methods"], indent=1))
            save_figure(
                out / f"study_{name}_{factor}x.png",
                [
                    ("base", images["base"].amplitude, images["base"].phase),
                    ("fine-tuned", images["fine-tuned"].amplitude, images["fine-tuned"].phase),
                    ("self-supervised", images["self-supervised"].amplitude, images["self-supervised"].phase),
                    (f"pty-chi LSQML ({iterative.epochs} ep.)", iterative.amplitude, iterative.phase),
                    ("ground truth", np.abs(truth), np.angle(truth)),
                ],
                sub,
                mask=mask,
                title=f"{label}: {len(frames)} frames",
            )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Machine: {machine}. Base model {results['base_model'][:12]}.",
        "",
        "| case | method | amp. SSIM | amp. PSNR | amp. Pearson | phase SSIM | phase PSNR | phase Pearson | "
        "phase FRC (px) | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["cases"]:
        for method, q in row["methods"].items():
            lines.append(
                f"| {row['case']} ({row['frames']} frames) | {method} | {q['amplitude_ssim']} | "
                f"{q['amplitude_psnr']} | {q['amplitude_pearson']} | {q['phase_ssim']} | {q['phase_psnr']} | "
                f"{q['phase_pearson']} | {q['phase_frc_px']} | {q['seconds']} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
