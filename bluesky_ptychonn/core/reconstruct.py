"""Offline reconstruction of a whole scan, and its evaluation against a reference.

The live callback and replay use the same pieces (``Predictor`` then ``PatchStitcher``) frame
batch by frame batch; this module does it in one call for files and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .geometry import ObjectGrid
from .metrics import compare
from .stitching import STITCH_WIDTH, PatchStitcher, StitchedImage, patch_window

if TYPE_CHECKING:
    from .inference import Predictor


def reconstruct(
    predictor: Predictor,
    frames: np.ndarray,
    positions_m: np.ndarray,
    *,
    grid: ObjectGrid | None = None,
    window: str = "gaussian",
    window_width: float = STITCH_WIDTH,
    batch_size: int = 512,
    progress: bool = False,
) -> StitchedImage:
    """Predict every frame and stitch the patches on ``grid`` (a progress bar on stderr with ``progress``).

    The pixel size is the recipe's real-space pixel, which the caller's ``grid`` must share.
    """
    from tqdm import tqdm

    n = predictor.patch_pixels
    if grid is None:
        raise ValueError("reconstruct needs the object grid (ObjectGrid.covering(positions, pixel_size_m, n))")
    stitcher = PatchStitcher(grid, n, patch_window(n, window, width_fraction=window_width))
    with tqdm(total=len(frames), desc="reconstruct", unit="frame", disable=not progress, leave=False) as bar:
        for s in range(0, len(frames), batch_size):
            amplitude, phase = predictor.predict(frames[s : s + batch_size])
            stitcher.add(amplitude, phase, positions_m[s : s + batch_size])
            bar.update(len(amplitude))
    return stitcher.snapshot()


def evaluate(
    image: StitchedImage, truth: np.ndarray, truth_grid: ObjectGrid, coverage: float = 0.5
) -> dict[str, float]:
    """PSNR, SSIM and Pearson of the stitched image against a complex reference on the scanned region.

    The reference must be on the image's grid (same shape, pixel size and origin); the region is
    where the stitching weight reaches ``coverage`` of its maximum.
    """
    if truth_grid != image.grid:
        raise ValueError(f"reference grid {truth_grid} differs from the image grid {image.grid}")
    return compare(image.amplitude, image.phase, np.abs(truth), np.angle(truth), image.covered(coverage))
