"""Simulated ophyd devices for fly-scan ptychography: a two-axis stage and a diffraction detector.

:class:`PtychoDetector` is a flyer. Prepared with a :class:`FlyScan` and kicked off, a writer
thread computes frames in chunks with the core simulator (:mod:`bluesky_ptychonn.sim.physics`) at
the positions the moving stage has at each exposure, and appends counts, encoder positions and
frame ids to ONE HDF5 file opened for SWMR, flushing after each chunk. ``collect_asset_docs``
announces what is on disk with StreamResource/StreamDatum documents (a few per flush, never one
Event per frame).

Trajectory model (:class:`~bluesky_ptychonn.sim.sample.FlyTrajectory`): the true probe position of
frame ``k`` is the trajectory at the middle of its exposure; the recorded encoder position adds
Gaussian noise (``encoder_noise_m``).
With ``blur_samples > 1`` each frame is the incoherent mean of the patterns along the stretch the
stage travels during the exposure (motion blur); the default of 1 samples the exposure middle.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from event_model import StreamRange, compose_stream_resource
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis
from ophyd.status import StatusBase
from ophyd.utils import LimitError

from ..errors import ConfigurationError
from ..schema import FRAME_ID_KEY, FRAMES_KEY, POSITIONS_KEY
from ..sim.physics import diffraction_patterns
from ..sim.sample import DetectorSettings, FlyScan, SampleRegistry, default_registry

#: HDF5 datasets, the layout of :mod:`bluesky_ptychonn.files.scanfile`, so ``read_scan`` opens a detector file.
DATASETS = {
    FRAMES_KEY: "/entry/data/data",
    POSITIONS_KEY: "/entry/data/positions_m",
    FRAME_ID_KEY: "/entry/data/frame_id",
}

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Stage


class SimMotor(SynAxis):
    """A simulated motor in metres with soft limits and a maximum velocity (``ophyd.sim.SynAxis``)."""

    low_limit_travel = Cpt(Signal, value=-50e-6, kind="config")
    high_limit_travel = Cpt(Signal, value=50e-6, kind="config")

    def __init__(self, *, name: str, egu: str = "m", precision: int = 9, **kwargs: Any) -> None:
        super().__init__(name=name, egu=egu, precision=precision, **kwargs)
        self.velocity.put(5e-3)

    @property
    def limits(self) -> tuple[float, float]:
        """(low, high) soft limits in metres."""
        return float(self.low_limit_travel.get()), float(self.high_limit_travel.get())

    def check_value(self, value: float) -> None:
        """Raise ophyd's :class:`~ophyd.utils.LimitError` (a ValueError) outside the soft limits."""
        low, high = self.limits
        if not low <= value <= high:
            raise LimitError(f"{self.name}: {value!r} m is outside the limits [{low!r}, {high!r}] m")

    def set(self, value: float) -> StatusBase:  # type: ignore[override]
        """Move to ``value`` metres (instantly, as ``SynAxis`` does) after checking the limits."""
        self.check_value(value)
        return super().set(value)

    def report_position(self, value_m: float) -> None:
        """Set setpoint and readback without a move: the flyer reports where the stage is while flying."""
        now = time.time()
        old = self.sim_state["readback"]
        self.sim_state.update(setpoint=value_m, setpoint_ts=now, readback=value_m, readback_ts=now)
        self.readback._run_subs(sub_type=self.readback.SUB_VALUE, old_value=old, value=value_m, timestamp=now)
        self._run_subs(sub_type=self.SUB_READBACK, old_value=old, value=value_m, timestamp=now)


class SimStage(Device):
    """Two :class:`SimMotor` axes ``y`` and ``x`` (metres); x is the fast axis of a fly scan."""

    y = Cpt(SimMotor)
    x = Cpt(SimMotor)

    def __init__(
        self,
        *,
        name: str = "stage",
        limits_m: tuple[float, float] = (-50e-6, 50e-6),
        velocity_m_s: float = 5e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if not (limits_m[0] < limits_m[1] and velocity_m_s > 0):
            raise ConfigurationError(
                f"stage needs low < high limits and a positive velocity, got {limits_m} m, {velocity_m_s} m/s"
            )
        for motor in (self.y, self.x):
            motor.low_limit_travel.put(float(limits_m[0]))
            motor.high_limit_travel.put(float(limits_m[1]))
            motor.velocity.put(float(velocity_m_s))

    @property
    def position_m(self) -> tuple[float, float]:
        """Current readback (y, x) in metres."""
        return float(self.y.position), float(self.x.position)


# ----------------------------------------------------------------------------------------------
# Detector


class PtychoDetector(Device):
    """A simulated far-field diffraction detector that flies with a :class:`SimStage`.

    Parameters
    ----------
    name : str
    stage : SimStage
        The stage whose position is recorded per frame (and updated while flying).
    data_dir : path
        Where the HDF5 files go (one per scan); the Tiled server must list it as readable storage.
    sample : str
        Id of the sample on the stage, looked up in ``registry``.
    settings : DetectorSettings, optional
    registry : SampleRegistry, optional
        Defaults to :func:`bluesky_ptychonn.sim.sample.default_registry`.
    """

    exposure_s = Cpt(Signal, value=1e-3, kind="config")
    period_s = Cpt(Signal, value=1e-3, kind="config")
    photons_per_frame = Cpt(Signal, value=1e6, kind="config")

    def __init__(
        self,
        *,
        name: str,
        stage: SimStage,
        data_dir: str | Path,
        sample: str = "sim-features-0",
        settings: DetectorSettings | None = None,
        registry: SampleRegistry | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.sample_stage = stage
        self.data_dir = Path(data_dir).resolve()
        self.registry = registry or default_registry()
        self.sample = self.registry.get(sample)
        self.settings = settings or DetectorSettings()
        self._lock = threading.Lock()
        self._scan: FlyScan | None = None
        self._file: h5py.File | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._complete: StatusBase | None = None
        self._frames_done = 0
        self._frames_emitted = 0
        self._bundles: dict[str, Any] = {}
        self.path: Path | None = None

    # -- bluesky interface ---------------------------------------------------------------------

    def prepare(self, value: FlyScan) -> StatusBase:
        """Check the scan, open its HDF5 file (SWMR) and reset the stream; returns a finished status."""
        if self._thread is not None and self._thread.is_alive():
            raise ConfigurationError(f"{self.name} is still acquiring; stop it before preparing another scan")
        value.check()
        self._close_file()
        self._scan, self._frames_done, self._frames_emitted, self._bundles = value, 0, 0, {}
        self._stop_event.clear()
        self._complete = None
        settings = value.settings
        self.exposure_s.put(settings.exposure_s)
        self.period_s.put(settings.period_s)
        self.photons_per_frame.put(settings.photons_per_frame)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / f"{value.file_stem or uuid.uuid4().hex}.h5"
        self._file = _open_file(self.path, value)
        status = StatusBase()
        status.set_finished()
        return status

    def kickoff(self) -> StatusBase:
        """Start the writer thread; the status finishes once acquisition has begun."""
        if self._scan is None or self._file is None:
            raise ConfigurationError(f"{self.name} must be prepared with a FlyScan before kickoff")
        self._complete = StatusBase()
        self._thread = threading.Thread(
            target=self._acquire, args=(self._scan, self._file, self._complete), name=f"{self.name}-writer", daemon=True
        )
        self._thread.start()
        status = StatusBase()
        status.set_finished()
        return status

    def complete(self) -> StatusBase:
        """A status that finishes when every frame is on disk, or when a stop request ended the flight."""
        if self._complete is None:
            raise ConfigurationError(f"{self.name} was not kicked off")
        return self._complete

    def describe_collect(self) -> dict[str, dict]:
        """Flat data keys of the stream; all are external (``STREAM:``), in the HDF5 file."""
        settings = self._scan.settings if self._scan else self.settings
        n = settings.geometry.frame_pixels
        source = f"sim://{self.name}"
        return {
            FRAMES_KEY: {
                "source": source,
                "dtype": "array",
                "dtype_numpy": "<u4",
                "shape": [n, n],
                "units": "counts",
                "external": "STREAM:",
            },
            POSITIONS_KEY: {
                "source": source,
                "dtype": "array",
                "dtype_numpy": "<f8",
                "shape": [2],
                "units": "m",
                "external": "STREAM:",
            },
            FRAME_ID_KEY: {
                "source": source,
                "dtype": "integer",
                "dtype_numpy": "<i8",
                "shape": [],
                "units": "",
                "external": "STREAM:",
            },
        }

    def collect(self) -> Iterator[dict]:
        """No Events: every datum lives in the HDF5 file and is announced by :meth:`collect_asset_docs`."""
        return iter(())

    def get_index(self) -> int:
        """Frames written and flushed so far."""
        with self._lock:
            return self._frames_done

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict]]:
        """StreamResource (once per key) and StreamDatum documents for the frames flushed since the last call."""
        stop = self.get_index() if index is None else min(int(index), self.get_index())
        if self._scan is None or self.path is None or stop <= self._frames_emitted:
            return
        n = self._scan.settings.geometry.frame_pixels
        chunk = self._scan.settings.chunk_frames
        chunk_shapes = {FRAMES_KEY: [chunk, n, n], POSITIONS_KEY: [chunk, 2], FRAME_ID_KEY: [chunk]}
        for key, dataset in DATASETS.items():
            if key not in self._bundles:
                self._bundles[key] = compose_stream_resource(
                    mimetype="application/x-hdf5",
                    uri=f"file://localhost{self.path}",
                    data_key=key,
                    parameters={"dataset": dataset, "chunk_shape": chunk_shapes[key], "swmr": True},
                )
                yield "stream_resource", self._bundles[key].stream_resource_doc
            yield (
                "stream_datum",
                self._bundles[key].compose_stream_datum(indices=StreamRange(start=self._frames_emitted, stop=stop)),
            )
        self._frames_emitted = stop

    def stop(self, *, success: bool = False) -> None:
        """Stop acquiring after the chunk in progress and close the file; written frames stay readable."""
        self._stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._close_file()

    def unstage(self) -> list:
        """Stop any acquisition and close the file, then unstage as ophyd does."""
        self.stop()
        return super().unstage()

    # -- the writer thread ----------------------------------------------------------------------

    def _acquire(self, scan: FlyScan, f: h5py.File, status: StatusBase) -> None:
        settings, traj = scan.settings, scan.trajectory
        nominal = traj.positions_m()
        started = time.monotonic()
        try:
            for start in range(0, len(nominal), settings.chunk_frames):
                stop = min(len(nominal), start + settings.chunk_frames)
                frames, recorded = _simulate_chunk(scan, nominal[start:stop], start // settings.chunk_frames)
                due = started + stop * settings.period_s  # the last frame of the chunk ends its exposure
                if settings.paced and self._stop_event.wait(max(0.0, due - time.monotonic())):
                    break
                if self._stop_event.is_set():
                    break
                _append(f, start, stop, frames, recorded)
                with self._lock:
                    self._frames_done = stop
                self.sample_stage.y.report_position(float(nominal[stop - 1, 0]))
                self.sample_stage.x.report_position(float(nominal[stop - 1, 1]))
            done = self.get_index()
            self._close_file()
            if done < len(nominal):
                # A requested stop (RunEngine abort or stop) ends the flight normally: the run's stop
                # document records why, and failing this status would replace 'abort' by 'fail'.
                logger.info("%s stopped after %d of %d frames", self.name, done, len(nominal))
            status.set_finished()
        except Exception as err:  # the status carries it to the RunEngine, which fails the run
            self._close_file()
            status.set_exception(err)

    def _close_file(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _open_file(path: Path, scan: FlyScan) -> h5py.File:
    """Create the scan file in :mod:`~bluesky_ptychonn.files.scanfile`'s layout, then switch to SWMR."""
    settings, n, chunk = scan.settings, scan.settings.geometry.frame_pixels, scan.settings.chunk_frames
    f = h5py.File(path, "w", libver="latest")
    entry = f.create_group("entry")
    entry.attrs["metadata"] = json.dumps(
        {"sample": scan.sample.as_metadata(), "scan": scan.trajectory.as_metadata(), "settings": settings.model_dump()}
    )
    data = entry.create_group("data")
    data.create_dataset("data", shape=(0, n, n), maxshape=(None, n, n), chunks=(chunk, n, n), dtype="<u4")
    data.create_dataset("positions_m", shape=(0, 2), maxshape=(None, 2), chunks=(chunk, 2), dtype="<f8")
    data.create_dataset("frame_id", shape=(0,), maxshape=(None,), chunks=(chunk,), dtype="<i8")
    inst = entry.create_group("instrument")
    for key, value in settings.geometry.model_dump().items():
        inst.attrs[key] = value
    probe = entry.create_dataset("probe", data=settings.probe_array())
    probe.attrs["description"] = json.dumps(settings.probe)
    # SWMR: no new objects or attributes after this; readers (Tiled, the callback) may open the file now.
    f.swmr_mode = True
    return f


def _chunk_seed(seed: int, stream: int, chunk: int) -> np.random.Generator:
    """Independent, repeatable noise per chunk, whatever the chunk timing."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, chunk]))


def _simulate_chunk(scan: FlyScan, nominal: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (m, n, n) uint32 at the true positions, and the encoder's noisy record of them (m, 2)."""
    settings, sample = scan.settings, scan.sample
    probe = _probe_cache(settings)
    if settings.blur_samples == 1:
        seed = int(np.random.SeedSequence([settings.seed, 0, chunk]).generate_state(1)[0])
        frames = diffraction_patterns(
            sample.object, sample.grid, probe, nominal, photons_per_frame=settings.photons_per_frame, seed=seed
        )
    else:
        # A moving probe adds patterns incoherently: average noiseless intensities, then count photons.
        intensity = np.mean(
            [
                diffraction_patterns(sample.object, sample.grid, probe, nominal + [0.0, dx], photons_per_frame=None)
                for dx in scan.trajectory.blur_offsets_m(settings.blur_samples)
            ],
            axis=0,
        )
        frames = _chunk_seed(settings.seed, 0, chunk).poisson(intensity * settings.photons_per_frame).astype(np.uint32)
    noise = _chunk_seed(settings.seed, 1, chunk).normal(0.0, settings.encoder_noise_m, nominal.shape)
    return frames, nominal + noise


_PROBES: dict[str, np.ndarray] = {}


def _probe_cache(settings: DetectorSettings) -> np.ndarray:
    key = repr((sorted(settings.probe.items()), settings.geometry.frame_pixels))
    if key not in _PROBES:
        _PROBES[key] = settings.probe_array()
    return _PROBES[key]


def _append(f: h5py.File, start: int, stop: int, frames: np.ndarray, positions: np.ndarray) -> None:
    """Grow the three datasets together and flush, so a reader never sees frames without positions."""
    data = f["entry/data"]
    for name in ("data", "positions_m", "frame_id"):
        data[name].resize(stop, axis=0)
    data["data"][start:stop] = frames
    data["positions_m"][start:stop] = positions
    data["frame_id"][start:stop] = np.arange(start, stop, dtype=np.int64)
    for name in ("data", "positions_m", "frame_id"):
        data[name].flush()
