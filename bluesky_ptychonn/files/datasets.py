"""Training sets from simulated scan files: frames with label patches cut from the ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.geometry import extract_patches, split_lines
from ..core.training import TrainingSet
from ..errors import ScanFileError
from .scanfile import ScanData, read_scan


def truth_labels(scan: ScanData, index: np.ndarray, patch_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(amplitude, phase) label patches cut from the scan's simulation truth at the given frames' positions."""
    if scan.truth is None or scan.truth_grid is None:
        raise ScanFileError("the scan has no simulation truth to cut labels from")
    corners = scan.truth_grid.patch_corners(scan.positions_m[index], patch_pixels)
    patches = extract_patches(scan.truth, corners, patch_pixels)
    return np.abs(patches).astype(np.float32), np.angle(patches).astype(np.float32)


def training_set_from_scan(scan: ScanData, *, lines: float = 1.0, source: dict | None = None) -> TrainingSet:
    """Frames on the first ``lines`` fraction of scan lines, labelled with the simulation truth."""
    index = split_lines(scan.positions_m, lines)[0] if lines < 1 else np.arange(len(scan.frames))
    amplitude, phase = truth_labels(scan, index, scan.frames.shape[-1])
    return TrainingSet(
        frames=scan.frames[index],
        amplitude=amplitude,
        phase=phase,
        positions_m=scan.positions_m[index],
        groups=np.zeros(len(index), np.int64),
        sources=[
            {
                **(source or {}),
                "label_source": "simulation_truth",
                "lines_fraction": lines,
                "frames": int(len(index)),
                **({"probe": scan.metadata["probe"]} if scan.metadata.get("probe") else {}),
            }
        ],
        probes=[scan.probe],
    )


def parse_scan_argument(text: str | Path, default_lines: float = 1.0) -> tuple[Path, float]:
    """``"scan.h5"`` or ``"scan.h5:0.6"`` (train on the first 60 % of its lines) -> (path, fraction)."""
    name, sep, fraction = str(text).rpartition(":")
    if sep and name and not Path(text).exists():
        try:
            value = float(fraction)
        except ValueError:
            return Path(text), default_lines
        if not 0 < value <= 1:
            raise ScanFileError(f"line fraction {value} of {name} is not in (0, 1]")
        return Path(name), value
    return Path(text), default_lines


def training_set_from_files(paths: Sequence[str | Path], *, lines: float = 1.0) -> TrainingSet:
    """Concatenate :func:`training_set_from_scan` over scan files (all of one frame shape).

    Each entry may carry its own line fraction as ``"file.h5:0.6"``; ``lines`` is the default.
    """
    parts = []
    for entry in paths:
        path, fraction = parse_scan_argument(entry, lines)
        parts.append(training_set_from_scan(read_scan(path), lines=fraction, source={"file": str(path)}))
    shapes = {p.frames.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ScanFileError(f"scan files have different frame shapes {sorted(shapes)}: train on one geometry at a time")
    return TrainingSet.concatenate(parts)
