"""The start document's ``ptychography`` section: written by the plan, read by everything else.

A ptychography run describes itself in its start document, so the live callback, replay,
iterative reconstruction and training need nothing but the run. This module is the only one that
knows the section's layout: :func:`ptychography_metadata` writes it (version :data:`VERSION`),
:func:`read_section` validates and returns it, and the readers below turn it into the geometry, the
object grid, the nominal positions, the probe and the data keys.

Keys: ``version``, ``simulated``, ``sample_id``, ``energy_ev``, ``distance_m``,
``detector_pixel_m``, ``frame_pixels``, ``frame_shape``, ``pixel_size_m`` (real space),
``detector_orientation``, ``zero_frequency``, ``probe`` (for :func:`~bluesky_ptychonn.sim.physics.make_probe`),
``photons_per_frame``, ``exposure_s``, ``readout_s``, ``period_s``, ``encoder_noise_m``,
``blur_samples``, ``noise_seed``, ``scan`` (trajectory), ``positions`` (convention),
``stream_name``, ``data_keys``, ``datasets`` (HDF5 paths), ``region_grid`` (sample-aligned grid
covering the scan) and ``simulation_truth`` (where the ground truth is kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .core.config import DetectorGeometry
from .core.geometry import GRID_MARGIN_PIXELS, ObjectGrid
from .errors import RunError
from .sim.physics import TRUTH_NOTE, make_probe
from .sim.sample import FlyScan, FlyTrajectory
from .tiled_paths import truth_path

#: Name of the section in the start document.
SECTION = "ptychography"
#: Version of the section's layout; a run of another version is refused, never guessed at.
VERSION = 1
#: Default data keys of the detector stream: frames, (y, x) positions in metres, frame ids.
FRAMES_KEY, POSITIONS_KEY, FRAME_ID_KEY = "diffraction", "positions_m", "frame_id"
DATA_KEYS = {"frames": FRAMES_KEY, "positions": POSITIONS_KEY, "frame_id": FRAME_ID_KEY}
#: Default name of the stream that holds the frames.
STREAM_NAME = "primary"


def ptychography_metadata(scan: FlyScan, datasets: Mapping[str, str], stream_name: str = STREAM_NAME) -> dict:
    """The section for a simulated fly scan; ``datasets`` maps each data key to its HDF5 dataset."""
    settings, geometry, sample = scan.settings, scan.settings.geometry, scan.sample
    n = geometry.frame_pixels
    region, _ = sample.region(scan.trajectory.positions_m(), n)
    return {
        "version": VERSION,
        "simulated": True,
        "sample_id": sample.sample_id,
        **geometry.model_dump(),
        "frame_shape": [n, n],
        "pixel_size_m": geometry.pixel_size_m(),
        "detector_orientation": {"transpose": False, "flip_rows": False, "flip_cols": False},
        "zero_frequency": "frame centre, pixel (n // 2, n // 2)",
        "probe": dict(settings.probe),
        "photons_per_frame": settings.photons_per_frame,
        "exposure_s": settings.exposure_s,
        "readout_s": settings.readout_s,
        "period_s": settings.period_s,
        "encoder_noise_m": settings.encoder_noise_m,
        "blur_samples": settings.blur_samples,
        "noise_seed": settings.seed,
        "scan": scan.trajectory.as_metadata(),
        "positions": {"order": "yx", "units": "m", "meaning": "probe centre in sample coordinates (stage encoders)"},
        "stream_name": stream_name,
        "data_keys": dict(DATA_KEYS),
        "datasets": dict(datasets),
        "region_grid": region.as_metadata(),
        "simulation_truth": {
            "tiled_path": truth_path(sample.sample_id),
            "note": TRUTH_NOTE,
            "sample": sample.as_metadata(),
        },
    }


def read_section(start: Mapping[str, Any]) -> dict[str, Any]:
    """The validated section of a start document.

    Raises
    ------
    RunError
        The run has no section (it is not a ptychography run), its version is not
        :data:`VERSION`, or it lacks the geometry or the scan extent.
    """
    uid = start.get("uid", "?")
    found = start.get(SECTION)
    if not isinstance(found, Mapping):
        raise RunError(f"run {uid} ({start.get('plan_name')}) has no '{SECTION}' section: not a ptychography run")
    if found.get("version") != VERSION:
        raise RunError(f"run {uid}: {SECTION} metadata version {found.get('version')!r} is not {VERSION}")
    missing = [k for k in (*DetectorGeometry.model_fields, "scan") if k not in found]
    if missing:
        raise RunError(f"run {uid}: the {SECTION} section lacks {missing}")
    return dict(found)


def geometry(section: Mapping[str, Any]) -> DetectorGeometry:
    """The detector geometry a section declares."""
    return DetectorGeometry(**{key: section[key] for key in DetectorGeometry.model_fields})


def data_keys(section: Mapping[str, Any]) -> dict[str, str]:
    """Data keys of frames, positions and frame ids (the defaults where the section names none)."""
    return {**DATA_KEYS, **section.get("data_keys", {})}


def stream_name(section: Mapping[str, Any]) -> str:
    """The stream that holds the frames."""
    return str(section.get("stream_name", STREAM_NAME))


def object_grid(
    section: Mapping[str, Any], pixel_size_m: float, patch_pixels: int, margin_pixels: int = GRID_MARGIN_PIXELS
) -> ObjectGrid:
    """The object grid of a run: live, replay and iterative results all land on it.

    A declared ``region_grid`` with this pixel size is used as it is (it is aligned with the
    sample, so results compare pixel for pixel with its ground truth); otherwise the grid covers
    the declared scan extent plus ``margin_pixels``.
    """
    declared = section.get("region_grid")
    if declared and np.isclose(declared["pixel_size_m"], pixel_size_m, rtol=1e-9):
        return ObjectGrid.from_metadata(declared)
    scan = section["scan"]
    rows, cols = scan["shape"]
    cy, cx = scan.get("center_m", (0.0, 0.0))
    half = np.array([(rows - 1) / 2, (cols - 1) / 2]) * scan["step_m"]
    corners = np.array([[cy - half[0], cx - half[1]], [cy + half[0], cx + half[1]]])
    return ObjectGrid.covering(corners, pixel_size_m, patch_pixels, margin_pixels=margin_pixels)


def nominal_positions(section: Mapping[str, Any]) -> np.ndarray:
    """The trajectory's nominal positions (N, 2) (y, x) in metres."""
    scan = section["scan"]
    trajectory = FlyTrajectory(
        kind=scan["kind"],
        shape=tuple(scan["shape"]),
        step_m=scan["step_m"],
        center_m=tuple(scan["center_m"]),
        period_s=scan["period_s"],
        exposure_s=scan["exposure_s"],
    )
    return trajectory.positions_m()


def probe(section: Mapping[str, Any]) -> np.ndarray | None:
    """The complex probe (n, n) the section describes, or None when it describes none."""
    if "probe" not in section:
        return None
    description = dict(section["probe"])
    return make_probe(description.pop("kind"), geometry(section).frame_pixels, **description)


def probe_for(
    section: Mapping[str, Any], provenance: Mapping[str, Any], stored: tuple[np.ndarray, str] | None = None
) -> tuple[np.ndarray | None, str]:
    """The probe to check a run's preview against, and where it came from (or why there is none).

    In order: the run's own probe description; a ``stored`` (probe, source) pair, e.g. the probe
    of an iterative reconstruction of this run or of one of the same set-up; the probe the
    checkpoint was trained with, when its provenance records one (all its training scans shared
    it). A made-up probe never.
    """
    own = probe(section)
    if own is not None:
        return own, f"run start document ({SECTION}.probe)"
    if stored is not None:
        return stored
    description = provenance.get("probe")
    if description:
        params = dict(description)
        return make_probe(params.pop("kind"), geometry(section).frame_pixels, **params), "checkpoint provenance"
    return None, (
        "the run describes no probe, no stored reconstruction lends one and the checkpoint records none, "
        "so the preview cannot be checked"
    )
