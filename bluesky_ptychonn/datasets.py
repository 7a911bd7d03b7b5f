"""Training sets from simulated scan files: frames with label patches cut from the ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import ScanFileError
from .geometry import extract_patches
from .reconstruct import split_lines
from .scanfile import ScanData, read_scan
from .training import TrainingSet


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
            {**(source or {}), "label_source": "simulation_truth", "lines_fraction": lines, "frames": int(len(index))}
        ],
    )


def training_set_from_files(paths: Sequence[Path], *, lines: float = 1.0) -> TrainingSet:
    """Concatenate :func:`training_set_from_scan` over scan files (all of one frame shape)."""
    parts = [training_set_from_scan(read_scan(p), lines=lines, source={"file": str(p)}) for p in paths]
    shapes = {p.frames.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ScanFileError(f"scan files have different frame shapes {sorted(shapes)}: train on one geometry at a time")
    return TrainingSet.concatenate(parts)
