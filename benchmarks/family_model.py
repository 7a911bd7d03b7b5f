"""The model the quality benchmarks judge: the demo's small network, trained on simulated scans of one family.

Trained once per settings and cached under ``benchmarks/results/models`` (the key hashes the
settings), so the trust and refinement benchmarks share it and a second run skips training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Training scans: objects of the random-features family, the demo's 50 %-overlap raster.
TRAIN_SEEDS = (0, 1, 2)


def family_model(quick: bool = False, device: str = "auto"):
    """A :class:`~bluesky_ptychonn.core.inference.Predictor` trained on the random-features family."""
    from bluesky_ptychonn.core.checkpoint import save_checkpoint
    from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe, TrainConfig
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.training import TrainingSet, fit
    from bluesky_ptychonn.errors import CheckpointError
    from bluesky_ptychonn.files.datasets import training_set_from_scan
    from bluesky_ptychonn.files.scanfile import ScanData
    from bluesky_ptychonn.sim.physics import simulate_scan

    rows = 16 if quick else 32
    network = NetworkConfig.small().model_copy(update={"batch_norm": True})
    config = TrainConfig(epochs=2 if quick else 5, batch_size=16, seed=0)
    settings = {"network": network.model_dump(), "train": config.model_dump(), "rows": rows, "seeds": TRAIN_SEEDS}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = HERE / "results" / "models" / f"family-{key}.safetensors"
    if path.exists():
        try:
            return Predictor.from_checkpoint(path, device=device)
        except CheckpointError as err:  # written by an older version (another hash), or damaged: train again
            print(f"   {err}; training again")
    parts = []
    for seed in TRAIN_SEEDS:
        s = simulate_scan(object_seed=seed, scan_shape=(rows, rows), noise_seed=seed)
        scan = ScanData(s.frames, s.positions_m, s.frame_ids, s.geometry, s.probe, s.obj, s.grid, s.metadata)
        parts.append(training_set_from_scan(scan, source={"simulated_object_seed": seed}))
    print(f"   training the benchmark model on {sum(len(p.frames) for p in parts)} simulated frames")
    model, info = fit(
        TrainingSet.concatenate(parts), network, PreprocessRecipe(transform="sqrt"), config, device=device
    )
    save_checkpoint(path, model, info)
    return Predictor(model, info, device=device)
