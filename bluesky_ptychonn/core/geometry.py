"""Geometry: photon energy to wavelength, detector to real-space pixel size, and the object grid.

Conventions (DESIGN.md):

* Arrays are (row, column) = (y, x); positions are float arrays of shape (N, 2) in (y, x), metres.
* A scan position is the centre of the probe. A patch of ``n`` pixels centred on a position has
  its centre at patch coordinate ``(n - 1) / 2`` (between pixels for even ``n``), so a symmetric
  scan gives a symmetric image.
* :class:`ObjectGrid` maps metres to fractional pixel coordinates: pixel ``(i, j)`` has its
  centre at ``origin_m + (i, j) * pixel_size_m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigurationError, PositionError

#: Planck constant times speed of light, in eV * m (CODATA 2018).
HC_EV_M = 1.239841984e-6

#: Blank pixels around the patches of a scan on every grid the package sizes: room for position
#: jitter and encoder noise, and pty-chi warns and pads when a probe window touches the edge.
GRID_MARGIN_PIXELS = 4


def wavelength_m(energy_ev: float) -> float:
    """Return the X-ray wavelength in metres for a photon energy in eV."""
    if not energy_ev > 0:
        raise ConfigurationError(f"photon energy must be positive, got {energy_ev!r} eV")
    return HC_EV_M / energy_ev


def real_space_pixel_m(energy_ev: float, distance_m: float, frame_pixels: int, detector_pixel_m: float) -> float:
    """Real-space pixel size of a far-field measurement: wavelength x distance / (N x detector pixel).

    ``frame_pixels`` and ``detector_pixel_m`` are the frame as the network sees it, after any
    cropping (fewer pixels) and binning (fewer, larger pixels).
    """
    if not (distance_m > 0 and detector_pixel_m > 0 and frame_pixels > 0):
        raise ConfigurationError(
            f"distance, detector pixel and frame size must be positive, got "
            f"{distance_m!r} m, {detector_pixel_m!r} m, {frame_pixels!r} px"
        )
    return wavelength_m(energy_ev) * distance_m / (frame_pixels * detector_pixel_m)


def check_positions(positions_m: np.ndarray) -> np.ndarray:
    """Return ``positions_m`` as float64 (N, 2), or raise :class:`PositionError`."""
    pos = np.asarray(positions_m, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise PositionError(f"positions must have shape (N, 2) in (y, x), got {pos.shape}")
    if not np.all(np.isfinite(pos)):
        bad = np.flatnonzero(~np.all(np.isfinite(pos), axis=1))
        raise PositionError(f"positions contain NaN or infinity at indices {bad[:10].tolist()}")
    return pos


@dataclass(frozen=True)
class ObjectGrid:
    """A regular real-space grid for the stitched object.

    Attributes
    ----------
    shape : (int, int)
        Rows and columns.
    pixel_size_m : float
        Pixel pitch in metres (same along y and x).
    origin_m : (float, float)
        Position (y, x) in metres of the centre of pixel (0, 0).
    """

    shape: tuple[int, int]
    pixel_size_m: float
    origin_m: tuple[float, float]

    def __post_init__(self) -> None:
        if not self.pixel_size_m > 0:
            raise ConfigurationError(f"pixel size must be positive, got {self.pixel_size_m!r} m")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ConfigurationError(f"grid shape must be two positive integers, got {self.shape!r}")

    @classmethod
    def covering(
        cls, positions_m: np.ndarray, pixel_size_m: float, patch_pixels: int, margin_pixels: int = GRID_MARGIN_PIXELS
    ) -> ObjectGrid:
        """The smallest grid on which a patch of ``patch_pixels`` fits at every position, plus a margin."""
        pos = check_positions(positions_m)
        if len(pos) == 0:
            raise PositionError("cannot size a grid from zero positions")
        half = (patch_pixels - 1) / 2 + margin_pixels
        lo = pos.min(axis=0) - half * pixel_size_m
        hi = pos.max(axis=0) + half * pixel_size_m
        # Pixel count from the span (tolerating rounding), then centre the grid on the scan so a
        # symmetric scan gives a symmetric image.
        shape = np.ceil((hi - lo) / pixel_size_m - 1e-6).astype(int) + 1
        origin = (lo + hi) / 2 - (shape - 1) / 2 * pixel_size_m
        return cls(
            shape=(int(shape[0]), int(shape[1])),
            pixel_size_m=float(pixel_size_m),
            origin_m=(float(origin[0]), float(origin[1])),
        )

    def to_pixels(self, positions_m: np.ndarray) -> np.ndarray:
        """Fractional pixel coordinates (y, x) of positions in metres."""
        return (check_positions(positions_m) - np.asarray(self.origin_m)) / self.pixel_size_m

    def to_metres(self, pixels: np.ndarray) -> np.ndarray:
        """Positions in metres of fractional pixel coordinates (y, x); inverse of :meth:`to_pixels`."""
        return np.asarray(pixels, dtype=np.float64) * self.pixel_size_m + np.asarray(self.origin_m)

    def patch_corners(self, positions_m: np.ndarray, patch_pixels: int) -> np.ndarray:
        """Fractional grid coordinates of the top-left pixel of a patch centred at each position.

        Raises :class:`PositionError` naming the first position whose patch leaves the grid.
        """
        corners = self.to_pixels(positions_m) - (patch_pixels - 1) / 2
        # Snap float noise (26.9999999 -> 27) so integer positions stay exact in interpolation.
        nearest = np.round(corners)
        corners = np.where(np.abs(corners - nearest) < 1e-6, nearest, corners)
        limit = np.asarray(self.shape) - patch_pixels
        # A bilinear footprint needs one pixel beyond the floor of the corner when it is fractional.
        outside = np.any((corners < 0) | (np.ceil(corners) > limit), axis=1)
        if np.any(outside):
            i = int(np.flatnonzero(outside)[0])
            raise PositionError(
                f"position {i} at (y, x) = {tuple(np.round(np.asarray(positions_m)[i], 12))} m puts a "
                f"{patch_pixels}-pixel patch outside the {self.shape} grid with origin {self.origin_m} m "
                f"({int(outside.sum())} positions off the grid)"
            )
        return corners

    def extent_m(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) pixel-edge extent in metres, for ``imshow(extent=...)``."""
        half = self.pixel_size_m / 2
        y0, x0 = self.origin_m
        return (
            x0 - half,
            x0 + (self.shape[1] - 0.5) * self.pixel_size_m,
            y0 + (self.shape[0] - 0.5) * self.pixel_size_m,
            y0 - half,
        )

    def as_metadata(self) -> dict[str, object]:
        """JSON-ready description, in the units of DESIGN.md."""
        return {"shape": list(self.shape), "pixel_size_m": self.pixel_size_m, "origin_m": list(self.origin_m)}

    @classmethod
    def from_metadata(cls, md: dict) -> ObjectGrid:
        """Inverse of :meth:`as_metadata`."""
        return cls(shape=tuple(md["shape"]), pixel_size_m=float(md["pixel_size_m"]), origin_m=tuple(md["origin_m"]))  # type: ignore[arg-type]


def extract_patches(image: np.ndarray, corners: np.ndarray, patch_pixels: int) -> np.ndarray:
    """Cut (N, n, n) patches from ``image`` with bilinear interpolation at fractional top-left corners.

    The same bilinear rule is used by :class:`~bluesky_ptychonn.core.stitching.PatchStitcher`, so
    cutting and stitching back the patches of a smooth object reproduces it.
    """
    n = patch_pixels
    out = np.empty((len(corners), n, n), dtype=np.result_type(image.dtype, np.float32))
    for k, (cy, cx) in enumerate(corners):
        iy, ix = int(np.floor(cy)), int(np.floor(cx))
        fy, fx = cy - iy, cx - ix
        block = image[iy : iy + n + 1, ix : ix + n + 1]
        if block.shape != (n + 1, n + 1):  # at the far edge with an integer corner
            block = np.pad(block, ((0, n + 1 - block.shape[0]), (0, n + 1 - block.shape[1])), mode="edge")
        out[k] = (
            (1 - fy) * (1 - fx) * block[:n, :n]
            + (1 - fy) * fx * block[:n, 1:]
            + fy * (1 - fx) * block[1:, :n]
            + fy * fx * block[1:, 1:]
        )
    return out


def scan_lines(positions_m: np.ndarray) -> np.ndarray:
    """Line number of every position of a raster or snake scan (lines run along x, stacked in y).

    Lines are told apart by gaps in sorted y larger than half the largest gap; a scan with no
    such structure (a spiral) is treated as one line per position, in order of y.
    """
    order = np.argsort(positions_m[:, 0], kind="stable")
    gaps = np.diff(positions_m[order, 0])
    if len(gaps) == 0:
        return np.zeros(len(positions_m), np.int64)
    breaks = gaps > 0.5 * gaps.max()
    lines_sorted = np.concatenate([[0], np.cumsum(breaks)])
    if lines_sorted[-1] + 1 > len(positions_m) / 2:  # no line structure
        lines_sorted = np.arange(len(positions_m))
    lines = np.empty(len(positions_m), np.int64)
    lines[order] = lines_sorted
    return lines


def split_lines(positions_m: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the frames on the first ``fraction`` of scan lines, and of the rest."""
    lines = scan_lines(positions_m)
    cut = int(round(fraction * (lines.max() + 1)))
    return np.flatnonzero(lines < cut), np.flatnonzero(lines >= cut)
