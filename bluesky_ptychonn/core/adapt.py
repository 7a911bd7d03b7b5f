"""Self-supervised adaptation to one run: no labels, only the run's frames, positions and probe.

A model is fine-tuned at test time on the physics alone (PtychoPINN's idea, applied to a
pretrained PtychoNN): every step takes a neighbourhood of the scan, predicts its patches, and
lowers the Poisson deviance of the forward model with the run's probe plus the disagreement of
overlapping patches (:mod:`~bluesky_ptychonn.core.physics_loss`). The global phase offset is left
free (the far field cannot see it) and tied across the scan by the overlaps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .checkpoint import CheckpointInfo
from .network import PtychoNN
from .physics_loss import OverlapPairs, PhysicsBatch
from .pretrain import StreamConfig, fit_stream

#: Self-supervised defaults: minutes on a CPU, a rate that adapts without forgetting.
ADAPT_CONFIG = StreamConfig(
    steps=5000,
    budget_s=300,
    learning_rate=2e-4,
    min_learning_rate=1e-5,
    supervised_weight=0.0,
    physics_weight=1.0,
    overlap_weight=1.0,
    validate_every=25,
)


def neighbourhoods(
    frames: np.ndarray,
    positions_m: np.ndarray,
    pixel_size_m: float,
    probe: np.ndarray,
    *,
    photons_per_frame: float | None = None,
    batch_frames: int = 32,
    max_shift_px: float | None = None,
    seed: int = 0,
) -> Iterator[PhysicsBatch]:
    """Endless unlabelled batches: the ``batch_frames`` frames nearest a random scan point, with their overlaps.

    Pairs are frames whose patch corners lie within ``max_shift_px`` (default: half the patch).
    A known ``photons_per_frame`` fixes the forward model's scale, so the amplitude's level is
    learnt too; without it the scale is fitted per frame.
    """
    if len(frames) != len(positions_m):
        raise ConfigurationError(f"{len(frames)} frames but {len(positions_m)} positions")
    n = probe.shape[-1]
    corners = np.asarray(positions_m, np.float64) / pixel_size_m
    limit = max_shift_px or n / 2
    k = min(batch_frames, len(frames))
    rng = np.random.default_rng(seed)
    probes = np.asarray(probe, np.complex64)[None]
    while True:
        centre = corners[rng.integers(len(frames))]
        idx = np.argsort(np.hypot(*(corners - centre).T), kind="stable")[:k]
        yield PhysicsBatch(
            frames=frames[idx],
            amplitude=None,
            phase=None,
            probes=probes,
            probe_index=np.zeros(k, np.int64),
            pairs=OverlapPairs.neighbours(corners[idx], limit),
            flux=None if photons_per_frame is None else np.full(k, photons_per_frame, np.float32),
        )


def adapt(
    model: PtychoNN,
    info: CheckpointInfo,
    frames: np.ndarray,
    positions_m: np.ndarray,
    probe: np.ndarray,
    pixel_size_m: float,
    *,
    photons_per_frame: float | None = None,
    config: StreamConfig = ADAPT_CONFIG,
    device: str = "auto",
    provenance: dict[str, Any] | None = None,
    out: Any = None,
    progress: bool = True,
) -> tuple[PtychoNN, CheckpointInfo]:
    """Fine-tune ``model`` on one run without labels; return the adapted model and its checkpoint info.

    ``probe`` is the run's, on the network's patch grid of ``pixel_size_m`` pixels (the recipe's
    real-space pixel for the run's geometry); ``photons_per_frame``, when known, fixes the
    forward model's scale (see :func:`neighbourhoods`).
    """

    def batches(seed: int) -> Iterator[PhysicsBatch]:
        return neighbourhoods(frames, positions_m, pixel_size_m, probe, photons_per_frame=photons_per_frame, seed=seed)

    stream = batches(config.seed)
    validation = [next(batches(config.seed + 1 + i)) for i in range(4)]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapted, new_info = fit_stream(
        stream,
        validation,
        info.network,
        info.recipe,
        config,
        device=device,
        out=out,
        initial_state=state,
        provenance={
            **info.provenance,
            **(provenance or {}),
            "adapted_from": {"content_hash": info.content_hash, "label_source": "none (self-supervised)"},
        },
        progress=progress,
    )
    return adapted, new_info
