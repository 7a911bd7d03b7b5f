"""The paper's experiment end to end through Bluesky and Tiled, on simulated physics.

Cherukara et al. (2020) trained PtychoNN on ePIE reconstructions of the first lines of a scan,
then reconstructed new data, also at a 5x larger step where iterative phase retrieval fails.
Here, all through a RunEngine, the simulated devices and an embedded Tiled server:

1. a prior fly scan of one region of a sample; pty-chi (ePIE) reconstructs it and its
   reconstruction becomes the labels (``processed/<uid>/iterative``);
2. PtychoNN is fine-tuned from the shipped base model (pretrained on simulated physics) on that
   run pulled back through databroker (labels: the pty-chi image), as ``train-runs`` does;
3. live scans of a new region of the same sample, at the dense step and at 2x to 5x that step
   (the paper's Fig. 4), with the PtychoNN callback subscribed; pty-chi reconstructs each too;
4. PtychoNN and pty-chi are compared with the ground truth, with their wall times on this
   machine; a training-set-size study (quality against the number of training frames, as in
   the paper's Fig. 5) trains on the first lines of the prior run only, with and without the
   base model.

Writes ``results.json``, ``results.md`` (the README's table) and PNG figures (ground truth,
pty-chi and PtychoNN side by side for both steps) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("paper-output"))
    p.add_argument("--rows", type=int, default=30, help="lines (and points per line) of the dense scans")
    p.add_argument("--factors", default="1,2,3,4,5", help="step multipliers of the live scans (1: the dense step)")
    p.add_argument("--epochs", type=int, default=8, help="PtychoNN training epochs")
    p.add_argument("--ptychi-epochs", type=int, default=100)
    p.add_argument("--network", choices=("paper", "small"), default="small", help="network trained from scratch")
    p.add_argument(
        "--sizes", default="0.2,0.5", help="prior-line fractions of the training-size study (1.0 is the main model)"
    )
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def _quality(amplitude, phase, truth, mask):
    from bluesky_ptychonn.core.metrics import compare

    return {k: round(v, 4) for k, v in compare(amplitude, phase, np.abs(truth), np.angle(truth), mask).items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.labels import iterative_run
    from bluesky_ptychonn.archive.runs import scan_from_run
    from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_archive
    from bluesky_ptychonn.archive.training import train_from_runs
    from bluesky_ptychonn.archive.truth import read_simulation_truth
    from bluesky_ptychonn.core.config import NetworkConfig, TrainConfig
    from bluesky_ptychonn.core.geometry import ObjectGrid
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.iterative import IterativeOptions
    from bluesky_ptychonn.core.reconstruct import reconstruct
    from bluesky_ptychonn.files.figures import save_figure
    from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback
    from bluesky_ptychonn.sim.physics import probe_diameter_px
    from bluesky_ptychonn.sim.sample import default_registry

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    archive = start_embedded_server(out / "data", directory=out / "tiled")
    results: dict = {"rows": args.rows, "factors": args.factors}
    try:
        run_engine = RunEngine({})
        subscribe_archive(run_engine, archive.client)
        sample = default_registry().get("sim-features-1")
        stage = SimStage(name="stage")
        detector = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample=sample.sample_id)
        step_m = 0.5 * probe_diameter_px(detector.settings.probe_array()) * sample.pixel_size_m
        offset_m = (args.rows - 1) * step_m / 2 + 5e-6

        def fly(shape, step, centre, purpose):
            (uid,) = run_engine(
                ptycho_fly_scan(detector, stage, step_m=step, shape=shape, center_m=centre, md={"purpose": purpose})
            )
            return uid

        print(f"[prior] fly scan {args.rows}x{args.rows}, step {step_m * 1e9:.0f} nm (50 % overlap)")
        prior_uid = fly((args.rows, args.rows), step_m, (-offset_m, 0.0), "paper prior")
        ptychi = IterativeOptions(epochs=args.ptychi_epochs)
        print(f"[prior] pty-chi ePIE, {args.ptychi_epochs} epochs: the labels")
        t0 = time.perf_counter()
        iterative_run(archive.raw[prior_uid], archive.client, ptychi, progress=True)
        results["ptychi_prior_seconds"] = round(time.perf_counter() - t0, 1)

        network = NetworkConfig.preset(args.network).model_copy(update={"batch_norm": True})
        config = TrainConfig(epochs=args.epochs, batch_size=16)

        def train(lines, base):
            t = time.perf_counter()
            model, info = train_from_runs(
                archive.raw,
                [prior_uid],
                label_source="iterative",
                lines=lines,
                network=network,
                config=config if base is None else tuned,
                client=archive.client,
                device=args.device,
                base=base,
            )
            return Predictor(model, info, device=args.device), time.perf_counter() - t, info

        tuned = config.model_copy(update={"learning_rate": 3e-4})
        print("[train] PtychoNN fine-tuned from the shipped base model on the prior run with pty-chi labels")
        predictor, train_seconds, info = train(1.0, "auto")
        results["train_seconds"] = round(train_seconds, 1)
        results["train_frames"] = info.provenance["train_frames"] + info.provenance["validation_frames"]

        callback = PtychoNNCallback(predictor, archive.client, CallbackConfig(data_roots=[archive.data_dir]))
        token = run_engine.subscribe(callback)
        scans = {}
        for factor in [int(f) for f in args.factors.split(",")]:
            rows = (args.rows - 1) // factor + 1
            scans["dense" if factor == 1 else f"{factor}x sparse"] = ((rows, rows), step_m * factor)
        rows_md = []
        for label, (shape, step) in scans.items():
            print(f"[live] {label} scan {shape[0]}x{shape[1]}, step {step * 1e9:.0f} nm, PtychoNN subscribed")
            uid = fly(shape, step, (offset_m, 0.0), f"paper {label}")
            callback.wait(uid, 1800)
            node = archive.client["processed"][uid]["ptychonn"]
            md = dict(node.metadata)
            nn_amp, nn_phase, weight = (node[k].read() for k in ("amplitude", "phase", "weight"))
            truth, grid = read_simulation_truth(archive.raw[uid])
            assert grid == ObjectGrid.from_metadata(md["grid"])
            print(f"[iterative] pty-chi on the {label} scan")
            result = iterative_run(archive.raw[uid], archive.client, ptychi, progress=True)
            # One region for both: where the scan lit the sample (the iterative illumination map).
            mask = result.as_image().covered(0.3) & (weight > 0)
            row = {
                "scan": label,
                "frames": md["frames_done"],
                "step_nm": round(step * 1e9),
                "ptychonn": _quality(nn_amp, nn_phase, truth, mask),
                "ptychonn_seconds": round(md["timings"]["inference_s"] + md["timings"]["stitch_s"], 2),
                "ptychonn_live_seconds": round(md["finished"] - md["first_frame"], 2),
                "ptychi": _quality(result.amplitude, result.phase, truth, mask),
                "ptychi_seconds": round(result.seconds, 2),
                "run_uid": uid,
            }
            rows_md.append(row)
            save_figure(
                out / f"paper_{label.replace(' ', '_')}.png",
                [
                    ("ground truth", np.abs(truth), np.angle(truth)),
                    ("pty-chi ePIE", result.amplitude, result.phase),
                    ("PtychoNN", nn_amp, nn_phase),
                ],
                grid,
                mask=mask,
                title=f"{label} scan: {md['frames_done']} frames, step {row['step_nm']} nm",
            )
        results["scans"] = rows_md
        run_engine.unsubscribe(token)

        dense_uid = rows_md[0]["run_uid"]
        dense = scan_from_run(archive.raw[dense_uid])
        dense_grid = dense.truth_grid
        study = []
        for fraction in [float(f) for f in args.sizes.split(",") if f] + [1.0]:
            for base in ("auto", None):
                if fraction == 1.0 and base:
                    p, seconds = predictor, train_seconds
                else:
                    start = "the base model" if base else "scratch"
                    print(f"[size study] training from {start} on the first {fraction:.0%} of the prior run's lines")
                    p, seconds, _ = train(fraction, base)
                image = reconstruct(p, dense.frames, dense.positions_m, grid=dense_grid)
                quality = _quality(image.amplitude, image.phase, dense.truth, image.covered(0.5))
                study.append(
                    {
                        "lines_fraction": fraction,
                        "start": "base model" if base else "scratch",
                        "frames": int(round(fraction * len(dense.frames))),
                        "train_seconds": round(seconds, 1),
                        **quality,
                    }
                )
        results["size_study"] = study
    finally:
        archive.close()

    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| scan | frames | step (nm) | method | amplitude SSIM | amplitude PSNR | phase SSIM | phase PSNR | "
        "phase Pearson | phase FRC (px) | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["scans"]:
        for method, key, seconds in (
            ("PtychoNN", "ptychonn", row["ptychonn_seconds"]),
            ("pty-chi ePIE", "ptychi", row["ptychi_seconds"]),
        ):
            q = row[key]
            lines.append(
                f"| {row['scan']} | {row['frames']} | {row['step_nm']} | {method} | {q['amplitude_ssim']} | "
                f"{q['amplitude_psnr']} | {q['phase_ssim']} | {q['phase_psnr']} | {q['phase_pearson']} | "
                f"{q['phase_frc_px']} | {seconds} |"
            )
    lines += [
        "",
        "| prior lines | start | amplitude SSIM | phase SSIM | phase Pearson | phase FRC (px) | train (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in results["size_study"]:
        lines.append(
            f"| {s['lines_fraction']:.0%} | {s['start']} | {s['amplitude_ssim']} | {s['phase_ssim']} | "
            f"{s['phase_pearson']} | {s['phase_frc_px']} | {s['train_seconds']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
