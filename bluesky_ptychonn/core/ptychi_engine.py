"""Iterative reference reconstruction with pty-chi (ePIE or LSQML), on the project's object grid.

This is the physics-based yardstick for the network: the same frames, positions and probe, solved
by a classical engine, returned on an :class:`~bluesky_ptychonn.core.geometry.ObjectGrid` so it can be
compared pixel for pixel with simulation truth or a stitched network image. Install the optional
dependency with ``pip install bluesky-ptychonn[iterative]``; torch and pty-chi are imported only
when a reconstruction runs.

How the project's conventions map onto pty-chi 2.2.0 (checked by experiment, see the method notes):

* Frames are raw counts with the zero frequency at the centre, so ``fft_shift=True``.
* pty-chi's far field is an unnormalised FFT, while :mod:`~bluesky_ptychonn.sim.physics` uses an
  orthonormal one and a probe of unit total intensity; the probe handed to pty-chi is therefore
  ``probe * sqrt(photons_per_frame) / n``.
* Positions are given as the fractional top-left corners of the probe window on the grid with
  ``position_origin_coords = (n - 1) / 2`` (method ``SPECIFIED``): pty-chi then places the window
  centre exactly at the grid pixel of the probe centre. Fractional corners become sub-pixel
  Fourier shifts of the probe.
* With a known probe, pty-chi's object-probe rescaling is switched off (it would rescale the
  object every 10 epochs even though the probe is fixed).
* pty-chi sets torch's global default device and dtypes and draws from the global random
  generators; :func:`reconstruct_iterative` seeds those and restores all of them before it returns.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import ConfigurationError, FrameError
from .device import choose_device
from .geometry import GRID_MARGIN_PIXELS, ObjectGrid, check_positions
from .iterative import (
    DEFAULT_BATCH_SIZE,
    LSQML_STEP_SIZE,
    EpochMonitor,
    IterativeOptions,
    IterativeResult,
    StopReason,
    converged,
    epie_step_size,
)
from .preprocess import check_frames
from .stitching import PatchStitcher

# pty-chi 2.2 reads Python scalars from its fixed probe positions, a torch Parameter that requires
# grad; torch warns on every epoch (from its own module, so the filter matches the message). Harmless
# (the positions are not refined here) and not ours to fix: silenced here, not on the user's terminal.
warnings.filterwarnings(
    "ignore", message="Converting a tensor with requires_grad=True to a scalar", category=UserWarning
)

__all__ = ["reconstruct_iterative"]

_INSTALL_HINT = "pip install bluesky-ptychonn[iterative]"


def reconstruct_iterative(
    frames: np.ndarray,
    positions_m: np.ndarray,
    probe: np.ndarray,
    *,
    pixel_size_m: float,
    photons_per_frame: float,
    options: IterativeOptions | None = None,
    grid: ObjectGrid | None = None,
    initial_object: np.ndarray | None = None,
    progress: bool = False,
    monitor: EpochMonitor | None = None,
) -> IterativeResult:
    """Reconstruct the object of a whole scan with pty-chi.

    Parameters
    ----------
    frames : (N, n, n) array of counts
        Detector frames, zero frequency at the centre (as
        :func:`~bluesky_ptychonn.sim.physics.simulate_scan` writes them), any numeric dtype.
    positions_m : (N, 2) float
        Probe centres (y, x) in metres.
    probe : (n, n) complex
        The illumination, normalised to unit total intensity as in :mod:`~bluesky_ptychonn.sim.physics`.
    pixel_size_m : float
        Real-space pixel size of the frames (:meth:`~bluesky_ptychonn.core.config.DetectorGeometry.pixel_size_m`).
    photons_per_frame : float
        Photons per frame through free space, which sets the probe's absolute scale (the simulator's
        ``photons_per_frame``). For measured data without a flux reading, the largest frame sum over
        a transparent region is a fair estimate; an error here scales the recovered amplitude.
    options : IterativeOptions, optional
        Engine, epochs (the most that run), stopping rule and step sizes; defaults to 100 epochs of
        ePIE with the probe fixed.
    grid : ObjectGrid, optional
        Grid to reconstruct on, e.g. the simulation's, so the result compares pixel for pixel with
        its truth. Its pixel size must be ``pixel_size_m``. Default: the smallest grid covering every
        probe window plus a margin of :data:`GRID_MARGIN_PIXELS`.
    initial_object : (H, W) complex, optional
        Starting guess on ``grid`` (e.g. a network reconstruction); default a flat object of ones.
    progress : bool
        Show a progress bar over the epochs.
    monitor : EpochMonitor, optional
        Called after each epoch with ``(epoch, error, current_object)``, where ``current_object()``
        returns the (H, W) complex64 object then (copied only when called); True stops the run.
        Benchmarks record quality per epoch with it; its time is not counted in ``seconds``.

    Returns
    -------
    IterativeResult

    Raises
    ------
    FrameError
        Frames not (N, n, n), holding NaN or negative counts, or not one per position.
    PositionError
        Malformed positions, or a probe window that leaves ``grid``.
    ConfigurationError
        A probe that is not square, not finite or does not match the frames; a grid of another
        pixel size or an initial object of another shape; a non-positive flux; CUDA requested but
        absent; pty-chi not installed.
    """
    options = options or IterativeOptions()
    probe = np.asarray(probe)
    if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
        raise ConfigurationError(f"probe must be a square (n, n) array, got shape {probe.shape}")
    if not np.all(np.isfinite(probe)) or not np.any(probe):
        raise ConfigurationError("probe must be finite and not all zero")
    n = probe.shape[0]
    if np.ndim(frames) == 3 and tuple(np.shape(frames)[1:]) != probe.shape:
        raise ConfigurationError(f"probe shape {probe.shape} does not match the frames' shape {np.shape(frames)[1:]}")
    frames = check_frames(frames, probe.shape)
    positions = check_positions(positions_m)
    if len(frames) != len(positions):
        raise FrameError(f"{len(frames)} frames but {len(positions)} positions")
    if not photons_per_frame > 0:
        raise ConfigurationError(f"photons per frame must be positive, got {photons_per_frame!r}")
    if not pixel_size_m > 0:
        raise ConfigurationError(f"pixel size must be positive, got {pixel_size_m!r} m")
    if grid is None:
        grid = ObjectGrid.covering(positions, pixel_size_m, n, margin_pixels=GRID_MARGIN_PIXELS)
    elif not np.isclose(grid.pixel_size_m, pixel_size_m, rtol=1e-9, atol=0):
        raise ConfigurationError(f"grid pixel size {grid.pixel_size_m!r} m differs from the frames' {pixel_size_m!r} m")
    if initial_object is None:
        initial_object = np.ones(grid.shape, np.complex64)
    elif np.shape(initial_object) != grid.shape or not np.all(np.isfinite(initial_object)):
        raise ConfigurationError(
            f"initial object must be finite and of the grid's shape {grid.shape}, got shape {np.shape(initial_object)}"
        )
    # Fractional top-left corners of every probe window on the grid (raises PositionError off the grid).
    corners = grid.patch_corners(positions, n)
    illumination = _illumination(grid, probe, positions)
    batch_size = options.batch_size or DEFAULT_BATCH_SIZE[options.engine]
    if options.object_step_size is not None:
        step = options.object_step_size
    elif options.engine == "epie":
        step = epie_step_size(float(illumination.max()), batch_size, len(frames))
    else:
        step = LSQML_STEP_SIZE

    torch, api, ptychi_utils = _import_ptychi()
    # pty-chi would fall back to the CPU with only a log line on a missing GPU; choose_device refuses.
    device = str(choose_device(options.device))
    # pty-chi's FFT is unnormalised; the simulator's is orthonormal with a unit-intensity probe.
    flux_scale = np.sqrt(photons_per_frame) / n
    with _contained_torch_globals(torch, ptychi_utils, seed=options.seed):
        task_options = _task_options(
            api, options, pixel_size_m=pixel_size_m, n=n, device=device, batch_size=batch_size, step_size=step
        )
        task = api.task.PtychographyTask(
            task_options,
            diffraction_data=frames.astype(np.float32),
            object_data=np.asarray(initial_object, np.complex64)[None],
            probe_data=(probe * flux_scale).astype(np.complex64)[None, None],
            probe_position_y_px=corners[:, 0].astype(np.float32),
            probe_position_x_px=corners[:, 1].astype(np.float32),
        )
        with task:
            ran_on = str(torch.get_default_device())
            errors, seconds, stopped_by = _run_epochs(task, options, progress, monitor)
            obj = task.get_data_to_cpu("object", as_numpy=True)[0].astype(np.complex64)
            probe_out = (task.get_data_to_cpu("probe", as_numpy=True)[0, 0] / flux_scale).astype(np.complex64)
    return IterativeResult(
        obj=obj,
        probe=probe_out,
        illumination=illumination,
        grid=grid,
        frames=len(frames),
        engine=options.engine,
        epochs=len(errors),
        step_size=step,
        error_per_epoch=errors,
        seconds=seconds,
        device=ran_on,
        stopped_by=stopped_by,
    )


# ----------------------------------------------------------------------------------------------
# pty-chi plumbing


def _import_ptychi() -> tuple[Any, Any, Any]:
    """Import torch and pty-chi, or say how to install them."""
    try:
        import ptychi.api as api
        import ptychi.api.task  # noqa: F401  (PtychographyTask lives here)
        import ptychi.utils as ptychi_utils
        import torch
    except ImportError as err:
        raise ConfigurationError(
            f"iterative reconstruction needs pty-chi ({err}); install it with `{_INSTALL_HINT}`"
        ) from err
    return torch, api, ptychi_utils


@contextmanager
def _contained_torch_globals(torch: Any, ptychi_utils: Any, *, seed: int | None) -> Iterator[None]:
    """Restore what building a pty-chi task changes globally: default device and dtypes, random states."""
    device = torch.get_default_device()
    dtype = torch.get_default_dtype()
    complex_dtype = ptychi_utils.get_default_complex_dtype()
    rng_states = (np.random.get_state(), torch.random.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    if seed is not None:
        # LSQML draws from torch's global generator, pty-chi's compact batching from numpy's.
        np.random.seed(seed)
        torch.manual_seed(seed)
    try:
        yield
    finally:
        # None is torch's own unset state; setting "cpu" instead would install a device mode that
        # slows every later torch call.
        torch.set_default_device(None if device.type == "cpu" else device)
        torch.set_default_dtype(dtype)
        ptychi_utils.set_default_complex_dtype(complex_dtype)
        np.random.set_state(rng_states[0])
        torch.random.set_rng_state(rng_states[1])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _task_options(
    api: Any, options: IterativeOptions, *, pixel_size_m: float, n: int, device: str, batch_size: int, step_size: float
) -> Any:
    """pty-chi task options for a far-field scan with the probe known (or refined)."""
    if options.engine == "epie":
        task_options = api.EPIEOptions()
        # alpha = 1: the step size alone sets the update (ePIE's weight is alpha conj(P) / max|P|^2).
        task_options.object_options.alpha = 1.0
        task_options.probe_options.alpha = 1.0
    else:
        task_options = api.LSQMLOptions()
        task_options.reconstructor_options.noise_model = api.NoiseModels.GAUSSIAN
        # The given probe already carries the right flux; do not let LSQML rescale it.
        task_options.reconstructor_options.rescale_probe_intensity_in_first_epoch = False

    task_options.data_options.fft_shift = True

    obj = task_options.object_options
    obj.pixel_size_m = pixel_size_m
    obj.optimizable = True
    obj.optimizer = api.Optimizers.SGD
    obj.step_size = step_size
    obj.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SPECIFIED
    obj.position_origin_coords = [(n - 1) / 2, (n - 1) / 2]
    obj.remove_object_probe_ambiguity.enabled = options.refine_probe

    probe = task_options.probe_options
    probe.optimizable = options.refine_probe
    probe.optimizer = api.Optimizers.SGD
    probe.step_size = step_size

    task_options.probe_position_options.optimizable = False

    rec = task_options.reconstructor_options
    rec.num_epochs = options.epochs
    rec.batch_size = batch_size
    rec.default_device = api.Devices.GPU if device.startswith("cuda") else api.Devices.CPU
    # Seeding is done (and undone) by _contained_torch_globals, not by pty-chi's global reseed.
    rec.random_seed = None
    return task_options


def _run_epochs(
    task: Any, options: IterativeOptions, progress: bool, monitor: EpochMonitor | None
) -> tuple[list[float], float, StopReason]:
    """Run epochs one at a time until the limit, the stopping rule or the monitor ends them.

    Returns the error per epoch, the seconds spent in pty-chi (not in the monitor) and why it stopped.
    """
    from tqdm import tqdm

    def current_object() -> np.ndarray:
        return task.get_data_to_cpu("object", as_numpy=True)[0].astype(np.complex64)

    errors: list[float] = []
    seconds = 0.0
    stopped_by: StopReason = "max_epochs"
    with tqdm(total=options.epochs, desc="iterative", unit="epoch", disable=not progress) as bar:
        for epoch in range(1, options.epochs + 1):
            start = time.perf_counter()
            task.run(1)
            seconds += time.perf_counter() - start
            # pty-chi's loss tracker appends one row per epoch: the mean of the epoch's minibatch losses.
            errors.append(float(task.reconstructor.loss_tracker.table["loss"].to_numpy()[-1]))
            bar.update(1)
            if monitor is not None and monitor(epoch, errors[-1], current_object):
                stopped_by = "monitor"
                break
            if converged(errors, options):
                stopped_by = "tolerance"
                break
    return errors, seconds, stopped_by


def _illumination(grid: ObjectGrid, probe: np.ndarray, positions_m: np.ndarray) -> np.ndarray:
    """Summed probe intensity on the grid, in units of the probe's peak intensity."""
    intensity = np.abs(probe) ** 2
    stitcher = PatchStitcher(grid, probe.shape[0], intensity / intensity.max())
    ones = np.ones((len(positions_m), *probe.shape), np.float32)
    stitcher.add(ones, np.zeros_like(ones), positions_m)
    return stitcher.snapshot().weight
