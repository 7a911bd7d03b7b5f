"""Physics simulator: complex objects, probes, scan paths and far-field diffraction with Poisson noise.

Everything here is seeded and pure numpy, so training data, tests and the simulated detector are
repeatable. Object and probe arrays share one pixel size: the real-space pixel of the detector
geometry (:meth:`~bluesky_ptychonn.core.config.DetectorGeometry.pixel_size_m`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..core.config import DetectorGeometry
from ..core.geometry import ObjectGrid, check_positions, extract_patches
from ..errors import ConfigurationError

#: Said wherever a simulated object is stored: it is the simulation's ground truth, never a measurement.
TRUTH_NOTE = "simulation ground truth: not a measurement"

# ----------------------------------------------------------------------------------------------
# Objects


def _smooth(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur by multiplication in Fourier space (periodic edges; objects are padded)."""
    if sigma_px <= 0:
        return image
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.fftfreq(image.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fy**2 + fx**2))
    return np.real(np.fft.ifft2(np.fft.fft2(image) * kernel))


def random_features_object(
    shape: tuple[int, int],
    seed: int,
    *,
    feature_px: tuple[float, float] = (6.0, 32.0),
    density: float = 0.5,
    amplitude_min: float = 0.7,
    phase_max_rad: float = 1.0,
    blur_px: float = 1.0,
) -> np.ndarray:
    """A random-features test object like the paper's etched tungsten chart.

    Rectangles, discs and bars of random size and etch depth are laid on a flat background;
    the resulting thickness map ``t`` in [0, 1] gives amplitude ``1 - (1 - amplitude_min) t`` and
    phase ``phase_max_rad * t`` (a projected-thickness sample, so amplitude and phase correlate).

    Parameters
    ----------
    shape : (int, int)
        Object pixels (rows, columns).
    seed : int
        Seed; the same seed gives the same object.
    feature_px : (float, float)
        Smallest and largest feature size in pixels.
    density : float
        Expected number of features per (largest feature size)^2 of area.

    Returns
    -------
    numpy.ndarray
        complex64 transmission function of shape ``shape``.
    """
    rng = np.random.default_rng(seed)
    rows, cols = shape
    thickness = np.zeros(shape, np.float32)
    n_features = max(1, int(density * rows * cols / feature_px[1] ** 2 * 4))
    for _ in range(n_features):
        cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
        size = np.exp(rng.uniform(np.log(feature_px[0]), np.log(feature_px[1])))
        depth = rng.uniform(0.3, 1.0)
        kind = rng.integers(3)
        # Draw each feature inside its own bounding box: the object may be thousands of pixels wide.
        y0, y1 = max(0, int(cy - size - 2)), min(rows, int(cy + size + 3))
        x0, x1 = max(0, int(cx - size - 2)), min(cols, int(cx + size + 3))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        if kind == 0:  # rectangle
            h, w = size * rng.uniform(0.4, 1.0, 2)
            mask = (np.abs(yy - cy) < h / 2) & (np.abs(xx - cx) < w / 2)
        elif kind == 1:  # disc
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 2) ** 2
        else:  # bar at a random angle
            angle = rng.uniform(0, np.pi)
            along = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
            across = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
            mask = (np.abs(along) < size) & (np.abs(across) < max(1.5, size / 6))
        box = thickness[y0:y1, x0:x1]
        box[mask] = np.maximum(box[mask], depth)
    thickness = np.clip(_smooth(thickness, blur_px), 0, 1)
    return object_from_maps(1 - (1 - amplitude_min) * thickness, phase_max_rad * thickness)


def circuit_object(
    shape: tuple[int, int],
    seed: int,
    *,
    line_px: tuple[int, int] = (2, 6),
    length_px: tuple[int, int] = (10, 60),
    amplitude_min: float = 0.5,
    phase_max_rad: float = 1.5,
) -> np.ndarray:
    """An integrated-circuit-like object: Manhattan wires of two etch depths, sharp-edged.

    A second sample family, unlike :func:`random_features_object` in its shapes (thin straight
    lines, no discs), edges (less blur) and contrast: the out-of-family test case of trust maps.
    """
    rng = np.random.default_rng(seed)
    rows, cols = shape
    thickness = np.zeros(shape, np.float32)
    for _ in range(max(1, rows * cols // 300)):
        y, x = int(rng.integers(0, rows)), int(rng.integers(0, cols))
        length = int(rng.integers(*length_px))
        width = int(rng.integers(*line_px))
        depth = rng.choice([0.5, 1.0])
        if rng.random() < 0.5:
            thickness[y : y + width, x : x + length] = depth
        else:
            thickness[y : y + length, x : x + width] = depth
    thickness = np.clip(_smooth(thickness, 0.7), 0, 1)
    return object_from_maps(1 - (1 - amplitude_min) * thickness, phase_max_rad * thickness)


def object_from_maps(amplitude: np.ndarray, phase_rad: np.ndarray) -> np.ndarray:
    """Complex transmission from an amplitude map and a phase map (radians) of the same shape."""
    amplitude, phase_rad = np.asarray(amplitude), np.asarray(phase_rad)
    if amplitude.shape != phase_rad.shape or amplitude.ndim != 2:
        raise ConfigurationError(f"amplitude {amplitude.shape} and phase {phase_rad.shape} must be equal 2-D shapes")
    return (amplitude * np.exp(1j * phase_rad)).astype(np.complex64)


def object_from_images(
    amplitude_image: np.ndarray,
    phase_image: np.ndarray,
    *,
    amplitude_range: tuple[float, float] = (0.7, 1.0),
    phase_range_rad: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """An object whose amplitude and phase are two images, each rescaled linearly into a range."""

    def rescale(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
        img = np.asarray(img, np.float64)
        span = img.max() - img.min()
        unit = (img - img.min()) / span if span > 0 else np.zeros_like(img)
        return lo + (hi - lo) * unit

    return object_from_maps(rescale(amplitude_image, *amplitude_range), rescale(phase_image, *phase_range_rad))


# ----------------------------------------------------------------------------------------------
# Probes


def zone_plate_probe(
    n: int, *, pupil_radius_px: float = 10.0, central_stop: float = 0.4, defocus_rad: float = 6.0
) -> np.ndarray:
    """A focused, zone-plate-like probe: an annular pupil with a quadratic defocus phase.

    The pupil lives in the detector (far-field) plane: ``pupil_radius_px`` detector pixels of
    radius, obscured by a central stop of that fraction, and ``defocus_rad`` radians of phase at
    the pupil edge. The probe is its inverse Fourier transform, centred at ``(n - 1) / 2``,
    normalised to unit total intensity.
    """
    k = np.arange(n) - n // 2
    ky, kx = np.meshgrid(k, k, indexing="ij")
    r = np.hypot(ky, kx) / pupil_radius_px
    pupil = ((r <= 1) & (r >= central_stop)).astype(np.complex128) * np.exp(1j * defocus_rad * r**2)
    # Half-pixel phase ramp so that the real-space centre falls at (n-1)/2, not n/2.
    ramp = np.exp(1j * np.pi * (ky + kx) / n)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil * ramp)))
    return _unit_power(probe)


def gaussian_probe(n: int, *, fwhm_px: float = 16.0) -> np.ndarray:
    """A Gaussian probe of the given intensity FWHM, centred at ``(n - 1) / 2``, unit total intensity."""
    c = (n - 1) / 2
    y, x = np.mgrid[0:n, 0:n] - c
    sigma_amp = fwhm_px / (2 * np.sqrt(2 * np.log(2))) * np.sqrt(2)
    return _unit_power(np.exp(-(y**2 + x**2) / (2 * sigma_amp**2)).astype(np.complex128))


def _unit_power(probe: np.ndarray) -> np.ndarray:
    return (probe / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)


def make_probe(kind: Literal["zone_plate", "gaussian"], n: int, **params: float) -> np.ndarray:
    """Build a probe from a description (as stored in run metadata): ``kind`` plus its parameters."""
    builders: dict[str, Callable[..., np.ndarray]] = {"zone_plate": zone_plate_probe, "gaussian": gaussian_probe}
    if kind not in builders:
        raise ConfigurationError(f"unknown probe kind {kind!r}; expected one of {sorted(builders)}")
    try:
        return builders[kind](n, **params)
    except TypeError as err:
        raise ConfigurationError(f"bad parameters {params} for a {kind} probe: {err}") from err


def probe_diameter_px(probe: np.ndarray) -> float:
    """Probe diameter as twice the intensity-weighted RMS radius (about the FWHM for a Gaussian x 1.7)."""
    intensity = np.abs(probe) ** 2
    n = probe.shape[0]
    y, x = np.mgrid[0:n, 0:n] - (n - 1) / 2
    return float(2 * np.sqrt(np.sum(intensity * (y**2 + x**2)) / intensity.sum()))


# ----------------------------------------------------------------------------------------------
# Scan paths


def scan_positions(
    kind: Literal["raster", "snake", "fermat"],
    *,
    step_m: float,
    shape: tuple[int, int] = (10, 10),
    n_points: int | None = None,
    jitter_m: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Probe positions (N, 2) in (y, x) metres, centred on (0, 0).

    ``raster`` and ``snake`` visit ``shape`` = (rows, columns) points with ``step_m`` between
    neighbours (snake reverses every other row). ``fermat`` places ``n_points`` (default
    rows x columns) on a Fermat spiral whose mean nearest-neighbour spacing is about ``step_m``.
    ``jitter_m`` adds Gaussian position errors, so positions are sub-pixel in general.
    """
    if not step_m > 0:
        raise ConfigurationError(f"scan step must be positive, got {step_m!r} m")
    if jitter_m < 0:
        raise ConfigurationError(f"jitter must be non-negative, got {jitter_m!r} m")
    rows, cols = shape
    if rows < 1 or cols < 1:
        raise ConfigurationError(f"scan shape must be positive, got {shape!r}")
    if kind in ("raster", "snake"):
        iy, ix = np.mgrid[0:rows, 0:cols].astype(np.float64)
        if kind == "snake":
            ix[1::2] = ix[1::2, ::-1]
        pos = np.stack([iy.ravel() - (rows - 1) / 2, ix.ravel() - (cols - 1) / 2], axis=1) * step_m
    elif kind == "fermat":
        n = n_points or rows * cols
        golden = np.pi * (3 - np.sqrt(5))
        k = np.arange(n)
        r = step_m * np.sqrt(k / np.pi) * 1.05  # area per point ~ step^2
        pos = np.stack([r * np.sin(k * golden), r * np.cos(k * golden)], axis=1)
    else:
        raise ConfigurationError(f"unknown scan kind {kind!r}; expected 'raster', 'snake' or 'fermat'")
    if jitter_m:
        pos = pos + np.random.default_rng(seed).normal(0, jitter_m, pos.shape)
    return pos


# ----------------------------------------------------------------------------------------------
# Forward model


def far_field(exit_waves: np.ndarray) -> np.ndarray:
    """Noiseless far-field intensities |FFT(exit wave)|^2 of (N, n, n) waves, zero frequency at n // 2."""
    # Orthonormal FFT: total intensity is conserved, so counts are photons.
    spectrum = np.fft.fftshift(np.fft.fft2(exit_waves, axes=(-2, -1), norm="ortho"), axes=(-2, -1))
    return (np.abs(spectrum) ** 2).astype(np.float32)


def diffraction_patterns(
    obj: np.ndarray,
    grid: ObjectGrid,
    probe: np.ndarray,
    positions_m: np.ndarray,
    *,
    photons_per_frame: float | None = 1e6,
    seed: int = 0,
) -> np.ndarray:
    """Simulated detector frames (N, n, n) for a probe scanned over an object.

    The probe has unit total intensity, so a fully transmitting object gives ``photons_per_frame``
    photons per frame on average; Poisson noise is drawn with ``seed``. ``photons_per_frame=None``
    returns the noiseless float32 intensities instead of uint32 counts.
    """
    n = probe.shape[0]
    patches = extract_patches(obj, grid.patch_corners(positions_m, n), n)
    intensity = far_field(patches * probe)
    if photons_per_frame is None:
        return intensity
    if not photons_per_frame > 0:
        raise ConfigurationError(f"photons per frame must be positive, got {photons_per_frame!r}")
    rng = np.random.default_rng(seed)
    return rng.poisson(intensity * photons_per_frame).astype(np.uint32)


@dataclass
class SimulatedScan:
    """A simulated scan and its ground truth.

    Attributes
    ----------
    frames : (N, n, n) uint32
        Detector counts, zero frequency at the frame centre.
    positions_m : (N, 2) float64
        Probe centres (y, x) in metres, as recorded (with jitter).
    frame_ids : (N,) int64
        Index of each frame in the detector's stream.
    obj : (H, W) complex64
        Ground-truth transmission on ``grid`` (simulation truth, not a measurement).
    grid : ObjectGrid
        The object's grid; its pixel size is the geometry's real-space pixel.
    probe : (n, n) complex64
    geometry : DetectorGeometry
    metadata : dict
        How the scan was made (object seed, probe description, scan kind, step, photons).
    """

    frames: np.ndarray
    positions_m: np.ndarray
    frame_ids: np.ndarray
    obj: np.ndarray
    grid: ObjectGrid
    probe: np.ndarray
    geometry: DetectorGeometry
    metadata: dict = field(default_factory=dict)

    def truth_patches(self, patch_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth (amplitude, phase) patches (N, n, n) at every position, float32."""
        n = patch_pixels or self.probe.shape[0]
        patches = extract_patches(self.obj, self.grid.patch_corners(self.positions_m, n), n)
        return np.abs(patches).astype(np.float32), np.angle(patches).astype(np.float32)


def simulate_scan(
    *,
    geometry: DetectorGeometry | None = None,
    object_seed: int = 0,
    scan_kind: Literal["raster", "snake", "fermat"] = "raster",
    scan_shape: tuple[int, int] = (20, 20),
    overlap: float = 0.5,
    step_m: float | None = None,
    jitter_fraction: float = 0.05,
    probe: dict | None = None,
    photons_per_frame: float | None = 1e6,
    noise_seed: int = 0,
    obj: np.ndarray | None = None,
    object_kind: Literal["random_features", "circuit"] = "random_features",
) -> SimulatedScan:
    """Simulate a whole scan of a random object of ``object_kind`` (or of ``obj``, on a grid it must cover).

    The step is ``(1 - overlap) x`` the probe diameter (:func:`probe_diameter_px`) unless
    ``step_m`` is given; jitter is ``jitter_fraction`` of the step.
    """
    geometry = geometry or DetectorGeometry()
    n = geometry.frame_pixels
    pixel = geometry.pixel_size_m()
    probe_desc = dict(probe or {"kind": "zone_plate"})
    probe_arr = make_probe(probe_desc.pop("kind"), n, **probe_desc)
    if step_m is None:
        if not 0 <= overlap < 1:
            raise ConfigurationError(f"overlap must be in [0, 1), got {overlap!r}")
        step_m = (1 - overlap) * probe_diameter_px(probe_arr) * pixel
    positions = scan_positions(
        scan_kind, step_m=step_m, shape=scan_shape, jitter_m=jitter_fraction * step_m, seed=noise_seed + 1
    )
    grid = ObjectGrid.covering(positions, pixel, n)
    given = obj is not None
    if obj is None:
        families: dict[str, Callable[..., np.ndarray]] = {
            "random_features": random_features_object,
            "circuit": circuit_object,
        }
        if object_kind not in families:
            raise ConfigurationError(f"unknown object kind {object_kind!r}; expected one of {sorted(families)}")
        obj = families[object_kind](grid.shape, object_seed)
    elif obj.shape != grid.shape:
        raise ConfigurationError(f"object shape {obj.shape} does not match the scan's grid {grid.shape}")
    frames = diffraction_patterns(obj, grid, probe_arr, positions, photons_per_frame=photons_per_frame, seed=noise_seed)
    metadata = {
        "object": {"kind": "given" if given else object_kind, "seed": object_seed},
        "probe": probe or {"kind": "zone_plate"},
        "scan": {"kind": scan_kind, "shape": list(scan_shape), "step_m": step_m, "jitter_m": jitter_fraction * step_m},
        "photons_per_frame": photons_per_frame,
        "noise_seed": noise_seed,
    }
    return SimulatedScan(
        frames=frames,
        positions_m=check_positions(positions),
        frame_ids=np.arange(len(positions), dtype=np.int64),
        obj=obj,
        grid=grid,
        probe=probe_arr,
        geometry=geometry,
        metadata=metadata,
    )
