import numpy as np
import pytest

from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.errors import ConfigurationError
from bluesky_ptychonn.sim.physics import (
    diffraction_patterns,
    far_field,
    gaussian_probe,
    make_probe,
    object_from_images,
    probe_diameter_px,
    random_features_object,
    scan_positions,
    simulate_scan,
    zone_plate_probe,
)


def test_objects_are_seeded_and_physical():
    a = random_features_object((128, 128), seed=3)
    assert a.dtype == np.complex64
    np.testing.assert_array_equal(a, random_features_object((128, 128), seed=3))
    assert not np.array_equal(a, random_features_object((128, 128), seed=4))
    amp, phase = np.abs(a), np.angle(a)
    assert 0.65 < amp.min() and amp.max() <= 1.0 + 1e-6
    assert 0 <= phase.min() and phase.max() <= 1.0 + 1e-6
    # Projected thickness: thicker is darker and more phase-shifted.
    assert np.corrcoef(amp.ravel(), phase.ravel())[0, 1] < -0.99


def test_object_from_two_images():
    y, x = np.mgrid[0:32, 0:32]
    obj = object_from_images(x, y, amplitude_range=(0.5, 1.0), phase_range_rad=(0.0, 1.0))
    assert np.abs(obj).min() == pytest.approx(0.5) and np.abs(obj).max() == pytest.approx(1.0)
    assert np.angle(obj)[-1, 0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("probe", [zone_plate_probe(64), gaussian_probe(64, fwhm_px=12)])
def test_probes_are_centred_and_normalised(probe):
    intensity = np.abs(probe) ** 2
    assert intensity.sum() == pytest.approx(1.0, rel=1e-5)
    idx = np.arange(64)
    assert (intensity.sum(axis=1) * idx).sum() == pytest.approx(31.5, abs=1e-3)
    assert (intensity.sum(axis=0) * idx).sum() == pytest.approx(31.5, abs=1e-3)
    assert 5 < probe_diameter_px(probe) < 40


def test_make_probe_rejects_unknown_kinds_and_parameters():
    with pytest.raises(ConfigurationError, match="unknown probe"):
        make_probe("pinhole", 64)
    with pytest.raises(ConfigurationError, match="bad parameters"):
        make_probe("gaussian", 64, radius=3)


def test_scan_paths():
    raster = scan_positions("raster", step_m=1e-7, shape=(3, 4))
    assert raster.shape == (12, 2)
    np.testing.assert_allclose(raster.mean(axis=0), 0, atol=1e-20)
    snake = scan_positions("snake", step_m=1e-7, shape=(3, 4))
    np.testing.assert_allclose(snake[4:8, 1], raster[4:8, 1][::-1])
    fermat = scan_positions("fermat", step_m=1e-7, n_points=200)
    nearest = np.sort(np.linalg.norm(fermat[:, None] - fermat[None], axis=-1), axis=1)[:, 1]
    assert 0.5e-7 < np.median(nearest) < 1.5e-7
    jittered = scan_positions("raster", step_m=1e-7, shape=(3, 4), jitter_m=1e-9, seed=1)
    assert 0 < np.abs(jittered - raster).max() < 1e-8
    for bad in (dict(step_m=0.0), dict(step_m=-1e-7), dict(step_m=1e-7, jitter_m=-1.0)):
        with pytest.raises(ConfigurationError):
            scan_positions("raster", **bad)


def test_far_field_conserves_photons_and_centres_zero_frequency():
    wave = np.ones((1, 16, 16), np.complex64) / 16
    intensity = far_field(wave)
    assert intensity.sum() == pytest.approx(1.0, rel=1e-5)
    assert intensity[0, 8, 8] == pytest.approx(1.0, rel=1e-5)


def test_noise_is_poisson_at_the_photon_count():
    grid = ObjectGrid((80, 80), 1e-8, (0.0, 0.0))
    obj = np.ones(grid.shape, np.complex64)
    probe = gaussian_probe(32, fwhm_px=8)
    pos = np.full((200, 2), 40e-8)
    counts = diffraction_patterns(obj, grid, probe, pos, photons_per_frame=1e4, seed=1)
    assert counts.dtype == np.uint32
    assert counts.sum(axis=(1, 2)).mean() == pytest.approx(1e4, rel=0.01)
    with pytest.raises(ConfigurationError):
        diffraction_patterns(obj, grid, probe, pos, photons_per_frame=0)


def test_simulate_scan_is_repeatable_and_consistent():
    geometry = DetectorGeometry(frame_pixels=32)
    kw = dict(geometry=geometry, scan_shape=(4, 5), probe={"kind": "gaussian", "fwhm_px": 8})
    a, b = simulate_scan(**kw), simulate_scan(**kw)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.frames.shape == (20, 32, 32) and a.grid.pixel_size_m == geometry.pixel_size_m()
    amp, phase = a.truth_patches()
    assert amp.shape == (20, 32, 32)
    # Noiseless frames of the truth patches equal the simulator's forward model.
    clean = simulate_scan(**kw, photons_per_frame=None)
    np.testing.assert_allclose(clean.frames, far_field(amp * np.exp(1j * phase) * a.probe), rtol=1e-3, atol=1e-7)
