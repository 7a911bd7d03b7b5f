"""Does the live trust map point at the preview's real errors? In-family and out-of-family samples.

A model trained on the random-features family reconstructs a new object of that family and an
object of another (Manhattan "circuit" wires) through the live engine with the run's probe. For
each, the trust map is compared with the preview's actual error against the truth:

* ``local_pearson``: Pearson over the scanned region of the trust map against the absolute phase
  error (global offset removed) averaged over the probe's footprint, the scale the trust map
  resolves;
* ``pixel_pearson``: the same against the raw per-pixel absolute phase error;
* ``frame_pearson``: per frame, the consistency error against the footprint-weighted phase error
  of that frame's own predicted patch;
* ``flagged_fraction``: frames above the checkpoint's out-of-domain threshold.

The noise floor is the consistency error of the true patches on the same frames.
"""

from __future__ import annotations

import numpy as np
import torch
from family_model import family_model

from machine import describe, device_name


def evaluate(predictor, family: str, rows: int, seed: int = 101) -> dict:
    """Trust-map figures for one simulated scan of ``family``."""
    from bluesky_ptychonn.core.consistency import ConsistencyModel
    from bluesky_ptychonn.core.engine import LiveReconstruction
    from bluesky_ptychonn.core.metrics import local_mean, pearson, remove_phase_offset
    from bluesky_ptychonn.sim.physics import simulate_scan

    scan = simulate_scan(object_kind=family, object_seed=seed, scan_shape=(rows, rows), noise_seed=seed)
    live = LiveReconstruction(predictor, scan.grid, None, {"raw_uid": family}, probe=scan.probe, probe_source="sim")
    live.submit(scan.frame_ids, scan.frames, scan.positions_m)
    live.finish()
    live.wait()
    image = live.snapshot()
    region = image.covered(0.5) & np.isfinite(image.trust)
    truth_phase = np.angle(scan.obj)
    error = np.abs(remove_phase_offset(image.phase, truth_phase, region) - truth_phase)
    model = ConsistencyModel(scan.probe, predictor.info.recipe, predictor.device)
    local = local_mean(error, model.footprint)
    # Per frame: consistency of the frame's own prediction against its footprint-weighted phase error.
    amplitude, phase = predictor.predict(scan.frames)
    true_amplitude, true_phase = scan.truth_patches(predictor.patch_pixels)
    frame_error = model.score(amplitude, phase, scan.frames).error
    offset = np.angle(np.exp(1j * (phase - true_phase)))
    offset -= np.angle(np.exp(1j * offset).mean(axis=(1, 2), keepdims=True))  # the patch's own global phase
    weights = model.footprint / model.footprint.sum()
    true_frame_error = (np.abs(np.angle(np.exp(1j * offset))) * weights).sum(axis=(1, 2))
    noise = model.score(true_amplitude, true_phase, scan.frames).error
    trust = live.metadata["trust"]
    return {
        "family": family,
        "frames": int(len(scan.frames)),
        "local_pearson": round(pearson(image.trust[region], local[region]), 3),
        "pixel_pearson": round(pearson(image.trust[region], error[region]), 3),
        "frame_pearson": round(pearson(frame_error, true_frame_error), 3),
        "trust_median": round(float(trust["median"]), 4),
        "noise_floor_median": round(float(np.median(noise)), 4),
        "threshold": trust["threshold"],
        "frames_flagged": trust["frames_flagged"],
        "flagged_fraction": round(trust["frames_flagged"] / len(scan.frames), 3),
    }


def run(quick: bool = False) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = describe(device)
    predictor = family_model(quick, device=device)
    rows = 12 if quick else 24
    results = []
    for family in ("random_features", "circuit"):
        row = {"device": device_name(machine), **evaluate(predictor, family, rows)}
        results.append(row)
        print(
            f"   {row['device'][:40]:40s} {family:15s} trust vs local phase error: Pearson {row['local_pearson']:.3f} "
            f"(per pixel {row['pixel_pearson']:.3f}, per frame {row['frame_pearson']:.3f}); "
            f"median trust {row['trust_median']:.3f} (noise floor {row['noise_floor_median']:.3f}); "
            f"flagged {row['frames_flagged']}/{row['frames']} frames (threshold {row['threshold']})"
        )
    return {
        "benchmark": "trust map against the true error",
        "machine": machine,
        "model_hash": predictor.info.content_hash,
        "results": results,
    }
