"""Pretrain a base model for a geometry on the endless simulated family (:mod:`.family`).

The recipe makes the model flux-independent (``normalize="total"``, square root, a scale fitted
on the validation frames); the checkpoint records the family, the budget, the machine and the
command, and the out-of-domain threshold of its trust maps, set on validation frames lit by the
default probe (as :func:`~bluesky_ptychonn.core.training.fit` sets it on a validation block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.checkpoint import CheckpointInfo, save_checkpoint
from ..core.config import NetworkConfig, PreprocessRecipe
from ..core.network import PtychoNN
from ..core.preprocess import fitted_scale
from ..core.pretrain import StreamConfig, fit_stream
from .family import FamilyConfig, FamilySource

#: Validation batches come from this seed offset: a stream the training never draws from.
VALIDATION_SEED_OFFSET = 1_000_003


def base_recipe(frames: np.ndarray) -> PreprocessRecipe:
    """Whole frames, each normalised to its total, square root, scaled to a mean of 0.1 on ``frames``."""
    recipe = PreprocessRecipe(frame_shape=tuple(frames.shape[1:]), normalize="total", transform="sqrt")  # type: ignore[arg-type]
    return recipe.model_copy(update={"scale": fitted_scale(frames, recipe)})


def pretrain(
    family: FamilyConfig | None = None,
    network: NetworkConfig | None = None,
    config: StreamConfig | None = None,
    *,
    out: str | Path | None = None,
    probe: np.ndarray | None = None,
    validation_batches: int = 8,
    device: str = "auto",
    command: str | None = None,
    progress: bool = True,
) -> tuple[PtychoNN, CheckpointInfo]:
    """Train a base model on fresh simulated frames; write it to ``out`` as it goes (best weights)."""
    from ..core.consistency import ConsistencyModel, out_of_domain_threshold
    from ..core.inference import Predictor

    family = family or FamilyConfig()
    n = family.geometry.frame_pixels
    network = network or NetworkConfig.small(n).model_copy(update={"batch_norm": True})
    source = FamilySource(family, probe)
    held_out = FamilySource(family.model_copy(update={"seed": family.seed + VALIDATION_SEED_OFFSET}), probe)
    validation = [held_out.batch(i) for i in range(validation_batches)]
    recipe = base_recipe(np.concatenate([b.frames for b in validation]))
    provenance: dict[str, Any] = {
        "kind": "pretrained base model",
        "family": family.model_dump(mode="json"),
        "probe": {"kind": "zone_plate"} if probe is None else {"kind": "given"},
        "label_source": "simulation truth of the family (fresh frames every step)",
        "geometry": family.geometry.model_dump(mode="json"),
        **({"command": command} if command else {}),
    }
    model, info = fit_stream(
        source.stream(),
        validation,
        network,
        recipe,
        config,
        device=device,
        out=out,
        provenance=provenance,
        progress=progress,
    )
    # Trust-map calibration on the frames lit by the default (or given) probe.
    predictor = Predictor(model, info, device=device)
    errors = []
    consistency = ConsistencyModel(source.default_probe, recipe, predictor.device)
    for batch in validation:
        lit = np.flatnonzero(np.all(batch.probes[batch.probe_index] == source.default_probe, axis=(1, 2)))
        if len(lit):
            amplitude, phase = predictor.predict(batch.frames[lit])
            errors.append(consistency.score(amplitude, phase, batch.frames[lit]).error)
    if errors:
        info.metrics["consistency"] = out_of_domain_threshold(np.concatenate(errors))
    if out is not None:
        info = save_checkpoint(out, model, info)
    return model, info
