import dataclasses

import numpy as np
import pytest

from bluesky_ptychonn.core.geometry import ObjectGrid, extract_patches
from bluesky_ptychonn.core.stitching import PatchStitcher, patch_window
from bluesky_ptychonn.errors import FrameError, PositionError
from bluesky_ptychonn.sim.physics import random_features_object, scan_positions


def _skip_without(device):
    """Skip where the device's torch is missing: no torch at all, or no CUDA for ``"cuda"`` (None: numpy, never)."""
    if device is None:
        return
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _scan(step_px, jitter_px=0.0, pixel=1e-8, n=16):
    pos = scan_positions("raster", step_m=step_px * pixel, shape=(6, 7), jitter_m=jitter_px * pixel, seed=2)
    grid = ObjectGrid.covering(pos, pixel, n)
    return pos, grid


def _patches(obj, grid, pos, n=16):
    p = extract_patches(obj, grid.patch_corners(pos, n), n)
    return np.abs(p), np.angle(p)


def test_exact_patches_reproduce_the_object_on_integer_positions():
    pos, grid = _scan(step_px=5)
    obj = random_features_object(grid.shape, seed=1)
    # Integer-pixel positions: the grid's corners of a raster with integer step are integers.
    assert np.allclose(grid.patch_corners(pos, 16) % 1, 0)
    stitcher = PatchStitcher(grid, 16, patch_window(16, "gaussian"))
    stitcher.add(*_patches(obj, grid, pos), pos)
    image = stitcher.snapshot()
    covered = image.weight > 0
    np.testing.assert_allclose(image.amplitude[covered], np.abs(obj)[covered], atol=1e-5)
    np.testing.assert_allclose(image.phase[covered], np.angle(obj)[covered], atol=1e-5)
    assert image.frames == len(pos)


def test_sub_pixel_positions_reproduce_a_smooth_object():
    pos, grid = _scan(step_px=5, jitter_px=0.7)
    y, x = np.mgrid[0 : grid.shape[0], 0 : grid.shape[1]]
    obj = (0.8 + 0.1 * np.sin(y / 9.0)) * np.exp(1j * 0.5 * np.cos(x / 11.0))
    stitcher = PatchStitcher(grid, 16)
    stitcher.add(*_patches(obj, grid, pos), pos)
    image = stitcher.snapshot()
    inner = image.covered(0.5)
    assert inner.sum() > 500
    assert np.abs(image.amplitude - np.abs(obj))[inner].max() < 2e-3
    assert np.abs(image.phase - np.angle(obj))[inner].max() < 5e-3


def test_phase_is_averaged_as_a_complex_mean():
    grid = ObjectGrid((20, 20), 1e-8, (0.0, 0.0))
    stitcher = PatchStitcher(grid, 4)
    pos = np.array([[1e-7, 1e-7], [1e-7, 1e-7]])
    ones = np.ones((2, 4, 4), np.float32)
    # +3.1 and -3.1 rad are 0.08 rad apart across the wrap; a plain mean would give 0.
    stitcher.add(ones, np.stack([np.full((4, 4), 3.1), np.full((4, 4), -3.1)]).astype(np.float32), pos)
    phase = stitcher.snapshot().phase[8:12, 8:12]
    assert np.all(np.abs(np.abs(phase) - np.pi) < 1e-3)


def test_incremental_equals_all_at_once_and_snapshots_any_time():
    pos, grid = _scan(step_px=4, jitter_px=0.3)
    rng = np.random.default_rng(0)
    amp, phase = rng.uniform(0.5, 1, (len(pos), 16, 16)), rng.uniform(-1, 1, (len(pos), 16, 16))
    once, parts = PatchStitcher(grid, 16), PatchStitcher(grid, 16)
    once.add(amp, phase, pos)
    parts.add(amp[:10], phase[:10], pos[:10])
    partial = parts.snapshot()
    parts.add(amp[10:], phase[10:], pos[10:])
    assert partial.frames == 10 and (partial.weight > 0).sum() < (parts.snapshot().weight > 0).sum()
    for name in ("amplitude", "phase", "weight"):
        np.testing.assert_allclose(getattr(parts.snapshot(), name), getattr(once.snapshot(), name), atol=1e-5)


def test_bad_patches_leave_the_image_unchanged():
    pos, grid = _scan(step_px=4)
    stitcher = PatchStitcher(grid, 16)
    ok = np.ones((len(pos), 16, 16))
    with pytest.raises(FrameError):
        stitcher.add(np.ones((len(pos), 8, 8)), np.ones((len(pos), 8, 8)), pos)
    with pytest.raises(PositionError):
        stitcher.add(ok, ok, pos + 1e-6)
    assert stitcher.frames == 0 and not stitcher.snapshot().weight.any()


def test_windows():
    assert patch_window(8, "uniform").sum() == 64
    central = patch_window(64, "central", width_fraction=0.25)
    assert central.sum() == 16 * 16 or central.sum() == 17 * 17
    g = patch_window(64, "gaussian")
    assert g.max() < 1 and np.allclose(g, g[::-1, ::-1])
    with pytest.raises(ValueError):
        patch_window(8, "hann")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_stitching_on_a_torch_device_matches_the_host(device):
    """The device path (``index_add_`` where the predictions are) agrees with numpy's ``bincount`` path."""
    _skip_without(device)
    rng = np.random.default_rng(3)
    n, grid = 16, ObjectGrid(shape=(80, 90), origin_m=(0.0, 0.0), pixel_size_m=1e-8)
    positions = rng.uniform(12e-8, 66e-8, size=(40, 2))
    positions[:4] = np.round(positions[:4] / 1e-8) * 1e-8  # integer corners too
    amplitude = rng.random((40, n, n)).astype(np.float32)
    phase = rng.uniform(-3, 3, (40, n, n)).astype(np.float32)
    trust = rng.random(40)
    window = patch_window(n)
    images = []
    for where in (None, device):
        stitcher = PatchStitcher(grid, n, window, trust_window=window, device=where)
        for part in np.array_split(np.arange(40), 3):
            stitcher.add(amplitude[part], phase[part], positions[part], trust[part])
        images.append((stitcher.snapshot(), stitcher.snapshot(stitcher.take_changed())))
    (host, host_block), (dev, dev_block) = images
    for key in ("amplitude", "phase", "weight", "trust"):
        np.testing.assert_allclose(getattr(dev, key), getattr(host, key), atol=2e-5, equal_nan=True)
        np.testing.assert_allclose(getattr(dev_block, key), getattr(host_block, key), atol=2e-5, equal_nan=True)
    assert dev_block.offset == host_block.offset


@pytest.mark.parametrize("device", [None, "cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_copied_sums_make_the_image_of_their_moment_whatever_is_added_after(device):
    """The live publisher copies the sums under the engine's lock and divides after: the copy must not move."""
    _skip_without(device)
    rng = np.random.default_rng(4)
    n, grid = 16, ObjectGrid(shape=(60, 70), origin_m=(0.0, 0.0), pixel_size_m=1e-8)
    positions = rng.uniform(10e-8, 50e-8, size=(30, 2))
    amplitude = rng.random((30, n, n)).astype(np.float32)
    phase = rng.uniform(-3, 3, (30, n, n)).astype(np.float32)
    window = patch_window(n)
    stitcher = PatchStitcher(grid, n, window, trust_window=window, device=device)
    stitcher.add(amplitude[:20], phase[:20], positions[:20], rng.random(20))
    block = stitcher.take_changed()
    before, copied = stitcher.snapshot(block), stitcher.sums(block)
    stitcher.add(amplitude[20:], phase[20:], positions[20:], rng.random(10))
    later = copied.image()
    assert later.frames == 20 and later.offset == before.offset == block[::2]
    for key in ("amplitude", "phase", "weight", "trust"):
        np.testing.assert_array_equal(getattr(later, key), getattr(before, key))
    assert not np.array_equal(stitcher.snapshot(block).weight, before.weight)  # the stitcher did move on


def test_the_division_where_the_sums_live_agrees_with_the_host_one():
    """On a GPU the publisher divides and takes angles with torch, on the device (``BlockSums.image``
    with ``on_host`` False); run here on CPU tensors, that branch makes the host branch's image."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    n, grid = 16, ObjectGrid(shape=(80, 90), origin_m=(0.0, 0.0), pixel_size_m=1e-8)
    positions = rng.uniform(10e-8, 50e-8, size=(30, 2))
    window = patch_window(n)
    stitcher = PatchStitcher(grid, n, window, trust_window=window, device="cpu")
    amplitude = rng.random((30, n, n)).astype(np.float32)
    stitcher.add(amplitude, rng.uniform(-3, 3, (30, n, n)).astype(np.float32), positions, rng.random(30))
    host = stitcher.sums()
    channels = ("amplitude", "phasor", "weight", "trust", "trust_weight")
    on_device = dataclasses.replace(host, on_host=False, **{k: torch.from_numpy(getattr(host, k)) for k in channels})
    expected, got = host.image(), on_device.image()
    assert (expected.weight == 0).any() and np.isnan(expected.trust).any()  # both sides of every where()
    for key in ("amplitude", "phase", "weight", "trust"):
        assert getattr(got, key).dtype == np.float32
        np.testing.assert_allclose(getattr(got, key), getattr(expected, key), atol=1e-6, equal_nan=True)
    assert (got.offset, got.frames) == (expected.offset, expected.frames) == ((0, 0), 30)


def _reference(grid, n, amplitude, phase, positions, window):
    """Independent float64 stitching, one frame and one bilinear shift at a time."""
    amp, phasor, weight = (np.zeros(grid.shape, dtype) for dtype in (float, complex, float))
    for corner, a, p in zip(grid.patch_corners(positions, n), amplitude, phase, strict=True):
        iy, ix = np.floor(corner).astype(int)
        fy, fx = corner - (iy, ix)
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                box = (slice(iy + dy, iy + dy + n), slice(ix + dx, ix + dx + n))
                w = wy * wx * window.astype(float)
                amp[box] += w * a
                phasor[box] += w * np.exp(1j * p.astype(float))
                weight[box] += w
    covered = weight > 0
    return np.where(covered, amp / np.where(covered, weight, 1), 0), phasor, weight


@pytest.mark.parametrize("device", [None, "cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_single_precision_sums_stay_within_float32_rounding_of_a_float64_reference(device):
    """The grids are float32 (half the memory): dense overlap over many batches moves nothing beyond 1e-5."""
    _skip_without(device)
    rng = np.random.default_rng(5)
    n, grid = 16, ObjectGrid(shape=(60, 60), origin_m=(0.0, 0.0), pixel_size_m=1e-8)
    positions = rng.uniform(10e-8, 50e-8, size=(600, 2))  # about 50 patches over each pixel
    amplitude = rng.uniform(0.2, 2.0, (600, n, n)).astype(np.float32)
    phase = rng.uniform(-3, 3, (600, n, n)).astype(np.float32)
    window = patch_window(n)
    stitcher = PatchStitcher(grid, n, window, device=device)
    for part in np.array_split(np.arange(600), 40):
        stitcher.add(amplitude[part], phase[part], positions[part])
    image = stitcher.snapshot()
    ref_amp, ref_phasor, ref_weight = _reference(grid, n, amplitude, phase, positions, window)
    inner = ref_weight > 1e-3 * ref_weight.max()
    assert ref_weight.max() > 10  # the overlap is dense
    np.testing.assert_allclose(image.weight, ref_weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(image.amplitude[inner], ref_amp[inner], rtol=1e-5)
    # The phase of a mean of random phasors is ill-defined where they cancel; compare where they do not.
    strong = inner & (np.abs(ref_phasor) > 0.05 * ref_weight)
    assert strong.sum() > 1000
    wrapped = np.angle(np.exp(1j * image.phase) * np.conj(ref_phasor))[strong]
    assert np.abs(wrapped).max() < 1e-4
