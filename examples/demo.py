"""The demo: live PtychoNN during a simulated fly scan, on the embedded default (in-process Tiled).

1. Start Tiled in this process (catalog and storage under ``<out>/tiled``; the detector writes
   its HDF5 files under ``<out>/data``, which the server serves as readable storage).
2. Fly a prior scan of one region of a simulated random-features sample; it is archived in
   ``raw`` by TiledWriter like every run.
3. Train PtychoNN on that run, read back through Tiled with its simulation truth as labels, plus
   scans of other objects of the same family (or reuse the model cached by an earlier demo).
4. Fly a scan of a new region of the sample with the PtychoNN callback subscribed: amplitude and
   phase grow in ``processed/<uid>/ptychonn`` while the stage moves.
5. Read the live result back from Tiled, compare it with the ground truth, and write
   ``summary.json`` and ``live_reconstruction.png`` (PtychoNN beside the truth).

``python examples/demo.py --help`` lists the knobs; ``make demo`` runs the defaults.
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
    p.add_argument("--rows", type=int, default=32, help="scan lines (and points per line) of each scan")
    p.add_argument("--family-objects", type=int, default=2, help="other objects of the family to train on")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--network", choices=("paper", "small"), default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--retrain", action="store_true", help="train even if a cached model matches")
    return p.parse_args(argv)


def train_model(args: argparse.Namespace, prior_run, models: Path):
    """Train on the prior run (through Tiled) and the family objects, or load the cached model."""
    from bluesky_ptychonn.archive.runs import scan_from_run
    from bluesky_ptychonn.core.checkpoint import save_checkpoint
    from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe, TrainConfig
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.training import TrainingSet, fit
    from bluesky_ptychonn.files.datasets import training_set_from_scan
    from bluesky_ptychonn.files.scanfile import ScanData
    from bluesky_ptychonn.sim.physics import simulate_scan

    network = NetworkConfig.preset(args.network).model_copy(update={"batch_norm": True})
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=0)
    prior = scan_from_run(prior_run)
    settings = {
        "network": network.model_dump(),
        "train": config.model_dump(),
        "objects": args.family_objects,
        "rows": args.rows,
        "prior_frames": int(len(prior.frames)),
        "sample": prior.metadata["sample_id"],
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = models / f"ptychonn-{key}.safetensors"
    if path.exists() and not args.retrain:
        print(f"[model] reusing {path} (delete it or pass --retrain to train again)")
        return Predictor.from_checkpoint(path, device=args.device), 0.0
    parts = [training_set_from_scan(prior, source={"run_uid": prior.metadata["uid"]})]
    for seed in range(args.family_objects):
        s = simulate_scan(object_seed=seed, scan_shape=(args.rows, args.rows), noise_seed=seed)
        scan = ScanData(s.frames, s.positions_m, s.frame_ids, s.geometry, s.probe, s.obj, s.grid)
        parts.append(training_set_from_scan(scan, source={"simulated_object_seed": seed}))
    data = TrainingSet.concatenate(parts)
    print(
        f"[model] training the {args.network} network on {len(data.frames)} frames "
        f"({len(parts[0].frames)} from the prior run, the rest from {args.family_objects} objects of the family)"
    )
    model, info = fit(data, network, PreprocessRecipe(transform="sqrt"), config, device=args.device)
    save_checkpoint(path, model, info)
    print(
        f"[model] best validation loss {info.metrics['best_val_loss']:.4f} at epoch {info.metrics['best_epoch']}, "
        f"saved to {path}"
    )
    return Predictor(model, info, device=args.device), float(info.metrics["train_seconds"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_archive
    from bluesky_ptychonn.archive.truth import read_simulation_truth
    from bluesky_ptychonn.core.geometry import ObjectGrid
    from bluesky_ptychonn.core.metrics import compare
    from bluesky_ptychonn.files.figures import save_figure
    from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback
    from bluesky_ptychonn.sim.physics import probe_diameter_px
    from bluesky_ptychonn.sim.sample import default_registry

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[tiled] starting the embedded Tiled server (catalog in {out / 'tiled'})")
    archive = start_embedded_server(out / "data", directory=out / "tiled")
    try:
        run_engine = RunEngine({})
        subscribe_archive(run_engine, archive.client)
        sample = default_registry().get("sim-features-0")
        stage = SimStage(name="stage")
        detector = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample=sample.sample_id)
        probe = detector.settings.probe_array()
        step_m = 0.5 * probe_diameter_px(probe) * sample.pixel_size_m  # 50 % probe overlap
        half_width_m = (args.rows - 1) * step_m / 2 + 5e-6

        print(f"[scan] prior fly scan: {args.rows}x{args.rows} points, step {step_m * 1e9:.0f} nm")
        (prior_uid,) = run_engine(
            ptycho_fly_scan(
                detector,
                stage,
                step_m=step_m,
                shape=(args.rows, args.rows),
                center_m=(-half_width_m, 0.0),
                md={"purpose": "demo prior"},
            )
        )
        predictor, train_seconds = train_model(args, archive.raw[prior_uid], out / "models")

        callback = PtychoNNCallback(predictor, archive.client, CallbackConfig(data_roots=[archive.data_dir]))
        run_engine.subscribe(callback)
        print(f"[scan] live fly scan of a new region with PtychoNN subscribed ({predictor.device})")
        t0 = time.time()
        (uid,) = run_engine(
            ptycho_fly_scan(
                detector,
                stage,
                step_m=step_m,
                shape=(args.rows, args.rows),
                center_m=(half_width_m, 0.0),
                md={"purpose": "demo live"},
            )
        )
        scan_seconds = time.time() - t0
        if not callback.wait(uid, 600):
            raise RuntimeError(f"the live result of {uid} was not written")
        done = time.time()

        node = archive.client["processed"][uid]["ptychonn"]
        md = dict(node.metadata)
        amplitude, phase, weight = (node[k].read() for k in ("amplitude", "phase", "weight"))
        truth, grid = read_simulation_truth(archive.raw[uid])
        if grid != ObjectGrid.from_metadata(md["grid"]):
            raise RuntimeError("the live result is not on the run's sample-aligned grid")
        region = weight >= 0.5 * weight.max()
        metrics = compare(amplitude, phase, np.abs(truth), np.angle(truth), region)
        live_fps = md["frames_done"] / (done - md["first_frame"])
        result_uri = f"{archive.client.context.api_uri}metadata/processed/{uid}/ptychonn"
        summary = {
            **{k: round(v, 4) for k, v in metrics.items()},
            "frames": md["frames_done"],
            "device": str(predictor.device),
            "network": args.network,
            "model_hash": predictor.info.content_hash,
            "tiled_uri": result_uri,
            "run_uid": uid,
            "prior_run_uid": prior_uid,
            "live_frames_per_s": round(live_fps, 1),
            "scan_seconds": round(scan_seconds, 2),
            "first_frame_to_final_write_s": round(done - md["first_frame"], 2),
            "train_seconds": round(train_seconds, 1),
            "status": md["status"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        figure = save_figure(
            out / "live_reconstruction.png",
            [("PtychoNN, live", amplitude, phase), ("ground truth", np.abs(truth), np.angle(truth))],
            grid,
            mask=region,
            title=f"run {uid[:8]}: {md['frames_done']} frames; phase SSIM {metrics['phase_ssim']:.2f}, "
            f"amplitude SSIM {metrics['amplitude_ssim']:.2f}",
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        print(
            f"[done] live result in Tiled: {result_uri}\n[done] raw run: {archive.raw.uri}/{uid}\n"
            f"[done] figure {figure}, summary {out / 'summary.json'}"
        )
    finally:
        archive.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
