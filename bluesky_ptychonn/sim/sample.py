"""The simulated experiment: samples on the stage, the detector's settings and the fly trajectory.

Pure description (numpy and pydantic, no bluesky, ophyd or tiled); :mod:`bluesky_ptychonn.acquisition.devices`
turns it into ophyd devices and :mod:`bluesky_ptychonn.acquisition.plans` into a plan.

A :class:`SimulatedSample` stands for a physical sample on the stage. Its transmission function
is generated lazily (seeded, so it is the same every time) and cached, on a pixel grid whose
centre is the stage origin: the stage position (y, x) is the probe centre in sample coordinates.
A later scan of "a new region of the same sample" is a scan with another centre; its frames and
the stored ground truth come from the same object.

Samples are looked up by id in a :class:`SampleRegistry`; an unknown id is a
:class:`~bluesky_ptychonn.errors.ConfigurationError`.

Trajectory model (:class:`FlyTrajectory`): the fast axis is x. Along a line the stage moves at
``step_m / period_s`` and passes the nominal point of frame ``k`` at the middle of its exposure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ..core.config import DetectorGeometry, Frozen, validated
from ..core.geometry import GRID_MARGIN_PIXELS, ObjectGrid, check_positions
from ..errors import ConfigurationError, PositionError
from ..tiled_paths import tiled_key
from .physics import make_probe, random_features_object, scan_positions

#: The generator behind :meth:`SimulatedSample.object`, recorded with every truth.
OBJECT_GENERATOR = "bluesky_ptychonn.sim.physics.random_features_object"


@dataclass(frozen=True)
class SimulatedSample:
    """A seeded random-features sample, generated on first use and cached.

    Attributes
    ----------
    sample_id : str
        Name used in run metadata and Tiled paths: one Tiled key (letters, digits, ``-``, ``_`` and ``.``).
    seed : int
        Seed of :func:`~bluesky_ptychonn.sim.physics.random_features_object`.
    shape_px : (int, int)
        Object pixels (rows, columns).
    pixel_size_m : float
        Object pixel pitch in metres; it must equal the detector's real-space pixel.
    """

    sample_id: str
    seed: int
    shape_px: tuple[int, int]
    pixel_size_m: float

    def __post_init__(self) -> None:
        tiled_key(self.sample_id, "sample id")  # it names the sample's truth in Tiled
        if len(self.shape_px) != 2 or min(self.shape_px) < 8:
            raise ConfigurationError(f"sample shape must be two integers >= 8 pixels, got {self.shape_px!r}")
        if not (np.isfinite(self.pixel_size_m) and self.pixel_size_m > 0):
            raise ConfigurationError(f"sample pixel size must be positive, got {self.pixel_size_m!r} m")

    @classmethod
    def for_geometry(
        cls, sample_id: str, geometry: DetectorGeometry, *, seed: int = 0, shape_px: tuple[int, int] = (2048, 2048)
    ) -> SimulatedSample:
        """A sample whose pixel is the real-space pixel of ``geometry`` (no crop, no binning)."""
        return cls(sample_id=sample_id, seed=seed, shape_px=tuple(shape_px), pixel_size_m=geometry.pixel_size_m())  # type: ignore[arg-type]

    @property
    def grid(self) -> ObjectGrid:
        """The whole sample's grid, centred on stage position (0, 0)."""
        rows, cols = self.shape_px
        half = ((rows - 1) / 2 * self.pixel_size_m, (cols - 1) / 2 * self.pixel_size_m)
        return ObjectGrid(shape=self.shape_px, pixel_size_m=self.pixel_size_m, origin_m=(-half[0], -half[1]))

    @cached_property
    def object(self) -> np.ndarray:
        """The complex64 transmission function (rows, columns); generated once per instance."""
        return random_features_object(self.shape_px, self.seed)

    def check_pixel(self, geometry: DetectorGeometry) -> None:
        """Raise :class:`ConfigurationError` unless ``geometry``'s real-space pixel is the sample's."""
        pixel = geometry.pixel_size_m()
        if not np.isclose(pixel, self.pixel_size_m, rtol=1e-9, atol=0):
            raise ConfigurationError(
                f"sample {self.sample_id!r} has {self.pixel_size_m:.6g} m pixels but the detector geometry gives "
                f"{pixel:.6g} m (energy {geometry.energy_ev} eV, distance {geometry.distance_m} m, "
                f"{geometry.frame_pixels} x {geometry.detector_pixel_m} m pixels): register a sample for this geometry"
            )

    def region(
        self, positions_m: np.ndarray, patch_pixels: int, margin_pixels: int = GRID_MARGIN_PIXELS
    ) -> tuple[ObjectGrid, tuple[slice, slice]]:
        """The sample-aligned sub-grid that holds a patch at every position, and its slices in the sample.

        The region's pixels are the sample's own pixels (integer offsets), so cutting the truth
        by the slices gives exactly the region's ground truth.
        """
        pos = check_positions(positions_m)
        half = (patch_pixels - 1) / 2 + margin_pixels
        lo = np.floor(self.grid.to_pixels(pos.min(axis=0)[None])[0] - half).astype(int)
        hi = np.ceil(self.grid.to_pixels(pos.max(axis=0)[None])[0] + half).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.shape_px)
        if np.any(hi <= lo):
            raise ConfigurationError(f"positions {pos.min(axis=0)}..{pos.max(axis=0)} m are off {self.sample_id!r}")
        origin = self.grid.to_metres(lo.astype(float)[None])[0]
        shape = (int(hi[0] - lo[0]), int(hi[1] - lo[1]))
        grid = ObjectGrid(shape=shape, pixel_size_m=self.pixel_size_m, origin_m=(float(origin[0]), float(origin[1])))
        return grid, (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])))

    def as_metadata(self) -> dict:
        """JSON-ready description: enough to regenerate the object with :func:`random_features_object`."""
        return {
            "sample_id": self.sample_id,
            "kind": "simulated",
            "generator": OBJECT_GENERATOR,
            "seed": self.seed,
            "shape_px": list(self.shape_px),
            "pixel_size_m": self.pixel_size_m,
            "grid": self.grid.as_metadata(),
        }


@dataclass
class SampleRegistry:
    """Known samples by id. Looking up an unknown id raises :class:`ConfigurationError`."""

    _samples: dict[str, SimulatedSample] = field(default_factory=dict)

    def register(self, sample: SimulatedSample, *, replace: bool = False) -> SimulatedSample:
        """Add ``sample``; re-registering an id with a different definition needs ``replace=True``."""
        old = self._samples.get(sample.sample_id)
        if old is not None and old != sample and not replace:
            raise ConfigurationError(f"sample id {sample.sample_id!r} is already registered as {old}")
        if old is None or old != sample:
            self._samples[sample.sample_id] = sample
        return self._samples[sample.sample_id]

    def get(self, sample_id: str) -> SimulatedSample:
        """The sample registered as ``sample_id``."""
        try:
            return self._samples[sample_id]
        except KeyError:
            raise ConfigurationError(f"unknown sample {sample_id!r}; known samples: {sorted(self._samples)}") from None

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._samples

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._samples))


# ----------------------------------------------------------------------------------------------
# What the detector is prepared with: its settings and the fly trajectory


class DetectorSettings(Frozen):
    """How the simulated detector exposes, counts and writes."""

    geometry: DetectorGeometry = Field(default_factory=DetectorGeometry, description="Energy and detector geometry.")
    probe: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "zone_plate"},
        description="Probe description for simulate.make_probe: 'kind' plus its parameters.",
    )
    exposure_s: float = Field(1e-3, gt=0, description="Exposure time of one frame in seconds.")
    readout_s: float = Field(0.0, ge=0, description="Dead time between exposures; period = exposure + readout.")
    photons_per_frame: float = Field(1e6, gt=0, description="Mean photons per frame through free space.")
    encoder_noise_m: float = Field(2e-9, ge=0, description="Standard deviation of the recorded encoder positions.")
    blur_samples: int = Field(1, ge=1, le=16, description="Positions averaged per exposure (motion blur).")
    chunk_frames: int = Field(32, ge=1, description="Frames computed, written and flushed together.")
    paced: bool = Field(False, description="Produce frames no faster than the frame rate (real-time behaviour).")
    seed: int = Field(0, description="Seed of photon and encoder noise.")

    @model_validator(mode="after")
    def _check_probe(self) -> DetectorSettings:
        params = dict(self.probe)
        kind = params.pop("kind", None)
        make_probe(kind, self.geometry.frame_pixels, **params)  # raises on a bad description
        return self

    @property
    def period_s(self) -> float:
        """Frame period (exposure plus readout) in seconds."""
        return self.exposure_s + self.readout_s

    def probe_array(self) -> np.ndarray:
        """The complex64 probe (n, n) the description stands for."""
        params = dict(self.probe)
        return make_probe(params.pop("kind"), self.geometry.frame_pixels, **params)

    def updated(self, **changes: Any) -> DetectorSettings:
        """A validated copy with ``changes`` (``model_copy`` would skip validation)."""
        return validated(DetectorSettings, {**self.model_dump(), **changes})  # type: ignore[return-value]


@dataclass(frozen=True)
class FlyTrajectory:
    """A continuous raster or snake trajectory: x flies along each line, y steps between lines."""

    kind: Literal["raster", "snake"]
    shape: tuple[int, int]
    step_m: float
    center_m: tuple[float, float]
    period_s: float
    exposure_s: float

    def __post_init__(self) -> None:
        if self.kind not in ("raster", "snake"):
            raise ConfigurationError(f"fly-scan kind must be 'raster' or 'snake', got {self.kind!r}")
        if len(self.shape) != 2 or any(int(v) != v or v < 1 for v in self.shape):
            raise ConfigurationError(f"scan shape must be two positive integers (rows, columns), got {self.shape!r}")
        if not (np.isfinite(self.step_m) and self.step_m > 0):
            raise ConfigurationError(f"scan step must be positive, got {self.step_m!r} m")
        if not (np.isfinite(self.exposure_s) and self.exposure_s > 0):
            raise ConfigurationError(f"exposure must be positive, got {self.exposure_s!r} s")
        if not self.period_s >= self.exposure_s:
            raise ConfigurationError(f"frame period {self.period_s!r} s is shorter than exposure {self.exposure_s!r} s")
        if len(self.center_m) != 2 or not np.all(np.isfinite(self.center_m)):
            raise ConfigurationError(f"scan centre must be a finite (y, x) pair in metres, got {self.center_m!r}")

    @property
    def num_points(self) -> int:
        """Frames in the scan."""
        return self.shape[0] * self.shape[1]

    @property
    def velocity_m_s(self) -> float:
        """Speed of the fast axis while flying."""
        return self.step_m / self.period_s

    def positions_m(self) -> np.ndarray:
        """Nominal probe positions (N, 2) (y, x): the stage at the middle of each exposure."""
        return scan_positions(self.kind, step_m=self.step_m, shape=self.shape) + np.asarray(self.center_m)

    def blur_offsets_m(self, samples: int) -> np.ndarray:
        """x offsets, symmetric about the exposure middle, of ``samples`` points along one exposure."""
        return ((np.arange(samples) + 0.5) / samples - 0.5) * self.velocity_m_s * self.exposure_s

    def envelope_m(self, blur_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest (y, x) the stage reaches while exposing, in metres."""
        pos = self.positions_m()
        half = np.array([0.0, abs(self.blur_offsets_m(blur_samples)[0]) if blur_samples > 1 else 0.0])
        return pos.min(axis=0) - half, pos.max(axis=0) + half

    def as_metadata(self) -> dict:
        """JSON-ready description, in SI units."""
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "step_m": self.step_m,
            "center_m": list(self.center_m),
            "num_points": self.num_points,
            "fast_axis": "x",
            "period_s": self.period_s,
            "exposure_s": self.exposure_s,
            "velocity_m_s": self.velocity_m_s,
        }


@dataclass(frozen=True)
class FlyScan:
    """What :meth:`PtychoDetector.prepare` takes: the trajectory, the settings and the sample."""

    trajectory: FlyTrajectory
    settings: DetectorSettings
    sample: SimulatedSample
    file_stem: str | None = None

    def check(self) -> None:
        """Raise unless the sample matches the geometry and every exposure stays on the sample."""
        self.sample.check_pixel(self.settings.geometry)
        lo, hi = self.trajectory.envelope_m(self.settings.blur_samples)
        corners = np.array([lo, hi, [lo[0], hi[1]], [hi[0], lo[1]]])
        try:
            self.sample.grid.patch_corners(corners, self.settings.geometry.frame_pixels)
        except PositionError as err:
            extent = self.sample.grid.extent_m()
            raise PositionError(
                f"the scan reaches (y, x) {lo.tolist()}..{hi.tolist()} m, beyond sample {self.sample.sample_id!r} "
                f"(x {extent[0]:.4g}..{extent[1]:.4g} m, y {extent[3]:.4g}..{extent[2]:.4g} m, less half a frame)"
            ) from err


def default_registry() -> SampleRegistry:
    """The process-wide registry; it starts with two 2048 x 2048 samples for the default geometry."""
    return _DEFAULT


_DEFAULT = SampleRegistry()
for _seed in (0, 1):
    _DEFAULT.register(SimulatedSample.for_geometry(f"sim-features-{_seed}", DetectorGeometry(), seed=_seed))
