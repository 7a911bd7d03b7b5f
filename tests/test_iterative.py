"""Iterative reference reconstruction with pty-chi: conventions, quality on a tiny scan, bad inputs.

The scans are tiny (32-pixel frames, 8 x 8 positions) so the whole file runs in seconds on a CPU.
"""

import importlib.util
import sys

import numpy as np
import pytest

from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.geometry import GRID_MARGIN_PIXELS, ObjectGrid
from bluesky_ptychonn.core.iterative import IterativeOptions, converged, epie_step_size
from bluesky_ptychonn.core.metrics import compare
from bluesky_ptychonn.core.ptychi_engine import reconstruct_iterative
from bluesky_ptychonn.errors import ConfigurationError, FrameError, PositionError
from bluesky_ptychonn.sim.physics import simulate_scan

PHOTONS = 1e6
GEOMETRY = DetectorGeometry(frame_pixels=32)
PROBE = {"kind": "gaussian", "fwhm_px": 8}

needs_ptychi = pytest.mark.skipif(
    importlib.util.find_spec("ptychi") is None, reason="needs pty-chi (pip install bluesky-ptychonn[iterative])"
)
# pty-chi 2.2.0 keeps its (fixed) probe positions in a torch Parameter, which requires grad, and reads
# Python scalars from it when it builds the object's bounding box; torch warns on every task build.
ptychi_scalar_warning = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning"
)


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(geometry=GEOMETRY, scan_shape=(8, 8), probe=PROBE, photons_per_frame=PHOTONS)


def _run(scan, **kwargs):
    kwargs.setdefault("grid", scan.grid)
    return reconstruct_iterative(
        scan.frames,
        scan.positions_m,
        scan.probe,
        pixel_size_m=scan.grid.pixel_size_m,
        photons_per_frame=PHOTONS,
        **kwargs,
    )


@needs_ptychi
@ptychi_scalar_warning
def test_epie_with_the_known_probe_recovers_the_object(scan):
    result = _run(scan, options=IterativeOptions(epochs=30, batch_size=16))

    assert result.grid == scan.grid
    assert result.obj.shape == scan.grid.shape and result.obj.dtype == np.complex64
    assert result.amplitude.dtype == np.float32 and result.phase.dtype == np.float32
    np.testing.assert_allclose(result.probe, scan.probe, rtol=0, atol=1e-6)  # fixed probe comes back unchanged
    assert result.engine == "epie" and result.epochs == 30 and result.device == "cpu"

    errors = np.asarray(result.error_per_epoch)
    assert errors.shape == (30,)
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < errors[0] / 50, errors

    image = result.as_image()
    assert image.grid == scan.grid and image.frames == len(scan.frames)
    quality = compare(image.amplitude, image.phase, np.abs(scan.obj), np.angle(scan.obj), image.covered(0.5))
    assert quality["phase_pearson"] > 0.98, quality
    assert quality["amplitude_pearson"] > 0.98, quality
    assert quality["phase_psnr"] > 20, quality


@needs_ptychi
@ptychi_scalar_warning
def test_positions_and_flux_match_the_simulator_exactly():
    """Started from the truth on noiseless data, the model fits the frames: positions and scale agree."""
    pixel = GEOMETRY.pixel_size_m()
    # An integer step in pixels and no jitter put every window on whole pixels, where the simulator's
    # bilinear cut and pty-chi's Fourier shift agree exactly.
    truth = simulate_scan(
        geometry=GEOMETRY, scan_shape=(4, 4), step_m=5 * pixel, jitter_fraction=0, probe=PROBE, photons_per_frame=None
    )
    frames = truth.frames * PHOTONS
    assert np.allclose(truth.grid.patch_corners(truth.positions_m, 32) % 1, 0)

    def first_epoch_error(obj):
        result = reconstruct_iterative(
            frames,
            truth.positions_m,
            truth.probe,
            pixel_size_m=pixel,
            photons_per_frame=PHOTONS,
            options=IterativeOptions(epochs=1),
            grid=truth.grid,
            initial_object=obj,
        )
        return result.error_per_epoch[0]

    exact = first_epoch_error(truth.obj)
    shifted = first_epoch_error(np.roll(truth.obj, 1, axis=1))  # one pixel off in x
    # Mean squared amplitude misfit per pixel: ~1e-11 here (float32 round-off) against ~1 for a
    # one-pixel offset, ~0.25 for a half-pixel one and ~5 for a flux 20 % off.
    assert exact < 1e-6, exact
    assert shifted > 0.1, shifted


@needs_ptychi
@ptychi_scalar_warning
def test_global_torch_state_is_restored_and_runs_repeat(scan):
    import torch

    device, dtype = torch.get_default_device(), torch.get_default_dtype()
    np_state, torch_state = np.random.get_state(), torch.random.get_rng_state()

    first = _run(scan, options=IterativeOptions(epochs=2, batch_size=16, seed=3))
    second = _run(scan, options=IterativeOptions(epochs=2, batch_size=16, seed=3))

    assert torch.get_default_device() == device and torch.get_default_dtype() == dtype
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    np.testing.assert_array_equal(first.obj, second.obj)
    assert first.error_per_epoch == second.error_per_epoch


@needs_ptychi
@ptychi_scalar_warning
def test_lsqml_runs_on_a_grid_sized_from_the_positions(scan, capsys):
    result = _run(scan, grid=None, options=IterativeOptions(engine="lsqml", epochs=3), progress=True)

    expected = ObjectGrid.covering(scan.positions_m, scan.grid.pixel_size_m, 32, margin_pixels=GRID_MARGIN_PIXELS)
    assert result.grid == expected and result.obj.shape == expected.shape
    assert result.engine == "lsqml" and len(result.error_per_epoch) == 3
    assert np.all(np.isfinite(result.error_per_epoch)) and np.all(np.isfinite(result.obj))
    assert result.error_per_epoch[-1] < result.error_per_epoch[0]
    assert "iterative" in capsys.readouterr().err  # the progress bar


@needs_ptychi
@ptychi_scalar_warning
def test_the_stopping_rule_ends_a_converged_run_before_the_epoch_limit(scan):
    # Started from the truth, little is left to gain: the error soon stalls at the noise floor.
    options = IterativeOptions(epochs=50, batch_size=16, stop_tolerance=0.01, stop_window=3, min_epochs=5)
    result = _run(scan, options=options, initial_object=scan.obj)
    assert result.stopped_by == "tolerance" and 5 <= result.epochs < 50
    assert len(result.error_per_epoch) == result.epochs
    assert converged(result.error_per_epoch, options) and not converged(result.error_per_epoch[:-1], options)

    unbounded = _run(scan, options=options.model_copy(update={"stop_tolerance": None, "epochs": 6}))
    assert unbounded.stopped_by == "max_epochs" and unbounded.epochs == 6


@needs_ptychi
@ptychi_scalar_warning
def test_the_monitor_sees_every_epoch_and_can_stop_the_run(scan):
    seen = []

    def monitor(epoch, error, current_object):
        obj = current_object() if epoch == 3 else None  # fetched only when asked
        seen.append((epoch, error, obj))
        return epoch == 3

    result = _run(scan, options=IterativeOptions(epochs=20, batch_size=16), monitor=monitor)
    assert [epoch for epoch, _, _ in seen] == [1, 2, 3]
    assert [error for _, error, _ in seen] == result.error_per_epoch
    assert result.stopped_by == "monitor" and result.epochs == 3
    np.testing.assert_array_equal(seen[-1][2], result.obj)  # the object after the epoch that stopped it


def test_the_stopping_rule_compares_the_error_over_its_window():
    options = IterativeOptions(epochs=100, stop_tolerance=0.1, stop_window=2, min_epochs=4)
    assert not converged([1.0, 1.0, 1.0], options)  # before min_epochs
    assert not converged([4.0, 3.0, 2.0, 1.0], options)  # halved over the window
    assert not converged([4.0, 3.0, 1.0, 0.95], options)  # the window reaches back two epochs, to 3.0
    assert converged([4.0, 1.0, 0.98, 0.95], options)  # 5 % over two epochs
    assert converged([4.0, 1.0, 0.9, 1.2], options)  # a rise
    assert converged([4.0, 1.0, 0.9, float("nan")], options)  # diverged
    assert not converged([4.0, 1.0, 0.98, 0.95], options.model_copy(update={"stop_tolerance": None}))


def test_epie_step_size_follows_the_overlap_in_one_batch():
    assert epie_step_size(4.0, batch_size=1, n_frames=10_000) == pytest.approx(1.0, abs=1e-3)  # sequential ePIE
    assert epie_step_size(4.0, batch_size=100, n_frames=64) == pytest.approx(0.25)  # the whole scan in one batch
    assert epie_step_size(0.5, batch_size=100, n_frames=64) == 1.0
    assert epie_step_size(4.0, 10, 100) > epie_step_size(4.0, 50, 100) > epie_step_size(8.0, 50, 100)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"frames": lambda s: s.frames[:-1]}, FrameError),  # one frame short of the positions
        ({"positions_m": lambda s: s.positions_m[:-1]}, FrameError),
        ({"probe": lambda s: s.probe[:16, :16]}, ConfigurationError),  # probe smaller than the frames
        ({"probe": lambda s: s.probe[:, :16]}, ConfigurationError),  # not square
        ({"frames": lambda s: -s.frames.astype(np.float32)}, FrameError),  # negative counts
        ({"grid": lambda s: ObjectGrid(s.grid.shape, 2 * s.grid.pixel_size_m, s.grid.origin_m)}, ConfigurationError),
        ({"grid": lambda s: ObjectGrid((40, 40), s.grid.pixel_size_m, s.grid.origin_m)}, PositionError),  # too small
        ({"initial_object": lambda s: np.ones((3, 3), np.complex64)}, ConfigurationError),
        ({"photons_per_frame": lambda s: 0.0}, ConfigurationError),
    ],
)
def test_bad_inputs_raise_the_package_errors_before_any_work(scan, change, error):
    kwargs = {
        "frames": scan.frames,
        "positions_m": scan.positions_m,
        "probe": scan.probe,
        "pixel_size_m": scan.grid.pixel_size_m,
        "photons_per_frame": PHOTONS,
        "grid": scan.grid,
    }
    kwargs.update({key: make(scan) for key, make in change.items()})
    with pytest.raises(error):
        reconstruct_iterative(**kwargs)


def test_bad_options_are_refused():
    for bad in (
        {"epochs": 0},
        {"engine": "dm"},
        {"object_step_size": -1.0},
        {"device": "tpu"},
        {"unknown": 1},
        {"stop_tolerance": 0.0},
        {"stop_tolerance": 1.0},
        {"stop_window": 0},
        {"min_epochs": 0},
    ):
        with pytest.raises(ValueError):
            IterativeOptions(**bad)


def test_missing_ptychi_names_the_install_command(scan, monkeypatch):
    monkeypatch.setitem(sys.modules, "ptychi", None)  # makes `import ptychi...` fail as if not installed
    monkeypatch.setitem(sys.modules, "ptychi.api", None)
    with pytest.raises(ConfigurationError, match=r"pip install bluesky-ptychonn\[iterative\]"):
        _run(scan, options=IterativeOptions(epochs=1))
