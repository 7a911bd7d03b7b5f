"""The ptychography fly-scan plan.

:func:`ptycho_fly_scan` checks everything it can before it returns a generator, so a bad step,
exposure, photon count, sample or a trajectory outside the motor limits raises at once, before
any message reaches the RunEngine: nothing moves and no run is opened.

The start document carries a ``ptychography`` section written by
:func:`bluesky_ptychonn.schema.ptychography_metadata`, with everything needed to reconstruct from
the run alone; :mod:`bluesky_ptychonn.schema` reads it back.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import replace
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import Msg

from .. import schema
from ..errors import ConfigurationError
from ..sim.sample import FlyScan, FlyTrajectory
from .devices import DATASETS, PtychoDetector, SimStage


def ptycho_fly_scan(
    detector: PtychoDetector,
    stage: SimStage,
    *,
    step_m: float,
    shape: tuple[int, int] = (20, 20),
    center_m: tuple[float, float] = (0.0, 0.0),
    snake: bool = True,
    exposure_s: float | None = None,
    photons_per_frame: float | None = None,
    sample_id: str | None = None,
    flush_period_s: float = 0.2,
    stream_name: str = schema.STREAM_NAME,
    md: Mapping[str, Any] | None = None,
) -> Generator[Msg, Any, str]:
    """Fly a raster or snake over a region of the sample; one run, frames in one stream.

    Parameters
    ----------
    detector, stage : PtychoDetector, SimStage
    step_m : float
        Distance between neighbouring scan points along and across lines, metres.
    shape : (int, int)
        Scan lines (y) and points per line (x).
    center_m : (float, float)
        Scan centre (y, x) in stage coordinates, metres; another centre scans a new region of the
        same sample.
    snake : bool
        Reverse every other line (otherwise raster with fly-back).
    exposure_s, photons_per_frame : float, optional
        Override the detector's settings for this scan.
    sample_id : str, optional
        Sample on the stage (looked up in the detector's registry); default: the detector's.
    flush_period_s : float
        How often frames written so far are announced (StreamDatum) while flying.
    stream_name : str
    md : mapping, optional
        Extra start-document metadata; it may not replace the ``ptychography`` section.

    Returns
    -------
    generator
        The plan; it returns the run uid.

    Raises
    ------
    ConfigurationError, PositionError
        Raised by this call, before the plan runs, for any inconsistent input.
    """
    if exposure_s is not None and not (math.isfinite(exposure_s) and exposure_s > 0):
        raise ConfigurationError(f"exposure must be positive, got {exposure_s!r} s")
    if photons_per_frame is not None and not (math.isfinite(photons_per_frame) and photons_per_frame > 0):
        raise ConfigurationError(f"photons per frame must be positive, got {photons_per_frame!r}")
    if not (math.isfinite(step_m) and step_m > 0):
        raise ConfigurationError(f"scan step must be positive, got {step_m!r} m")
    if not flush_period_s > 0:
        raise ConfigurationError(f"flush period must be positive, got {flush_period_s!r} s")
    md = dict(md or {})
    if schema.SECTION in md:
        raise ConfigurationError(f"md may not set {schema.SECTION!r}: the plan writes that section")
    sample = detector.registry.get(sample_id) if sample_id is not None else detector.sample
    changes = {k: v for k, v in (("exposure_s", exposure_s), ("photons_per_frame", photons_per_frame)) if v is not None}
    settings = detector.settings.updated(**changes)
    trajectory = FlyTrajectory(
        kind="snake" if snake else "raster",
        shape=(int(shape[0]), int(shape[1])),
        step_m=float(step_m),
        center_m=(float(center_m[0]), float(center_m[1])),
        period_s=settings.period_s,
        exposure_s=settings.exposure_s,
    )
    check_stage(stage, trajectory, settings.blur_samples)
    scan = FlyScan(trajectory=trajectory, settings=settings, sample=sample)
    scan.check()
    start_md = {
        "detectors": [detector.name],
        "motors": [stage.y.name, stage.x.name],
        "num_points": trajectory.num_points,
        "num_intervals": trajectory.num_points - 1,
        "plan_name": "ptycho_fly_scan",
        "plan_type": "generator",
        "plan_args": {
            "step_m": step_m,
            "shape": list(trajectory.shape),
            "center_m": list(trajectory.center_m),
            "snake": snake,
            "exposure_s": settings.exposure_s,
            "photons_per_frame": settings.photons_per_frame,
            "sample_id": sample.sample_id,
        },
        "sample": sample.sample_id,
        **md,
        schema.SECTION: schema.ptychography_metadata(scan, DATASETS, stream_name),
    }
    return _fly(detector, stage, scan, start_md, flush_period_s, stream_name)


def check_stage(stage: SimStage, trajectory: FlyTrajectory, blur_samples: int = 1) -> None:
    """Raise :class:`ConfigurationError` if the trajectory leaves a motor's limits or outruns its velocity."""
    lo, hi = trajectory.envelope_m(blur_samples)
    for axis, motor in enumerate((stage.y, stage.x)):
        low, high = motor.limits
        if lo[axis] < low or hi[axis] > high:
            raise ConfigurationError(
                f"the trajectory takes {motor.name} over {lo[axis]:.6g}..{hi[axis]:.6g} m, outside its limits "
                f"[{low:.6g}, {high:.6g}] m"
            )
    max_velocity = float(stage.x.velocity.get())
    if trajectory.velocity_m_s > max_velocity:
        raise ConfigurationError(
            f"flying {trajectory.step_m:.6g} m per {trajectory.period_s:.6g} s frame needs "
            f"{trajectory.velocity_m_s:.6g} m/s, above {stage.x.name}'s {max_velocity:.6g} m/s: "
            f"use a longer exposure or a smaller step"
        )


def _fly(
    detector: PtychoDetector, stage: SimStage, scan: FlyScan, start_md: dict, flush_period_s: float, stream_name: str
) -> Generator[Msg, Any, str]:
    start = scan.trajectory.positions_m()[0]
    kicked_off = False

    def body(uid: str) -> Generator[Msg, Any, None]:
        nonlocal kicked_off
        yield from bps.stage(detector)
        # The file is named after the run so that a file on disk leads back to its run.
        yield from bps.prepare(detector, replace(scan, file_stem=uid), wait=True)
        yield from bps.mv(stage.y, float(start[0]), stage.x, float(start[1]))
        yield from bps.declare_stream(detector, name=stream_name, collect=True)
        yield from bps.kickoff(detector, wait=True)
        kicked_off = True
        yield from bps.collect_while_completing(
            [detector], [detector], flush_period=flush_period_s, stream_name=stream_name
        )

    def cleanup() -> Generator[Msg, Any, None]:
        # Also on failure or abort: stop the writer, then announce every frame already on disk,
        # so the run that the RunEngine closes points at all recorded (readable) frames.
        yield from bps.stop(detector)
        if kicked_off:
            yield from bps.collect(detector, name=stream_name)
        yield from bps.unstage(detector)

    uid = yield from bps.open_run(md=start_md)
    yield from bpp.finalize_wrapper(body(uid), cleanup)
    yield from bps.close_run()
    return uid
