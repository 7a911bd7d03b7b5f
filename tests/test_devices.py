"""The simulated stage, sample and diffraction detector, driven directly (no RunEngine)."""

import time

import h5py
import numpy as np
import pytest
from ophyd.utils import LimitError

from bluesky_ptychonn.acquisition.devices import DATASETS, SimStage
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.errors import ConfigurationError, PositionError
from bluesky_ptychonn.files.scanfile import read_scan
from bluesky_ptychonn.sim.physics import diffraction_patterns
from bluesky_ptychonn.sim.sample import (
    DetectorSettings,
    FlyScan,
    FlyTrajectory,
    SampleRegistry,
    SimulatedSample,
    default_registry,
)


def _fly(detector, trajectory):
    scan = FlyScan(trajectory=trajectory, settings=detector.settings, sample=detector.sample)
    assert detector.prepare(scan).done
    assert detector.kickoff().done
    detector.complete().wait(30)
    return scan


def _trajectory(shape=(4, 5), step_m=2e-7, center_m=(0.0, 0.0), exposure_s=1e-3):
    return FlyTrajectory("snake", shape, step_m, center_m, period_s=exposure_s, exposure_s=exposure_s)


def test_stage_has_metre_units_limits_and_velocity():
    stage = SimStage(name="st", limits_m=(-1e-5, 2e-5), velocity_m_s=1e-3)
    assert stage.x.egu == "m" and stage.y.limits == (-1e-5, 2e-5)
    assert stage.x.velocity.get() == 1e-3
    stage.x.set(1.5e-5).wait(5)
    assert stage.position_m == (0.0, 1.5e-5)
    with pytest.raises(LimitError):
        stage.y.set(-2e-5)
    assert stage.position_m == (0.0, 1.5e-5)
    with pytest.raises(ConfigurationError):
        SimStage(name="bad", limits_m=(1e-5, -1e-5))


def test_detector_writes_frames_positions_and_ids_to_one_swmr_file(tmp_path, make_devices):
    stage, detector = make_devices(tmp_path, chunk_frames=8, encoder_noise_m=1e-9)
    trajectory = _trajectory(center_m=(1e-7, -2e-7))
    _fly(detector, trajectory)
    with h5py.File(detector.path, "r", swmr=True) as f:  # only a file written for SWMR opens so
        assert f["entry/data/data"].chunks == (8, 32, 32) and f["entry/data/data"].maxshape[0] is None
    scan = read_scan(detector.path)  # the core reader opens a detector file
    n = trajectory.num_points
    assert scan.frames.shape == (n, 32, 32) and scan.frames.dtype == np.uint32
    np.testing.assert_array_equal(scan.frame_ids, np.arange(n))
    error = scan.positions_m - trajectory.positions_m()
    assert 0 < np.abs(error).max() < 6e-9  # recorded = trajectory + encoder noise
    assert scan.geometry == detector.settings.geometry
    assert stage.position_m == tuple(trajectory.positions_m()[-1])  # the stage followed the flight

    docs = list(detector.collect_asset_docs())
    assert [name for name, _ in docs] == ["stream_resource", "stream_datum"] * 3
    resources = [doc for name, doc in docs if name == "stream_resource"]
    assert {r["data_key"]: r["parameters"]["dataset"] for r in resources} == DATASETS
    assert all(r["uri"] == f"file://localhost{detector.path}" for r in resources)
    assert all(doc["indices"] == {"start": 0, "stop": n} for name, doc in docs if name == "stream_datum")
    assert list(detector.collect_asset_docs()) == []  # nothing new to announce
    keys = detector.describe_collect()
    assert all(k["external"] == "STREAM:" and "dtype_numpy" in k and "units" in k for k in keys.values())
    assert keys["diffraction"]["shape"] == [32, 32] and keys["positions_m"]["shape"] == [2]


def test_frames_are_the_core_simulators_patterns_at_the_trajectory(tmp_path, make_devices):
    _, detector = make_devices(tmp_path, photons_per_frame=1e9, encoder_noise_m=5e-9)
    trajectory = _trajectory(shape=(2, 3))
    _fly(detector, trajectory)
    frames = read_scan(detector.path).frames / 1e9
    sample = detector.sample
    expected = diffraction_patterns(
        sample.object, sample.grid, detector.settings.probe_array(), trajectory.positions_m(), photons_per_frame=None
    )
    assert np.linalg.norm(frames - expected) < 1e-3 * np.linalg.norm(expected)  # Poisson noise at 1e9 photons


def test_noise_is_repeatable_per_seed(tmp_path, make_devices):
    runs = []
    for seed in (0, 0, 1):
        _, detector = make_devices(tmp_path, seed=seed, chunk_frames=3)
        _fly(detector, _trajectory(shape=(2, 4)))
        runs.append(read_scan(detector.path))
    np.testing.assert_array_equal(runs[0].frames, runs[1].frames)
    np.testing.assert_array_equal(runs[0].positions_m, runs[1].positions_m)
    assert not np.array_equal(runs[0].frames, runs[2].frames)


def test_motion_blur_averages_along_the_exposure(tmp_path, make_devices):
    _, detector = make_devices(tmp_path, photons_per_frame=1e9, blur_samples=4)
    trajectory = _trajectory(shape=(1, 3), step_m=5e-7)
    _fly(detector, trajectory)
    sample, probe = detector.sample, detector.settings.probe_array()
    sharp = diffraction_patterns(sample.object, sample.grid, probe, trajectory.positions_m(), photons_per_frame=None)
    positions = trajectory.positions_m()
    blurred = np.mean(
        [
            diffraction_patterns(sample.object, sample.grid, probe, positions + [0, dx], photons_per_frame=None)
            for dx in trajectory.blur_offsets_m(4)
        ],
        axis=0,
    )
    frames = read_scan(detector.path).frames / 1e9
    assert np.abs(frames - blurred).max() < 0.1 * np.abs(frames - sharp).max()


def test_stop_keeps_written_frames_readable(tmp_path, make_devices):
    _, detector = make_devices(tmp_path, paced=True, exposure_s=0.01, chunk_frames=2)
    trajectory = _trajectory(shape=(10, 10), exposure_s=0.01)
    scan = FlyScan(trajectory=trajectory, settings=detector.settings, sample=detector.sample)
    detector.prepare(scan)
    detector.kickoff()
    deadline = time.monotonic() + 30
    while detector.get_index() < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    detector.stop()
    assert detector.complete().done and detector.complete().success
    written = read_scan(detector.path)
    assert 4 <= len(written.frames) < 100
    np.testing.assert_array_equal(written.frame_ids, np.arange(len(written.frames)))


def test_sample_registry_and_regions():
    registry = SampleRegistry()
    sample = registry.register(SimulatedSample("s1", seed=1, shape_px=(64, 80), pixel_size_m=1e-7))
    assert registry.get("s1") is sample and "s1" in registry
    with pytest.raises(ConfigurationError, match="unknown sample 'nope'"):
        registry.get("nope")
    with pytest.raises(ConfigurationError):
        registry.register(SimulatedSample("s1", seed=2, shape_px=(64, 80), pixel_size_m=1e-7))
    assert sample.object is sample.object  # generated once
    grid, (rows, cols) = sample.region(np.array([[0.0, 0.0], [5e-7, 1e-6]]), 16)
    assert grid.shape == (rows.stop - rows.start, cols.stop - cols.start)
    np.testing.assert_allclose(grid.origin_m, sample.grid.to_metres(np.array([[rows.start, cols.start]]))[0])
    assert {"sim-features-0", "sim-features-1"} <= set(default_registry())


def test_bad_settings_and_mismatched_geometry_are_configuration_errors(small_sample):
    with pytest.raises(ValueError, match="unknown probe kind"):  # pydantic's ValidationError
        DetectorSettings(probe={"kind": "laser"})
    with pytest.raises(ConfigurationError, match="photons_per_frame"):
        DetectorSettings().updated(photons_per_frame=0)
    wrong = DetectorSettings(geometry=DetectorGeometry(frame_pixels=64))
    with pytest.raises(ConfigurationError, match="register a sample"):
        FlyScan(_trajectory(), wrong, small_sample).check()
    far = _trajectory(center_m=(0.0, 2e-5))
    with pytest.raises(PositionError, match="beyond sample"):
        FlyScan(far, DetectorSettings(geometry=DetectorGeometry(frame_pixels=32)), small_sample).check()
