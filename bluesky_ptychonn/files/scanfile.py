"""HDF5 scan files: frames, positions, frame ids, geometry, probe and (for simulations) the truth.

Layout (NeXus-like; one scan per file)::

    /entry/data/data             (N, rows, cols) uint32  detector counts
    /entry/data/positions_m      (N, 2) float64          probe centres (y, x)
    /entry/data/frame_id         (N,) int64
    /entry/instrument            attrs energy_ev, distance_m, detector_pixel_m, frame_pixels
    /entry/probe                 (n, n) complex64        attrs: description (JSON)
    /entry/simulation_truth/object (H, W) complex64      attrs: pixel_size_m, origin_m, note
    /entry                       attrs: metadata (JSON)

The truth group exists only for simulated scans and says so in its ``note`` attribute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..core.config import DetectorGeometry
from ..core.geometry import ObjectGrid
from ..errors import ScanFileError
from ..sim.physics import TRUTH_NOTE, SimulatedScan


@dataclass
class ScanData:
    """A scan read from a file (or from a run): what reconstruction needs, plus truth if any."""

    frames: np.ndarray
    positions_m: np.ndarray
    frame_ids: np.ndarray
    geometry: DetectorGeometry
    probe: np.ndarray | None = None
    truth: np.ndarray | None = None
    truth_grid: ObjectGrid | None = None
    metadata: dict = field(default_factory=dict)


def write_scan(path: str | Path, scan: SimulatedScan) -> Path:
    """Write a simulated scan and its ground truth to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scan.probe.shape[0] != scan.frames.shape[-1]:
        raise ScanFileError(f"probe of shape {scan.probe.shape} does not match frames of shape {scan.frames.shape[1:]}")
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["metadata"] = json.dumps(scan.metadata)
        data = entry.create_group("data")
        data.create_dataset("data", data=scan.frames, chunks=(1, *scan.frames.shape[1:]), compression="lzf")
        data.create_dataset("positions_m", data=scan.positions_m)
        data.create_dataset("frame_id", data=scan.frame_ids)
        inst = entry.create_group("instrument")
        for key, value in scan.geometry.model_dump().items():
            inst.attrs[key] = value
        probe = entry.create_dataset("probe", data=scan.probe)
        probe.attrs["description"] = json.dumps(scan.metadata.get("probe", {}))
        truth = entry.create_group("simulation_truth")
        obj = truth.create_dataset("object", data=scan.obj, compression="lzf")
        obj.attrs["pixel_size_m"] = scan.grid.pixel_size_m
        obj.attrs["origin_m"] = scan.grid.origin_m
        obj.attrs["note"] = TRUTH_NOTE
    return path


def read_scan(path: str | Path) -> ScanData:
    """Read a scan file written by :func:`write_scan` (or any file with the same layout)."""
    path = Path(path)
    if not path.is_file():
        raise ScanFileError(f"scan file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ScanFileError(f"{path} is not a readable HDF5 file: {err}") from err
    with f:
        try:
            frames = f["entry/data/data"][()]
            positions = f["entry/data/positions_m"][()]
            frame_ids = f["entry/data/frame_id"][()] if "entry/data/frame_id" in f else np.arange(len(frames))
            geometry = DetectorGeometry(**{k: f["entry/instrument"].attrs[k] for k in DetectorGeometry.model_fields})
        except KeyError as err:
            raise ScanFileError(
                f"{path} lacks {err}: expected /entry/data/{{data,positions_m}} and /entry/instrument"
            ) from err
        probe = f["entry/probe"][()] if "entry/probe" in f else None
        truth, grid = None, None
        if "entry/simulation_truth/object" in f:
            ds = f["entry/simulation_truth/object"]
            truth = ds[()]
            grid = ObjectGrid(truth.shape, float(ds.attrs["pixel_size_m"]), tuple(ds.attrs["origin_m"]))
        metadata = json.loads(f["entry"].attrs.get("metadata", "{}"))
    if len(positions) != len(frames) or len(frame_ids) != len(frames):
        raise ScanFileError(f"{path}: {len(frames)} frames, {len(positions)} positions, {len(frame_ids)} frame ids")
    return ScanData(frames, positions, frame_ids, geometry, probe, truth, grid, metadata)
