"""Incremental, weighted stitching of predicted patches onto an object grid.

Amplitude is a weighted mean; phase is the angle of a weighted complex mean of ``exp(i phase)``,
so phase wraps do not smear. Sums and weights are kept, so patches can arrive in any order and
in any number of batches, and a snapshot can be taken at any time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FrameError
from .geometry import ObjectGrid


def patch_window(n: int, kind: str = "gaussian", *, width_fraction: float = 0.15) -> np.ndarray:
    """Per-pixel weight of a predicted patch (n, n), float32.

    ``"gaussian"``: exp(-r^2 / 2 sigma^2) with sigma = ``width_fraction * n`` (trusts the lit
    centre); ``"central"``: 1 inside a central square of side ``width_fraction * n``, 0 outside,
    like the paper's central crop; ``"uniform"``: all ones.
    """
    c = (n - 1) / 2
    y, x = np.mgrid[0:n, 0:n] - c
    if kind == "gaussian":
        sigma = width_fraction * n
        return np.exp(-(y**2 + x**2) / (2 * sigma**2)).astype(np.float32)
    if kind == "central":
        half = width_fraction * n / 2
        return ((np.abs(y) <= half) & (np.abs(x) <= half)).astype(np.float32)
    if kind == "uniform":
        return np.ones((n, n), np.float32)
    raise ValueError(f"unknown window {kind!r}; expected 'gaussian', 'central' or 'uniform'")


#: Stitching window width (fraction of the patch): a Gaussian of sigma 0.1 n keeps each prediction's
#: sharpest centre. On a held-out dense scan it gave phase SSIM 0.67 against 0.43 at 0.15; phase
#: Pearson was higher at 1x and 2x steps and on the circuit family, about equal at 5x.
STITCH_WIDTH = 0.1

#: Trust is defined where the summed probe footprints reach this fraction of one footprint's peak;
#: beyond, only the probe's faint tails reach and the ratio is noise.
TRUST_MIN_FOOTPRINT = 0.01


@dataclass
class StitchedImage:
    """A snapshot of a stitched object: (H, W) float32 amplitude, phase (radians) and weight.

    ``trust``, when the stitcher keeps one, is the (H, W) float32 map of per-frame consistency
    errors (:mod:`~bluesky_ptychonn.core.consistency`, lower is better) averaged with the probe's
    footprint as weight; NaN where no frame's footprint reaches.
    """

    amplitude: np.ndarray
    phase: np.ndarray
    weight: np.ndarray
    grid: ObjectGrid
    frames: int
    trust: np.ndarray | None = None

    def covered(self, fraction: float = 0.1) -> np.ndarray:
        """Mask of pixels whose weight is at least ``fraction`` of the maximum."""
        peak = max(float(self.weight.max()), float(np.finfo(np.float32).tiny))
        return self.weight >= fraction * peak


class PatchStitcher:
    """Accumulates (amplitude, phase) patches at sub-pixel positions on an :class:`ObjectGrid`.

    Each patch is resampled bilinearly onto the grid (the rule of
    :func:`~bluesky_ptychonn.core.geometry.extract_patches`) and added with ``window`` as its weight.
    With a ``trust_window`` (the probe's footprint), one value per patch is stitched as well: the
    trust map.
    """

    def __init__(
        self,
        grid: ObjectGrid,
        patch_pixels: int,
        window: np.ndarray | None = None,
        trust_window: np.ndarray | None = None,
    ) -> None:
        self.grid = grid
        self.n = patch_pixels
        self.window = self._checked(np.ones((patch_pixels, patch_pixels)) if window is None else window)
        self.trust_window = None if trust_window is None else self._checked(trust_window)
        self._amp = np.zeros(grid.shape, np.float64)
        self._phasor = np.zeros(grid.shape, np.complex128)
        self._weight = np.zeros(grid.shape, np.float64)
        self._trust = np.zeros(grid.shape, np.float64) if trust_window is not None else None
        self._trust_weight = np.zeros(grid.shape, np.float64)
        self.frames = 0

    def _checked(self, window: np.ndarray) -> np.ndarray:
        if window.shape != (self.n, self.n):
            raise ValueError(f"window shape {window.shape} does not match patches of {self.n} pixels")
        return window.astype(np.float32)

    def add(
        self, amplitude: np.ndarray, phase: np.ndarray, positions_m: np.ndarray, trust: np.ndarray | None = None
    ) -> None:
        """Add (N, n, n) amplitude and phase patches centred at (N, 2) positions in metres.

        ``trust`` (N,) holds each patch's consistency error; it is required when the stitcher
        keeps a trust map and refused otherwise. Positions whose patch leaves the grid raise
        :class:`~bluesky_ptychonn.errors.PositionError` before anything is added, so a failed call
        leaves the image unchanged.
        """
        amplitude, phase = np.asarray(amplitude), np.asarray(phase)
        if amplitude.shape != phase.shape or amplitude.ndim != 3 or amplitude.shape[1:] != (self.n, self.n):
            raise FrameError(
                f"expected amplitude and phase patches of shape (N, {self.n}, {self.n}), "
                f"got {amplitude.shape} and {phase.shape}"
            )
        if len(positions_m) != len(amplitude):
            raise FrameError(f"{len(amplitude)} patches but {len(positions_m)} positions")
        if (trust is None) != (self._trust is None) or (trust is not None and len(trust) != len(amplitude)):
            raise FrameError(
                f"this stitcher {'keeps' if self._trust is not None else 'keeps no'} trust map; "
                f"got trust values {None if trust is None else np.shape(trust)} for {len(amplitude)} patches"
            )
        corners = self.grid.patch_corners(positions_m, self.n)
        phasor = np.exp(1j * phase.astype(np.float64))
        for k, (cy, cx) in enumerate(corners):
            iy, ix = int(np.floor(cy)), int(np.floor(cx))
            fy, fx = cy - iy, cx - ix
            # Bilinear splat: the four integer shifts of the patch, weighted by their overlap.
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    w = wy * wx
                    if w < 1e-9:
                        continue
                    sl = (slice(iy + dy, iy + dy + self.n), slice(ix + dx, ix + dx + self.n))
                    ww = w * self.window
                    self._amp[sl] += ww * amplitude[k]
                    self._phasor[sl] += ww * phasor[k]
                    self._weight[sl] += ww
                    if self._trust is not None and self.trust_window is not None and trust is not None:
                        tw = w * self.trust_window
                        self._trust[sl] += tw * float(trust[k])
                        self._trust_weight[sl] += tw
        self.frames += len(amplitude)

    def snapshot(self) -> StitchedImage:
        """The current image; pixels no patch has reached are 0 in all three arrays."""
        covered = self._weight > 0
        safe = np.where(covered, self._weight, 1.0)
        amplitude = np.where(covered, self._amp / safe, 0.0)
        phase = np.where(covered, np.angle(self._phasor), 0.0)
        trust = None
        if self._trust is not None:
            reached = self._trust_weight >= TRUST_MIN_FOOTPRINT
            trust = np.where(reached, self._trust / np.where(reached, self._trust_weight, 1.0), np.nan)
            trust = trust.astype(np.float32)
        return StitchedImage(
            amplitude=amplitude.astype(np.float32),
            phase=phase.astype(np.float32),
            weight=self._weight.astype(np.float32),
            grid=self.grid,
            frames=self.frames,
            trust=trust,
        )
