"""Labels of archived runs: pty-chi reconstructions stored in Tiled, or the simulation truth.

* :func:`iterative_run` reconstructs a run with pty-chi (probe from the run's metadata, optionally
  refined) on the run's object grid and stores ``processed/<uid>/iterative``: ``amplitude``,
  ``phase``, ``illumination``, ``probe_amplitude`` and ``probe_phase`` (float32, dims (y, x)) with
  the engine, epochs, step size, probe, grid, error per epoch, time, device and versions in its
  metadata. :func:`read_iterative` reads it back.
* :func:`label_patches` cuts a run's training labels, (amplitude, phase) patches at each frame's
  position on the network's pixel grid, from either source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..core.metadata import jsonable
from ..errors import FrameError, PositionError, RunError
from ..tiled_paths import ITERATIVE, processed_path, run_results
from .runs import root_of, run_grid_for, scan_from_run
from .truth import read_simulation_truth

if TYPE_CHECKING:
    from ..core.geometry import ObjectGrid
    from ..core.iterative import EpochMonitor, IterativeOptions, IterativeResult


#: Label sources: the run's stored iterative reconstruction, or its simulation ground truth.
LabelSource = Literal["iterative", "truth"]


@dataclass
class RunInputs:
    """What pty-chi needs from an archived run, read once through Tiled (shared by labels and refinement).

    Attributes
    ----------
    uid : str
    section : dict
        The run's ``ptychography`` section.
    frames : (N, n, n) array
        Detector counts, each frame id once (a frame recorded twice counts once).
    positions_m : (N, 2) float64
        Probe centres (y, x) in metres.
    probe : (n, n) complex or None
        The probe the section describes (None when it describes none).
    pixel_size_m : float
        Real-space pixel size of the frames.
    photons_per_frame : float
    photons_source : str
        ``"argument"``, ``"start document"`` or ``"estimate: largest frame sum"``.
    """

    uid: str
    section: dict[str, Any]
    frames: np.ndarray
    positions_m: np.ndarray
    probe: np.ndarray | None
    pixel_size_m: float
    photons_per_frame: float
    photons_source: str

    @property
    def frame_pixels(self) -> int:
        """Side of a frame, which is also the side of the probe window on the object grid."""
        return int(self.frames.shape[-1])

    def reconstruct(
        self,
        grid: ObjectGrid,
        options: IterativeOptions,
        *,
        probe: np.ndarray | None = None,
        photons_per_frame: float | None = None,
        initial_object: np.ndarray | None = None,
        progress: bool = False,
        monitor: EpochMonitor | None = None,
    ) -> IterativeResult:
        """pty-chi on these frames, on ``grid``; ``probe`` and ``photons_per_frame`` override the run's.

        Raises :class:`RunError` for unusable frames or positions, naming the run.
        """
        from ..core.ptychi_engine import reconstruct_iterative

        probe = self.probe if probe is None else probe
        if probe is None:
            raise RunError(
                f"run {self.uid} has no probe description in its ptychography section: pty-chi needs the probe"
            )
        try:
            return reconstruct_iterative(
                self.frames,
                self.positions_m,
                probe,
                pixel_size_m=self.pixel_size_m,
                photons_per_frame=photons_per_frame or self.photons_per_frame,
                options=options,
                grid=grid,
                initial_object=initial_object,
                progress=progress,
                monitor=monitor,
            )
        except (FrameError, PositionError) as err:
            raise RunError(f"run {self.uid}: {err}") from err


def run_inputs(run: Any, photons_per_frame: float | None = None) -> RunInputs:
    """Frames, positions, probe, pixel size and flux of a run, as :func:`iterative_run` uses them.

    The flux is ``photons_per_frame``, else the start document's ``ptychography.photons_per_frame``,
    else the largest frame sum (recorded as an estimate).

    Raises
    ------
    RunError
        Not a ptychography run, or no frames stream.
    """
    scan = scan_from_run(run, with_truth=False)
    section = scan.metadata["ptychography"]
    photons_source = "argument" if photons_per_frame else "start document"
    photons = photons_per_frame or section.get("photons_per_frame")
    if not photons:
        photons, photons_source = float(scan.frames.sum(axis=(1, 2)).max()), "estimate: largest frame sum"
    _, first = np.unique(scan.frame_ids, return_index=True)
    keep = np.sort(first)
    return RunInputs(
        uid=scan.metadata["uid"],
        section=section,
        frames=scan.frames[keep],
        positions_m=scan.positions_m[keep],
        probe=scan.probe,
        pixel_size_m=scan.geometry.pixel_size_m(),
        photons_per_frame=float(photons),
        photons_source=photons_source,
    )


def ptychi_version() -> str:
    """The installed pty-chi's version, for provenance (``"unknown"`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ptychi")
    except PackageNotFoundError:
        return "unknown"


def iterative_run(
    run: Any,
    client: Any = None,
    options: IterativeOptions | None = None,
    *,
    photons_per_frame: float | None = None,
    progress: bool = False,
) -> IterativeResult:
    """Reconstruct an archived run with pty-chi and store it at ``processed/<uid>/iterative`` (replacing one).

    The probe is rebuilt from the run's probe description; the flux is as :func:`run_inputs` says.
    The grid is the run's (:func:`~bluesky_ptychonn.archive.runs.run_grid_for`) at the
    detector's real-space pixel size, so the result lines up with live results and with the truth.

    Raises
    ------
    RunError
        Not a ptychography run, no probe description, unusable frames or positions.
    ConfigurationError
        pty-chi missing, CUDA requested but absent, bad options.
    """
    from .. import __version__
    from ..core.iterative import IterativeOptions

    options = options or IterativeOptions()
    inputs = run_inputs(run, photons_per_frame)
    uid = inputs.uid
    grid = run_grid_for(run, inputs.pixel_size_m, inputs.frame_pixels)
    result = inputs.reconstruct(grid, options, progress=progress)
    metadata = {
        "raw_uid": uid,
        "source": "iterative",
        "engine": result.engine,
        "epochs": result.epochs,
        "max_epochs": options.epochs,
        "stopped_by": result.stopped_by,
        "step_size": result.step_size,
        "batch_size": options.batch_size,
        "probe": {"description": inputs.section["probe"], "refined": options.refine_probe},
        "photons_per_frame": inputs.photons_per_frame,
        "photons_per_frame_source": inputs.photons_source,
        "grid": result.grid.as_metadata(),
        "pixel_size_m": result.grid.pixel_size_m,
        "frames": result.frames,
        "error_per_epoch": result.error_per_epoch,
        "seconds": result.seconds,
        "device": result.device,
        "package_version": __version__,
        "ptychi_version": ptychi_version(),
        "options": options.model_dump(mode="json"),
    }
    write_iterative(root_of(run) if client is None else client, uid, result, metadata)
    return result


def write_iterative(client: Any, uid: str, result: IterativeResult, metadata: dict[str, Any]) -> str:
    """Write ``processed/<uid>/iterative`` (replacing one); ``status`` turns ``complete`` after the last array."""
    parent = run_results(client, uid)
    if ITERATIVE in parent:
        parent[ITERATIVE].delete(recursive=True, external_only=False)
    node = parent.create_container(ITERATIVE, metadata={**metadata, "status": "writing"})
    arrays = {
        "amplitude": result.amplitude,
        "phase": result.phase,
        "illumination": result.illumination,
        "probe_amplitude": np.abs(result.probe),
        "probe_phase": np.angle(result.probe),
    }
    for key, array in arrays.items():
        node.write_array(np.ascontiguousarray(array, np.float32), key=key, dims=("y", "x"))
    node.update_metadata({**metadata, "status": "complete"})
    return processed_path(uid, ITERATIVE)


def read_iterative(client: Any, uid: str) -> tuple[np.ndarray, ObjectGrid, dict[str, Any]]:
    """The stored iterative reconstruction of run ``uid``: complex64 object (H, W), its grid, its metadata.

    Raises :class:`RunError` when there is none or it was not written completely.
    """
    from ..core.geometry import ObjectGrid
    from ..sim.physics import object_from_maps

    path = processed_path(uid, ITERATIVE)
    try:
        node = client[path]
    except KeyError as err:
        raise RunError(f"run {uid} has no iterative reconstruction at {path}") from err
    metadata = jsonable(node.metadata)  # plain dicts, not Tiled's views
    if metadata.get("status") != "complete":
        raise RunError(f"run {uid}: the iterative reconstruction at {path} is incomplete ({metadata.get('status')!r})")
    obj = object_from_maps(node["amplitude"].read(), node["phase"].read())
    return obj, ObjectGrid.from_metadata(metadata["grid"]), metadata


def check_labels_available(runs: Iterable[Any], source: LabelSource, client: Any) -> None:
    """Raise :class:`RunError` naming the first run whose labels cannot be had (from metadata, before any work).

    Truth labels need a simulated run; iterative labels need a probe description or a stored reconstruction.
    """
    for run in runs:
        start = run.metadata["start"]
        uid, section = start["uid"], start.get("ptychography") or {}
        if source == "truth" and not section.get("simulation_truth"):
            raise RunError(f"run {uid} is not simulated: it has no simulation truth; use iterative labels")
        if source == "iterative" and "probe" not in section:
            try:
                read_iterative(client, uid)
            except RunError as err:
                raise RunError(
                    f"run {uid} has no probe description in its ptychography section and no stored iterative "
                    "reconstruction: its labels cannot be computed"
                ) from err


def label_patches(
    run: Any,
    positions_m: np.ndarray,
    *,
    source: LabelSource,
    pixel_size_m: float,
    patch_pixels: int,
    client: Any = None,
    iterative_options: IterativeOptions | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Label patches of one run at the given frame positions, and where they came from.

    Parameters
    ----------
    run : BlueskyRun client
    positions_m : (N, 2) float
        The frames' positions (y, x) in metres.
    source : {"iterative", "truth"}
        ``"iterative"``: the stored ``processed/<uid>/iterative``, computed with
        ``iterative_options`` and stored when missing. ``"truth"``: the simulation ground truth.
    pixel_size_m, patch_pixels : float, int
        The network's pixel grid; the labels' grid must have this pixel size.
    client : tiled Container, optional
        The server's root; default: the run's connection.

    Returns
    -------
    amplitude, phase : (N, n, n) float32
        Bilinear patches centred at each position (the stitcher's own interpolation rule).
    provenance : dict
        ``label_source`` and, for iterative labels, the path, engine, epochs and final error.

    Raises
    ------
    RunError
        No simulation truth, no probe to compute the iterative labels with, a label grid of another
        pixel size, or a frame whose patch leaves the label grid; each names the run.
    """
    from ..core.geometry import extract_patches

    uid = run.metadata["start"]["uid"]
    client = root_of(run) if client is None else client
    if source == "truth":
        obj, grid = read_simulation_truth(run, client)
        provenance: dict[str, Any] = {"label_source": "simulation_truth"}
    elif source == "iterative":
        try:
            obj, grid, md = read_iterative(client, uid)
            computed = False
        except RunError:
            iterative_run(run, client, iterative_options, progress=progress)
            obj, grid, md = read_iterative(client, uid)
            computed = True
        errors = md.get("error_per_epoch") or [None]
        provenance = {
            "label_source": "iterative",
            "label_path": processed_path(uid, ITERATIVE),
            "engine": md.get("engine"),
            "epochs": md.get("epochs"),
            "final_error": errors[-1],
            "probe_refined": md.get("probe", {}).get("refined"),
            "computed_for_training": computed,
        }
    else:
        raise RunError(f"run {uid}: unknown label source {source!r}; expected 'iterative' or 'truth'")
    if not np.isclose(grid.pixel_size_m, pixel_size_m, rtol=1e-6, atol=0):
        raise RunError(
            f"run {uid}: its {provenance['label_source']} labels have {grid.pixel_size_m:.6g} m pixels, the "
            f"network's pixel is {pixel_size_m:.6g} m (cropping, binning or resizing frames is not supported here)"
        )
    try:
        corners = grid.patch_corners(positions_m, patch_pixels)
    except PositionError as err:
        raise RunError(f"run {uid}: a label patch leaves the label grid: {err}") from err
    patches = extract_patches(obj, corners, patch_pixels)
    return np.abs(patches).astype(np.float32), np.angle(patches).astype(np.float32), provenance
