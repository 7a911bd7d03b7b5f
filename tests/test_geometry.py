import numpy as np
import pytest

from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.geometry import ObjectGrid, extract_patches, real_space_pixel_m, wavelength_m
from bluesky_ptychonn.core.stitching import PatchStitcher
from bluesky_ptychonn.errors import ConfigurationError, PositionError


def test_wavelength_and_pixel_size():
    assert wavelength_m(10_000) == pytest.approx(1.23984e-10, rel=1e-5)
    # lambda z / (N p): 1.2398e-10 * 2 / (64 * 75e-6)
    assert real_space_pixel_m(10_000, 2.0, 64, 75e-6) == pytest.approx(5.1662e-8, rel=1e-4)
    g = DetectorGeometry()
    # Cropping to half the frame doubles the pixel; binning by 2 keeps it.
    assert g.pixel_size_m(crop_pixels=32) == pytest.approx(2 * g.pixel_size_m())
    assert g.pixel_size_m(bin_factor=2) == pytest.approx(g.pixel_size_m())
    with pytest.raises(ConfigurationError):
        wavelength_m(0)


def test_positions_to_pixels_and_back():
    rng = np.random.default_rng(1)
    pos = rng.uniform(-2e-6, 2e-6, (50, 2))
    grid = ObjectGrid.covering(pos, 5e-8, 64)
    pix = grid.to_pixels(pos)
    np.testing.assert_allclose(grid.to_metres(pix), pos, atol=1e-18)
    # Every patch fits, with the margin on each side.
    corners = grid.patch_corners(pos, 64)
    assert corners.min() >= 0 and (corners.max(axis=0) + 64 <= np.asarray(grid.shape)).all()
    assert ObjectGrid.from_metadata(grid.as_metadata()) == grid


def test_positions_off_the_grid_are_named():
    grid = ObjectGrid((100, 100), 1e-8, (0.0, 0.0))
    with pytest.raises(PositionError, match="position 1 "):
        grid.patch_corners(np.array([[5e-7, 5e-7], [9.9e-7, 5e-7]]), 16)
    with pytest.raises(PositionError, match="shape"):
        grid.to_pixels(np.zeros((3, 3)))
    with pytest.raises(PositionError, match="NaN"):
        grid.to_pixels(np.array([[np.nan, 0.0]]))


def test_pixel_centre_convention_on_a_symmetric_scan():
    """A scan symmetric about (0, 0) gives a weight map symmetric about the grid centre."""
    step = 7e-8
    iy, ix = np.mgrid[-2:3, -2:3]
    pos = np.stack([iy.ravel(), ix.ravel()], axis=1) * step
    grid = ObjectGrid.covering(pos, 1e-8, 16)
    # The centre of the grid is at position 0: origin + (shape - 1) / 2 * pixel == 0.
    np.testing.assert_allclose(np.asarray(grid.origin_m) + (np.asarray(grid.shape) - 1) / 2 * 1e-8, 0, atol=1e-15)
    stitcher = PatchStitcher(grid, 16)
    ones = np.ones((len(pos), 16, 16), np.float32)
    stitcher.add(ones, 0 * ones, pos)
    w = stitcher.snapshot().weight
    np.testing.assert_allclose(w, w[::-1, ::-1], atol=1e-5)
    np.testing.assert_allclose(w, w.T, atol=1e-5)


def test_extract_patches_at_integer_and_half_pixels():
    image = np.arange(100, dtype=np.float64).reshape(10, 10)
    np.testing.assert_array_equal(extract_patches(image, np.array([[2.0, 3.0]]), 4)[0], image[2:6, 3:7])
    half = extract_patches(image, np.array([[2.0, 3.5]]), 4)[0]
    np.testing.assert_allclose(half, (image[2:6, 3:7] + image[2:6, 4:8]) / 2)
