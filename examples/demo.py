"""The demo: live PtychoNN during a simulated fly scan, on the embedded default (in-process Tiled).

1. Start Tiled in this process (catalog and storage under ``<out>/tiled``; the detector writes
   its HDF5 files under ``<out>/data``, which the server serves as readable storage).
2. Fly a prior scan of one region of a simulated random-features sample; it is archived in
   ``raw`` by TiledWriter like every run.
3. Fine-tune the shipped base model (pretrained on simulated physics) on that run, read back
   through Tiled with its simulation truth as labels (or reuse the model cached by an earlier demo).
4. Fly a scan of a new region of the sample with the PtychoNN callback subscribed: amplitude,
   phase and the trust map (the preview's consistency with the measured frames) grow in
   ``processed/<uid>/ptychonn`` while the stage moves.
5. After the stop document, pty-chi (LSQML) starts from the preview on its own and writes
   ``processed/<uid>/refined``.
6. Read both back from Tiled, run pty-chi from a flat start on the same frames as the reference,
   compare everything with the ground truth, and write ``summary.json`` and
   ``live_reconstruction.png`` (preview, refined, flat-start pty-chi and truth; trust map and the
   preview's true error).

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
    p.add_argument("--family-objects", type=int, default=0, help="other objects of the family to train on")
    p.add_argument("--epochs", type=int, default=8, help="epochs of fine-tuning on the prior run")
    p.add_argument("--learning-rate", type=float, default=None, help="default: 3e-4 from the base, 1e-3 from scratch")
    p.add_argument("--from-scratch", action="store_true", help="train a new network instead of the shipped base")
    p.add_argument("--network", choices=("paper", "small"), default="small", help="with --from-scratch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--retrain", action="store_true", help="train even if a cached model matches")
    p.add_argument(
        "--refine-epochs", type=int, default=None, help="cap both pty-chi runs at this many epochs (a quick look)"
    )
    return p.parse_args(argv)


def train_model(args: argparse.Namespace, prior_run, models: Path):
    """Fine-tune the shipped base model on the prior run (through Tiled), or load the cached result.

    With ``--from-scratch`` a new network trains on the prior run and ``--family-objects`` scans of
    other objects of the family instead, as before base models shipped.
    """
    from bluesky_ptychonn.archive.runs import scan_from_run
    from bluesky_ptychonn.core.base_model import DEFAULT_BASE, base_model_path
    from bluesky_ptychonn.core.checkpoint import load_model, save_checkpoint
    from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe, TrainConfig
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.training import TrainingSet, fit
    from bluesky_ptychonn.files.datasets import training_set_from_scan
    from bluesky_ptychonn.files.scanfile import ScanData
    from bluesky_ptychonn.sim.physics import simulate_scan

    base, base_info = (None, None) if args.from_scratch else load_model(base_model_path(DEFAULT_BASE))
    if base_info is not None:
        network, recipe = base_info.network, base_info.recipe
    else:
        network = NetworkConfig.preset(args.network).model_copy(update={"batch_norm": True})
        recipe = PreprocessRecipe(transform="sqrt")
    rate = args.learning_rate or (3e-4 if base is not None else 1e-3)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=rate, seed=0)
    prior = scan_from_run(prior_run)
    settings = {
        "network": network.model_dump(),
        "train": config.model_dump(),
        "objects": args.family_objects,
        "rows": args.rows,
        "prior_frames": int(len(prior.frames)),
        "sample": prior.metadata["sample_id"],
        "base": base_info.content_hash if base_info is not None else None,
    }
    # The model file is named by its content hash; a small JSON named by the training settings
    # points at it, so a second demo with the same settings reuses it.
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    pointer = models / f"settings-{key}.json"
    if pointer.exists() and not args.retrain:
        path = models / json.loads(pointer.read_text())["checkpoint"]
        if path.exists():
            print(f"[model] reusing {path} (delete it or pass --retrain to train again)")
            return Predictor.from_checkpoint(path, device=args.device), 0.0
    parts = [training_set_from_scan(prior, source={"run_uid": prior.metadata["uid"]})]
    for seed in range(args.family_objects):
        s = simulate_scan(object_seed=seed, scan_shape=(args.rows, args.rows), noise_seed=seed)
        scan = ScanData(s.frames, s.positions_m, s.frame_ids, s.geometry, s.probe, s.obj, s.grid, s.metadata)
        parts.append(training_set_from_scan(scan, source={"simulated_object_seed": seed}))
    data = TrainingSet.concatenate(parts)
    start = f"the shipped base model {DEFAULT_BASE}" if base is not None else f"scratch ({args.network} network)"
    print(f"[model] fine-tuning from {start} on {len(data.frames)} frames ({len(parts[0].frames)} from the prior run)")
    model, info = fit(
        data,
        network,
        recipe,
        config,
        device=args.device,
        fit_scale=base is None,
        initial_state=None if base is None else base.state_dict(),
    )
    if base_info is not None:
        info.provenance["fine_tuned_from"] = {"base": DEFAULT_BASE, "content_hash": base_info.content_hash}
    models.mkdir(parents=True, exist_ok=True)
    partial = models / f"settings-{key}.safetensors.partial"
    save_checkpoint(partial, model, info)
    path = partial.replace(models / f"ptychonn-{info.content_hash[:12]}.safetensors")
    pointer.write_text(json.dumps({"checkpoint": path.name, "content_hash": info.content_hash, "settings": settings}))
    print(
        f"[model] best validation loss {info.metrics['best_val_loss']:.4f} at epoch {info.metrics['best_epoch']}, "
        f"saved to {path}"
    )
    return Predictor(model, info, device=args.device), float(info.metrics["train_seconds"])


def blank_options(cap: int | None = None):
    """The flat-start reference: the refinement's engine, run until its error has stopped falling."""
    from bluesky_ptychonn.core.refine import REFINE_OPTIONS

    return REFINE_OPTIONS.model_copy(
        update={"epochs": min(400, cap or 400), "stop_tolerance": 0.002, "stop_window": 20}
    )


def rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in figures.items()}


def trust_summary(section: dict, trust_map, phase, truth, region, probe):
    """The live trust figures, how well the map follows the preview's true phase error, and that error.

    The error is the preview's absolute phase error averaged over the probe footprint (None
    without a trust map).
    """
    from bluesky_ptychonn.core.metrics import local_mean, pearson, remove_phase_offset

    if trust_map is None:
        return {"available": False, "reason": section.get("reason")}, None
    error = np.abs(remove_phase_offset(phase, np.angle(truth), region) - np.angle(truth))
    footprint = np.abs(probe) ** 2
    local = local_mean(error, footprint)
    inside = region & np.isfinite(trust_map)
    return {
        "available": True,
        "mean": round(section["mean"], 4),
        "median": round(section["median"], 4),
        "chi2_median": round(section["chi2_median"], 2),
        "threshold": section["threshold"],
        "frames_flagged": section["frames_flagged"],
        "pearson_with_local_phase_error": round(pearson(trust_map[inside], local[inside]), 3),
        "pearson_with_pixel_phase_error": round(pearson(trust_map[inside], error[inside]), 3),
        "probe_source": section["probe_source"],
    }, local


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.labels import run_inputs
    from bluesky_ptychonn.archive.refine_worker import RefineWorker
    from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_archive
    from bluesky_ptychonn.archive.truth import read_simulation_truth
    from bluesky_ptychonn.core.geometry import ObjectGrid
    from bluesky_ptychonn.core.metrics import compare
    from bluesky_ptychonn.core.refine import REFINE_OPTIONS
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
        subscribe_archive(run_engine, archive.client, backup_directory=out / "backup")  # an outage never aborts a scan
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

        # The refined image comes without anyone asking: the worker starts pty-chi from the
        # preview once the live image is final, off the RunEngine's path.
        cap = min(REFINE_OPTIONS.epochs, args.refine_epochs or REFINE_OPTIONS.epochs)
        refiner = RefineWorker(archive.client, options=REFINE_OPTIONS.model_copy(update={"epochs": cap}))
        callback = PtychoNNCallback(
            predictor, archive.client, CallbackConfig(data_roots=[archive.data_dir]), after_final=refiner.submit
        )
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
        trust_map = node["trust"].read() if "trust" in node else None
        trust, local_error = trust_summary(md["trust"], trust_map, phase, truth, region, probe)

        print("[refine] pty-chi (LSQML) from the PtychoNN preview, started by the callback after the stop document")
        if not refiner.wait(600):
            raise RuntimeError(f"the refinement of {uid} did not finish")
        refined_node = archive.client["processed"][uid]["refined"]
        refined_md = dict(refined_node.metadata)
        if refined_md["status"] != "complete":
            raise RuntimeError(f"the refinement of {uid} ended {refined_md['status']}: {refined_md.get('errors')}")
        refined_amplitude, refined_phase = (refined_node[k].read() for k in ("amplitude", "phase"))
        stop_time = archive.raw[uid].metadata["stop"]["time"]
        print("[refine] the reference: pty-chi from a flat start on the same frames, run to convergence")
        blank = run_inputs(archive.raw[uid]).reconstruct(grid, blank_options(args.refine_epochs))  # flat start

        live_fps = md["frames_done"] / (done - md["first_frame"])
        result_uri = f"{archive.client.context.api_uri}metadata/processed/{uid}/ptychonn"
        summary = {
            **{k: round(v, 4) for k, v in metrics.items()},
            "frames": md["frames_done"],
            "device": str(predictor.device),
            "network": predictor.info.network.model_dump(),
            "fine_tuned_from": predictor.info.provenance.get("fine_tuned_from"),
            "model_hash": predictor.info.content_hash,
            "tiled_uri": result_uri,
            "run_uid": uid,
            "prior_run_uid": prior_uid,
            "live_frames_per_s": round(live_fps, 1),
            "scan_seconds": round(scan_seconds, 2),
            "first_frame_to_final_write_s": round(done - md["first_frame"], 2),
            "train_seconds": round(train_seconds, 1),
            "status": md["status"],
            "trust": trust,
            "refined": {
                **rounded(compare(refined_amplitude, refined_phase, np.abs(truth), np.angle(truth), region)),
                "engine": refined_md["engine"],
                "epochs": refined_md["epochs"],
                "stopped_by": refined_md["stopped_by"],
                "pty_chi_seconds": round(refined_md["seconds"], 1),
                "in_tiled_after_stop_s": round(refined_md["finished"] - stop_time, 1),
                "final_error": round(refined_md["error_per_epoch"][-1], 4),
                "trust_median": round(refined_md["trust"]["median"], 4),
                "tiled_uri": f"{archive.client.context.api_uri}metadata/processed/{uid}/refined",
            },
            "blank_start": {
                **rounded(compare(blank.amplitude, blank.phase, np.abs(truth), np.angle(truth), region)),
                "engine": blank.engine,
                "epochs": blank.epochs,
                "pty_chi_seconds": round(blank.seconds, 1),
                "final_error": round(blank.error_per_epoch[-1], 4),
            },
            "seconds": round(time.perf_counter() - started, 1),
        }
        refined = summary["refined"]
        figure = save_figure(
            out / "live_reconstruction.png",
            [
                ("PtychoNN, live", amplitude, phase),
                ("refined (pty-chi from PtychoNN)", refined_amplitude, refined_phase),
                ("pty-chi from flat", blank.amplitude, blank.phase),
                ("ground truth", np.abs(truth), np.angle(truth)),
            ],
            grid,
            mask=region,
            title=f"run {uid[:8]}: {md['frames_done']} frames; phase SSIM preview {metrics['phase_ssim']:.2f}, "
            f"refined {refined['phase_ssim']:.2f} ({refined['epochs']} epochs); "
            f"frames flagged: {trust.get('frames_flagged', 0)}",
            maps=[
                ("trust (Fourier error; lower is better)", trust_map, "magma"),
                (
                    "preview's |phase error|, footprint mean (rad)",
                    np.where(region, local_error, np.nan),
                    "magma",
                ),
            ]
            if trust_map is not None
            else None,
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        print(
            f"[done] live result in Tiled: {result_uri}\n[done] refined: {refined['tiled_uri']}\n"
            f"[done] raw run: {archive.raw.uri}/{uid}\n[done] figure {figure}, summary {out / 'summary.json'}"
        )
        refiner.close()
    finally:
        archive.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
