"""Which network and loss? Candidates trained for the same wall-clock budget on the same simulated stream.

Every candidate sees fresh frames of the pretraining family (:mod:`bluesky_ptychonn.sim.family`)
for ``--minutes`` on this machine, then reconstructs two held-out dense scans: a new
random-features object (the training family) and a circuit-like object (a family never trained
on). Reported: the validation losses and the stitched phase and amplitude quality against the
truth. Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

CANDIDATES = {
    "small (16 ch, 4 blocks)": ({"base_channels": 16, "depth": 4}, {}),
    "paper (32 ch, 3 blocks)": ({"base_channels": 32, "depth": 3}, {}),
    "wide small (24 ch, 4 blocks)": ({"base_channels": 24, "depth": 4}, {}),
    "small, full patch (uniform loss)": ({"base_channels": 16, "depth": 4}, {"loss_window": "uniform"}),
    "small, labels only (no physics)": ({"base_channels": 16, "depth": 4}, {"physics_weight": 0, "overlap_weight": 0}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("architecture-output"))
    p.add_argument("--minutes", type=float, default=5.0, help="training budget of each candidate")
    p.add_argument("--only", default=None, help="comma-separated candidate indices (default: all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bluesky_ptychonn.core.config import NetworkConfig
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.pretrain import StreamConfig, fit_stream
    from bluesky_ptychonn.core.reconstruct import evaluate, reconstruct
    from bluesky_ptychonn.sim.family import FamilyConfig, FamilySource
    from bluesky_ptychonn.sim.physics import simulate_scan
    from bluesky_ptychonn.sim.pretraining import VALIDATION_SEED_OFFSET, base_recipe

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    family = FamilyConfig()
    held_out = FamilySource(family.model_copy(update={"seed": VALIDATION_SEED_OFFSET}))
    validation = [held_out.batch(i) for i in range(8)]
    recipe = base_recipe(np.concatenate([b.frames for b in validation]))
    tests = {
        kind: simulate_scan(object_seed=777, scan_shape=(20, 20), object_kind=kind, noise_seed=5)
        for kind in ("random_features", "circuit")
    }
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    chosen = list(CANDIDATES.items())
    if args.only:
        chosen = [chosen[int(i)] for i in args.only.split(",")]
    rows = []
    for name, (net, loss) in chosen:
        print(f"[{name}] {args.minutes} min")
        network = NetworkConfig(batch_norm=True, **net)
        config = StreamConfig(budget_s=args.minutes * 60, **loss)
        model, info = fit_stream(FamilySource(family).stream(), validation, network, recipe, config, progress=False)
        predictor = Predictor(model, info, device="cpu")
        row = {
            "candidate": name,
            "steps": info.provenance["steps"],
            "validation": {k: round(v, 4) for k, v in info.metrics["best_validation"].items()},
        }
        for kind, s in tests.items():
            quality = evaluate(reconstruct(predictor, s.frames, s.positions_m, grid=s.grid), s.obj, s.grid)
            row[kind] = {k: round(v, 3) for k, v in quality.items()}
        rows.append(row)
        print(json.dumps(row, indent=1))
    (out / "results.json").write_text(json.dumps({"machine": machine, "minutes": args.minutes, "rows": rows}, indent=2))
    lines = [
        f"Each candidate: {args.minutes} min on {machine}.",
        "",
        "| candidate | steps | val. label MAE | in-family phase Pearson / SSIM / FRC px | "
        "unseen family phase Pearson / SSIM / FRC px |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["random_features"], r["circuit"]
        lines.append(
            f"| {r['candidate']} | {r['steps']} | {r['validation']['supervised']} | "
            f"{a['phase_pearson']} / {a['phase_ssim']} / {a['phase_frc_px']} | "
            f"{b['phase_pearson']} / {b['phase_ssim']} / {b['phase_frc_px']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
