"""Incremental, weighted stitching of predicted patches onto an object grid.

Amplitude is a weighted mean; phase is the angle of a weighted complex mean of ``exp(i phase)``,
so phase wraps do not smear. Sums and weights are kept, so patches can arrive in any order and
in any number of batches, and a snapshot can be taken at any time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    #: Grid pixel of the arrays' first pixel: (0, 0) for the whole image, else a block of it.
    offset: tuple[int, int] = (0, 0)

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
        device: Any = None,
    ) -> None:
        self.grid = grid
        self.n = patch_pixels
        self.window = self._checked(np.ones((patch_pixels, patch_pixels)) if window is None else window)
        self.trust_window = None if trust_window is None else self._checked(trust_window)
        # On a torch device (a GPU) the sums live there, beside the predictions: no host round trip per batch.
        self.device = device
        # Single precision: a pixel sums only the patches that overlap it (tens, not the scan's
        # frames), so float32 rounding stays near 1e-6 of the value (tested against a float64
        # reference), while the five grids take half the memory: 56 against 113 MB for the
        # 1,225 x 1,922 grid of a 100,000-frame scan.
        zeros = _zeros_on(device, grid.shape)
        self._amp = zeros(np.float32)
        self._phasor = zeros(np.complex64)
        self._weight = zeros(np.float32)
        self._trust = zeros(np.float32) if trust_window is not None else None
        self._trust_weight = zeros(np.float32)
        self._changed: tuple[int, int, int, int] | None = None
        self.frames = 0

    def _checked(self, window: np.ndarray) -> np.ndarray:
        if window.shape != (self.n, self.n):
            raise ValueError(f"window shape {window.shape} does not match patches of {self.n} pixels")
        return window.astype(np.float32)

    def add(
        self, amplitude: np.ndarray, phase: np.ndarray, positions_m: np.ndarray, trust: np.ndarray | None = None
    ) -> None:
        """Add (N, n, n) amplitude and phase patches centred at (N, 2) positions in metres.

        ``trust`` (N,) holds each patch's consistency error; it is required when the stitcher keeps
        a trust map and refused otherwise. On a torch device the patches and ``trust`` may be
        tensors already there (a GPU pipeline's predictions): they are used in place. Positions
        whose patch leaves the grid raise :class:`~bluesky_ptychonn.errors.PositionError` before
        anything is added, so a failed call leaves the image unchanged.
        """
        if self.device is None:
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
        if self.device is not None:
            self._mark(self._add_on_device(amplitude, phase, corners, trust))
            self.frames += len(amplitude)
            return
        window = self.window
        sums = [(self._amp, amplitude * window), (self._phasor, np.exp(1j * phase) * window), (self._weight, window)]
        if self._trust is not None and self.trust_window is not None and trust is not None:
            weighted = np.asarray(trust)[:, None, None] * self.trust_window
            sums += [(self._trust, weighted), (self._trust_weight, self.trust_window)]
        self._mark(_splat_add(sums, corners, self.n))
        self.frames += len(amplitude)

    def _add_on_device(self, amplitude: Any, phase: Any, corners: np.ndarray, trust: Any) -> tuple[int, int, int, int]:
        """:meth:`add` on a torch device: every grid's patches written into one (C, N, n, n) stack, then splatted.

        The channels are amplitude, the phasor's real and imaginary parts and the weight (and the
        trust value and its weight), each computed straight into its place in the stack: no
        complex intermediate, no copy to stack them.
        """
        torch = _torch()
        on = _to(self.device)
        amplitude, phase = on(amplitude).float(), on(phase).float()
        count, n = len(amplitude), self.n
        window = on(self.window)
        grids = [self._amp, self._phasor, self._weight]
        if self._trust is not None:
            grids += [self._trust, self._trust_weight]
        stack = amplitude.new_empty((len(grids) + 1, count, n, n))
        torch.mul(amplitude, window, out=stack[0])
        torch.cos(phase, out=stack[1]).mul_(window)
        torch.sin(phase, out=stack[2]).mul_(window)
        stack[3].copy_(window.expand(count, n, n))
        if self._trust is not None:  # and so a trust window and values (checked by add)
            trust_window = on(self.trust_window)
            torch.mul(on(trust).float()[:, None, None], trust_window, out=stack[4])
            stack[5].copy_(trust_window.expand(count, n, n))
        return _splat_add_torch(grids, stack, corners)

    def _mark(self, block: tuple[int, int, int, int]) -> None:
        """Grow the changed region (y0, y1, x0, x1) since the last :meth:`take_changed` by ``block``."""
        if self._changed is None:
            self._changed = block
        else:
            old = self._changed
            self._changed = (min(old[0], block[0]), max(old[1], block[1]), min(old[2], block[2]), max(old[3], block[3]))

    def take_changed(self) -> tuple[int, int, int, int] | None:
        """The region (y0, y1, x0, x1) changed since the last call (None if nothing), and forget it.

        A publisher that fails to write it sends the whole image next (see the live engine).
        """
        block, self._changed = self._changed, None
        return block

    def snapshot(self, block: tuple[int, int, int, int] | None = None) -> StitchedImage:
        """The current image, or its block (y0, y1, x0, x1); pixels no patch has reached are 0 in all three arrays."""
        return self.sums(block, copy=False).image()

    def sums(self, block: tuple[int, int, int, int] | None = None, *, copy: bool = True) -> BlockSums:
        """The raw sums over the whole grid or a block (y0, y1, x0, x1), to divide later; copies unless ``copy=False``.

        A plain copy, so a caller that must not be added to meanwhile (the live publisher, under
        the engine's lock) holds its lock only for that, and divides and takes angles after
        (:meth:`BlockSums.image`): for a whole 2,600 x 2,600 grid on the 2-core CPU, 10-50 ms
        against 120-420 ms for the division and angles. Views (``copy=False``) serve a caller
        that divides at once, with no stitching meanwhile, without the copy's memory.
        """
        y0, y1, x0, x1 = block or (0, self.grid.shape[0], 0, self.grid.shape[1])
        box = (slice(y0, y1), slice(x0, x1))
        # On the CPU the sums are read through numpy views: a torch op here would give the
        # publisher's thread an OpenMP team of its own, which slows the inference thread's (see
        # host_runtime.release_openmp_team).
        on_host = self.device is None or _torch().device(self.device).type == "cpu"

        def block_of(sums: Any) -> Any:
            if sums is None:
                return None
            view = sums[box].numpy() if on_host and not isinstance(sums, np.ndarray) else sums[box]
            if not copy:
                return view
            return view.copy() if isinstance(view, np.ndarray) else view.clone()

        return BlockSums(
            amplitude=block_of(self._amp),
            phasor=block_of(self._phasor),
            weight=block_of(self._weight),
            trust=block_of(self._trust),
            trust_weight=block_of(self._trust_weight if self._trust is not None else None),
            on_host=on_host,
            grid=self.grid,
            frames=self.frames,
            offset=(y0, x0),
        )


@dataclass
class BlockSums:
    """A stitcher's raw sums over a block, copied or viewed (numpy on the host, tensors on a device)."""

    amplitude: Any
    phasor: Any
    weight: Any
    trust: Any
    trust_weight: Any
    on_host: bool
    grid: ObjectGrid
    frames: int
    offset: tuple[int, int]

    def image(self) -> StitchedImage:
        """Weighted means (amplitude, trust) and the phasors' angle; 0 (trust NaN) where nothing reached."""
        xp: Any = np if self.on_host else _torch()
        covered = self.weight > 0
        safe = xp.where(covered, self.weight, 1.0)
        amplitude = xp.where(covered, self.amplitude / safe, 0.0)
        phase = xp.where(covered, xp.angle(self.phasor), 0.0)
        trust = None
        if self.trust is not None:
            reached = self.trust_weight >= TRUST_MIN_FOOTPRINT
            trust = _host(xp.where(reached, self.trust / xp.where(reached, self.trust_weight, 1.0), np.nan))
        return StitchedImage(
            amplitude=_host(amplitude),
            phase=_host(phase),
            weight=_host(self.weight),
            grid=self.grid,
            frames=self.frames,
            trust=trust,
            offset=self.offset,
        )


def _placement(corners: np.ndarray, n: int, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """Where a batch's (n+1, n+1) bilinear footprints land: integer corners, fractions, box and block.

    Returns (iy, ix, fy, fx, (y0, y1, x0, x1), (box_h, box_w)); the box is the batch's bounding box
    of footprints, the block its part inside the grid (a zero-weight last row/column may overhang).
    """
    height, width = shape
    iy = np.floor(corners[:, 0]).astype(np.int64)
    ix = np.floor(corners[:, 1]).astype(np.int64)
    y0, x0 = int(iy.min()), int(ix.min())
    box_h, box_w = int(iy.max()) + n + 1 - y0, int(ix.max()) + n + 1 - x0
    y1, x1 = min(y0 + box_h, height), min(x0 + box_w, width)
    fy = (corners[:, 0] - iy).astype(np.float32)
    fx = (corners[:, 1] - ix).astype(np.float32)
    return iy, ix, fy, fx, (y0, y1, x0, x1), (box_h, box_w)


def _footprint_index(steps: Any, iy: Any, ix: Any, box_w: int) -> Any:
    """Flat index in the box of each pixel of each (n+1, n+1) footprint, (N * (n+1)^2,); numpy or torch alike."""
    rows, cols = iy[:, None, None], ix[:, None, None]
    return ((rows + steps[:, None]) * box_w + (cols + steps)).ravel()


def _splat_add(sums: list[tuple[Any, Any]], corners: np.ndarray, n: int) -> tuple[int, int, int, int]:
    """Add (N, n, n) patches (or one (n, n) patch for all) at fractional ``corners`` into (H, W) grids, bilinearly.

    Each patch is spread over its four integer shifts as a (n+1, n+1) footprint, and the whole
    batch goes in with one ``bincount`` per grid over the batch's bounding box: no Python loop over
    frames. Returns the block (y0, y1, x0, x1).
    """
    iy, ix, fy, fx, (y0, y1, x0, x1), (box_h, box_w) = _placement(corners, n, sums[0][0].shape)
    index = _footprint_index(np.arange(n + 1), iy - y0, ix - x0, box_w)
    for grid, patches in sums:
        # Separable: spread over the two row shifts, then the two column shifts.
        spread = np.zeros((len(corners), n + 1, n), patches.dtype)
        spread[:, :n] = (1 - fy[:, None, None]) * patches
        spread[:, 1:] += fy[:, None, None] * patches
        footprint = np.zeros((len(corners), n + 1, n + 1), patches.dtype)
        footprint[:, :, :n] = (1 - fx[:, None, None]) * spread
        footprint[:, :, 1:] += fx[:, None, None] * spread
        parts = [footprint.real, footprint.imag] if np.iscomplexobj(footprint) else [footprint]
        summed = [np.bincount(index, part.ravel(), box_h * box_w) for part in parts]
        box = summed[0] if len(summed) == 1 else summed[0] + 1j * summed[1]
        grid[y0:y1, x0:x1] += box.reshape(box_h, box_w)[: y1 - y0, : x1 - x0]
    return y0, y1, x0, x1


def _splat_add_torch(grids: list[Any], stack: Any, corners: np.ndarray) -> tuple[int, int, int, int]:
    """The torch device's :func:`_splat_add`: a (C, N, n, n) stack of channels into ``grids`` (a complex one takes two).

    The stack goes to its four bilinear shifts with one multiply and three fused multiply-adds,
    written channel-major so that one ``index_add_`` takes it as it is into a float32 box; the box
    is then added to the grids. On the 2-core CPU 43 against 77-82 us a frame for a separable
    spread and a float64 scatter per grid (a depthwise 2x2 convolution took 72-95); 33-39 against
    44-50 in the live engine once the channels were written into place and the footprints
    channel-major, without the two copies (``benchmarks/results/ab-stitch-stack/``). Summing one
    batch in float32 moves the result by float32 rounding only (tested against the host path).
    """
    torch = _torch()
    c, count, n = stack.shape[0], stack.shape[1], stack.shape[-1]
    iy, ix, fy, fx, (y0, y1, x0, x1), (box_h, box_w) = _placement(corners, n, grids[0].shape)
    device = stack.device
    # Built where the sums are: on a GPU, N (n+1)^2 indices made there instead of copied over.
    index = _footprint_index(
        torch.arange(n + 1, device=device),
        torch.as_tensor(iy - y0, device=device),
        torch.as_tensor(ix - x0, device=device),
        box_w,
    )
    fy = torch.as_tensor(fy, device=device)[None, :, None, None]
    fx = torch.as_tensor(fx, device=device)[None, :, None, None]
    footprints = stack.new_empty((c, count, n + 1, n + 1))
    torch.mul(stack, (1 - fy) * (1 - fx), out=footprints[..., :n, :n])
    footprints[..., n, :].zero_()
    footprints[..., :n, n].zero_()
    footprints[..., 1:, :n].addcmul_(fy * (1 - fx), stack)
    footprints[..., :n, 1:].addcmul_((1 - fy) * fx, stack)
    footprints[..., 1:, 1:].addcmul_(fy * fx, stack)
    summed = stack.new_zeros(c, box_h * box_w).index_add_(1, index, footprints.reshape(c, -1))
    summed = summed.reshape(c, box_h, box_w)[:, : y1 - y0, : x1 - x0]
    k = 0
    for grid in grids:
        block = grid[y0:y1, x0:x1]
        if grid.is_complex():
            parts = torch.view_as_real(block)  # (h, w, 2): real and imaginary in place, no complex temporary
            parts[..., 0] += summed[k]
            parts[..., 1] += summed[k + 1]
            k += 2
        else:
            block += summed[k]
            k += 1
    return y0, y1, x0, x1


def _torch() -> Any:
    import torch

    return torch


def _to(device: Any) -> Callable[[Any], Any]:
    """A function putting an array where the stitcher computes (a tensor already there stays as it is)."""
    if device is None:
        return np.asarray
    torch = _torch()
    return lambda a: torch.as_tensor(a if isinstance(a, torch.Tensor) else np.asarray(a), device=device)


def _zeros_on(device: Any, shape: tuple[int, ...]) -> Callable[..., Any]:
    """``zeros(dtype, shape=shape)``: a zero array on the host or the torch device (numpy or torch dtype)."""
    if device is None:
        return lambda dtype, size=shape: np.zeros(size, dtype)
    torch = _torch()

    def zeros(dtype: Any, size: tuple[int, ...] = shape) -> Any:
        kind = dtype if isinstance(dtype, torch.dtype) else getattr(torch, np.dtype(dtype).name)
        return torch.zeros(size, dtype=kind, device=device)

    return zeros


def _host(array: Any) -> np.ndarray:
    """float32 numpy, from either side."""
    if isinstance(array, np.ndarray):
        return array.astype(np.float32)
    return array.float().cpu().numpy()
