"""Training data without limit: a seeded source of fresh simulated frames for pretraining.

Every batch is made on demand from ``(seed, batch index)`` alone, so a stream is reproducible
from its seed, can be resumed at any batch, and is never stored. A batch is a few *scenes*: one
freshly drawn object, probe, photon count and scan step, with a small raster of jittered
positions on it, so that neighbouring frames overlap and the overlap constraint of
:mod:`~bluesky_ptychonn.core.physics_loss` has pairs to compare.

Objects come from three families: the random-features chart of
:func:`~bluesky_ptychonn.sim.physics.random_features_object` (varied feature sizes, densities,
thicknesses and phase ranges), *two-image* objects whose amplitude and phase are independent
charts (so the network cannot copy one into the other), and smooth random *textures*. The
circuit family (:func:`~bluesky_ptychonn.sim.physics.circuit_object`) is deliberately absent: it
is the held-out family of the evaluations.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..core.config import DetectorGeometry, Frozen
from ..core.geometry import ObjectGrid, extract_patches
from ..core.physics_loss import OverlapPairs, PhysicsBatch
from .physics import (
    _smooth,
    diffraction_patterns,
    make_probe,
    object_from_maps,
    probe_diameter_px,
    random_features_object,
    scan_positions,
)

ObjectKind = Literal["random_features", "two_image", "texture"]


class FamilyConfig(Frozen):
    """What the source draws from; every range is sampled uniformly (photons log-uniformly)."""

    geometry: DetectorGeometry = Field(default_factory=DetectorGeometry)
    seed: int = Field(0, description="Seed of the whole stream.")
    objects: tuple[ObjectKind, ...] = Field(("random_features", "two_image", "texture"))
    object_weights: tuple[float, ...] = Field((0.6, 0.25, 0.15), description="Probability of each object kind.")
    phase_max_rad: tuple[float, float] = Field((0.3, 2.0), description="Phase of the thickest feature.")
    amplitude_min: tuple[float, float] = Field((0.4, 0.95), description="Amplitude of the thickest feature.")
    feature_px: tuple[float, float] = Field((3.0, 40.0), description="Range of feature sizes (pixels).")
    photons_per_frame: tuple[float, float] = Field((1e4, 1e7))
    step_fraction: tuple[float, float] = Field((0.2, 1.0), description="Scan step over the probe diameter.")
    jitter_fraction: tuple[float, float] = Field((0.0, 0.1), description="Position jitter over the step.")
    default_probe_fraction: float = Field(
        0.6, ge=0, le=1, description="Share of scenes lit by the geometry's default probe (or the given one)."
    )
    defocus_rad: tuple[float, float] = Field((2.0, 10.0), description="Zone-plate defocus of varied probes.")
    pupil_radius_px: tuple[float, float] = Field((8.0, 12.0), description="Zone-plate aperture of varied probes.")
    central_stop: tuple[float, float] = Field((0.0, 0.5))
    scene_points: int = Field(3, ge=2, description="Scan points per side of each scene's raster.")
    scenes_per_batch: int = Field(4, ge=1)


class FamilySource:
    """Fresh simulated batches, reproducible from ``config.seed`` and the batch index.

    ``probe`` (an (n, n) array, for example a run's stored probe) replaces the geometry's default
    zone plate as the probe of ``default_probe_fraction`` of the scenes.
    """

    def __init__(self, config: FamilyConfig | None = None, probe: np.ndarray | None = None) -> None:
        self.config = config or FamilyConfig()
        n = self.config.geometry.frame_pixels
        self.default_probe = make_probe("zone_plate", n) if probe is None else np.asarray(probe, np.complex64)
        self.pixel_m = self.config.geometry.pixel_size_m()

    def batch(self, index: int) -> PhysicsBatch:
        """The batch at ``index`` of the stream (the same arrays every time)."""
        rng = np.random.default_rng([self.config.seed, index])
        return PhysicsBatch.concatenate([self._scene(rng) for _ in range(self.config.scenes_per_batch)])

    def stream(self, start: int = 0):
        """Batches ``start``, ``start + 1``, ... without end."""
        index = start
        while True:
            yield self.batch(index)
            index += 1

    def _probe(self, rng: np.random.Generator) -> np.ndarray:
        c, n = self.config, self.config.geometry.frame_pixels
        if rng.random() < c.default_probe_fraction:
            return self.default_probe
        return make_probe(
            "zone_plate",
            n,
            pupil_radius_px=rng.uniform(*c.pupil_radius_px),
            central_stop=rng.uniform(*c.central_stop),
            defocus_rad=rng.uniform(*c.defocus_rad),
        )

    def _scene(self, rng: np.random.Generator) -> PhysicsBatch:
        c, n = self.config, self.config.geometry.frame_pixels
        probe = self._probe(rng)
        step = rng.uniform(*c.step_fraction) * probe_diameter_px(probe) * self.pixel_m
        k = c.scene_points
        positions = scan_positions(
            "raster",
            step_m=step,
            shape=(k, k),
            jitter_m=rng.uniform(*c.jitter_fraction) * step,
            seed=int(rng.integers(2**31)),
        )
        grid = ObjectGrid.covering(positions, self.pixel_m, n)
        obj = self._object(rng, grid.shape)
        flux = float(np.exp(rng.uniform(*np.log(c.photons_per_frame))))
        frames = diffraction_patterns(
            obj, grid, probe, positions, photons_per_frame=flux, seed=int(rng.integers(2**31))
        )
        corners = grid.patch_corners(positions, n)
        patches = extract_patches(obj, corners, n)
        # Right and lower neighbours in the raster: each overlapping pair once.
        idx = np.arange(k * k).reshape(k, k)
        i = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
        j = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
        return PhysicsBatch(
            frames=frames,
            amplitude=np.abs(patches).astype(np.float32),
            phase=np.angle(patches).astype(np.float32),
            probes=probe[None],
            probe_index=np.zeros(len(frames), np.int64),
            pairs=OverlapPairs(i, j, (corners[j] - corners[i]).astype(np.float32)),
            photons=np.full(len(frames), flux),
        )

    def _object(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        c = self.config
        kind = rng.choice(len(c.objects), p=np.asarray(c.object_weights) / np.sum(c.object_weights))
        amp_min, phase_max = rng.uniform(*c.amplitude_min), rng.uniform(*c.phase_max_rad)

        def chart() -> np.ndarray:
            lo = rng.uniform(c.feature_px[0], c.feature_px[1] / 3)
            hi = rng.uniform(max(lo * 1.5, c.feature_px[1] / 3), c.feature_px[1])
            obj = random_features_object(
                shape,
                int(rng.integers(2**31)),
                feature_px=(lo, hi),
                density=rng.uniform(0.2, 1.0),
                blur_px=rng.uniform(0.3, 1.5),
            )
            return 1 - (1 - np.abs(obj)) / 0.3  # the chart's thickness in [0, 1] (its amplitude_min is 0.7)

        name = c.objects[kind]
        if name == "random_features":
            t = chart()
            return object_from_maps(1 - (1 - amp_min) * t, phase_max * t)
        if name == "two_image":
            return object_from_maps(1 - (1 - amp_min) * chart(), phase_max * chart())
        noise = _smooth(rng.standard_normal(shape), rng.uniform(1.0, 8.0))
        t = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-12)
        return object_from_maps(1 - (1 - amp_min) * t, phase_max * t)
