"""Refinement: pty-chi started from a run's live PtychoNN image, written to ``processed/<uid>/refined``.

The network's preview is fast but approximate; pty-chi is exact but slow from a flat start. Seeding
pty-chi with the preview (:func:`~bluesky_ptychonn.core.refine.seed_object`) on the preview's own
grid gives a physics-consistent image that lines up pixel for pixel with the live one, in fewer
epochs. The result is written through the live :class:`~bluesky_ptychonn.live.sink.TiledSink`
(``amplitude``, ``phase``, ``weight`` = the probe's illumination, 2-D float32, dims (y, x)), so
every reader of ``ptychonn`` reads ``refined`` too.

Failure policy: a refinement that cannot start (no run, no preview, no probe) raises a
:class:`~bluesky_ptychonn.errors.RunError` and writes nothing; once it starts, a ``running`` marker
is in Tiled and any failure turns it ``failed`` with the error, never left ``running``. While it
runs, the marker's ``updated`` and ``epochs_done`` are written every :data:`HEARTBEAT_S`,
however long an epoch takes; one left behind by a process that was killed goes stale, and the next
consumer marks it ``failed`` (:func:`~bluesky_ptychonn.live.lifecycle.mark_stale_results`).
:class:`~bluesky_ptychonn.archive.refine_worker.RefineWorker` refines runs off the RunEngine's path
and records every failure instead of raising it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..core.metadata import jsonable
from ..errors import ConfigurationError, RunError
from ..tiled_paths import ITERATIVE, PTYCHONN, REFINED, processed_path, read_stored_probe
from .labels import RunInputs, ptychi_version, run_inputs
from .runs import check_ptychography, root_of, run_grid_for, select

if TYPE_CHECKING:
    from ..core.geometry import ObjectGrid
    from ..core.inference import Predictor
    from ..core.iterative import IterativeOptions
    from ..core.stitching import StitchedImage

logger = logging.getLogger(__name__)

#: Seconds between two progress writes of a running refinement, epochs or not: a live one stays well
#: inside the stale limit, ten minutes, and a reader sees it advance.
HEARTBEAT_S = 30.0

#: Where the starting object comes from: the run's PtychoNN result, or free space (pty-chi's own start).
SeedSource = Literal["ptychonn", "flat"]


def read_preview(client: Any, uid: str) -> tuple[StitchedImage, dict[str, Any]]:
    """Run ``uid``'s PtychoNN result as a :class:`StitchedImage` on its own grid, and its metadata.

    A result still being written is padded with empty rows to its grid. Raises :class:`RunError`
    when there is none, when it is ``failed``, or when it has no arrays.
    """
    from ..core.geometry import ObjectGrid
    from ..core.stitching import StitchedImage

    path = processed_path(uid, PTYCHONN)
    try:
        node = client[path]
    except KeyError as err:
        raise RunError(f"run {uid} has no live PtychoNN result at {path}") from err
    metadata = jsonable(node.metadata)
    missing = [key for key in ("amplitude", "phase", "weight") if key not in node]
    if metadata.get("status") == "failed" or missing or "grid" not in metadata:
        raise RunError(
            f"run {uid}: the PtychoNN result at {path} cannot seed a refinement (status "
            f"{metadata.get('status')!r}, missing {missing or 'nothing'}, errors {metadata.get('errors', [])})"
        )
    grid = ObjectGrid.from_metadata(metadata["grid"])
    arrays = {}
    for key in ("amplitude", "phase", "weight"):
        array = np.asarray(node[key].read(), np.float32)
        pad = grid.shape[0] - array.shape[0]  # results of earlier versions held rows up to the last covered one
        arrays[key] = np.pad(array, ((0, pad), (0, 0))) if pad > 0 else array
    frames = int(metadata.get("frames_done") or 0)
    image = StitchedImage(arrays["amplitude"], arrays["phase"], arrays["weight"], grid=grid, frames=frames)
    return image, metadata


def _exists(client: Any, path: str) -> bool:
    """Whether the server has a node at ``path``."""
    try:
        client[path]
    except KeyError:
        return False
    return True


@dataclass
class Refinement:
    """A refinement checked and ready to run: everything but pty-chi's epochs."""

    inputs: RunInputs
    probe: np.ndarray
    photons_per_frame: float
    grid: ObjectGrid
    initial_object: np.ndarray | None
    options: IterativeOptions
    metadata: dict[str, Any]


def plan_refinement(
    run: Any,
    client: Any,
    *,
    options: IterativeOptions | None,
    seed: SeedSource,
    predictor: Predictor | None,
    refine_probe: bool | None,
    photons_per_frame: float | None,
) -> Refinement:
    """Read and check everything a refinement needs; raise :class:`RunError` before anything is written."""
    from .. import __version__
    from ..core.refine import REFINE_OPTIONS, SEED_COVERAGE_FRACTION, seed_object

    options = options or REFINE_OPTIONS
    if refine_probe is not None:
        options = options.model_copy(update={"refine_probe": refine_probe})
    if seed not in ("ptychonn", "flat"):
        raise ConfigurationError(f"seed must be 'ptychonn' or 'flat', got {seed!r}")
    started = time.time()
    inputs = run_inputs(run, photons_per_frame)
    uid = inputs.uid

    photons, photons_source = inputs.photons_per_frame, inputs.photons_source
    if inputs.probe is not None:
        probe, probe_source = inputs.probe, "ptychography section"
    else:
        try:
            probe, stored = read_stored_probe(client, uid)
        except RunError as err:
            raise RunError(
                f"run {uid} has no probe: its ptychography section describes none and there is no stored "
                f"iterative reconstruction with a probe at {processed_path(uid, ITERATIVE)}"
            ) from err
        probe_source = processed_path(uid, ITERATIVE)
        if photons_source.startswith("estimate") and stored.get("photons_per_frame"):
            # The stored probe carries that result's flux convention; keep the pair together.
            photons, photons_source = float(stored["photons_per_frame"]), probe_source

    seed_info: dict[str, Any]
    initial: np.ndarray | None = None
    if seed == "flat":
        grid = run_grid_for(run, inputs.pixel_size_m, inputs.frame_pixels)
        seed_info = {"source": "flat"}
    else:
        path = processed_path(uid, PTYCHONN)
        replayed = not _exists(client, path)
        if replayed:
            if predictor is None:
                raise RunError(
                    f"run {uid} has no live PtychoNN result at {path} to seed the refinement: pass a model to "
                    "replay the run first (--checkpoint, or predictor=) or start from a flat object (--seed flat, "
                    "or seed='flat')"
                )
            from .replay import replay_run

            replay_run(run, predictor, client)
        preview, preview_md = read_preview(client, uid)
        grid = preview.grid
        if not np.isclose(grid.pixel_size_m, inputs.pixel_size_m, rtol=1e-6, atol=0):
            raise RunError(
                f"run {uid}: the PtychoNN result has {grid.pixel_size_m:.6g} m pixels, the frames "
                f"{inputs.pixel_size_m:.6g} m; a model on cropped or binned frames cannot seed pty-chi"
            )
        try:
            initial = seed_object(preview)
        except ConfigurationError as err:
            raise RunError(f"run {uid}: the PtychoNN result cannot seed a refinement: {err}") from err
        seed_info = {
            "source": "ptychonn",
            "path": path,
            "model_hash": preview_md.get("model_hash"),
            "status": preview_md.get("status"),
            "replayed": replayed,
            "coverage_fraction": SEED_COVERAGE_FRACTION,
        }

    metadata: dict[str, Any] = {
        "raw_uid": uid,
        "source": "refine",
        "status": "running",
        "engine": options.engine,
        "max_epochs": options.epochs,
        "stop_rule": {
            "tolerance": options.stop_tolerance,
            "window": options.stop_window,
            "min_epochs": options.min_epochs,
        },
        "seed": seed_info,
        "probe": {"source": probe_source, "refined": options.refine_probe, "description": inputs.section.get("probe")},
        "photons_per_frame": photons,
        "photons_per_frame_source": photons_source,
        "grid": grid.as_metadata(),
        "pixel_size_m": grid.pixel_size_m,
        "frames": len(inputs.frames),
        "options": options.model_dump(mode="json"),
        "package_version": __version__,
        "ptychi_version": ptychi_version(),
        "errors": [],
        "started": started,
        "updated": started,
    }
    return Refinement(inputs, probe, photons, grid, initial, options, metadata)


def execute_refinement(plan: Refinement, client: Any, progress: bool) -> dict[str, Any]:
    """Mark the result ``running``, run pty-chi, write the image; a failure leaves it ``failed`` and is raised."""
    from ..core.consistency import STATISTIC, object_consistency
    from ..live.sink import TiledSink

    uid, metadata = plan.inputs.uid, dict(plan.metadata)
    sink = TiledSink(client, uid, REFINED, replace=True)
    sink.write_metadata(metadata)  # the marker: readers see a refinement under way, not an old result
    beat = _Heartbeat(sink, uid)
    try:
        result = plan.inputs.reconstruct(
            plan.grid,
            plan.options,
            probe=plan.probe,
            photons_per_frame=plan.photons_per_frame,
            initial_object=plan.initial_object,
            progress=progress,
            monitor=beat.epoch_done,
        )
        # The refined image gets the preview's trust map, so the two compare on the same statistic.
        trust, scores = object_consistency(
            result.obj, result.grid, plan.inputs.frames, plan.inputs.positions_m, result.probe
        )
        beat.stop()  # before the final write, which no late beat may follow
        now = time.time()
        metadata.update(
            trust={"available": True, "statistic": STATISTIC, "probe_source": plan.metadata["probe"]["source"]}
            | scores.summary(),
            status="complete",
            epochs=result.epochs,
            epochs_done=result.epochs,
            stopped_by=result.stopped_by,
            step_size=result.step_size,
            error_per_epoch=result.error_per_epoch,
            seconds=result.seconds,
            device=result.device,
            finished=now,
            updated=now,
        )
        sink.publish(replace(result.as_image(), trust=trust), metadata)
    except Exception as err:
        beat.stop()
        now = time.time()
        metadata.update(status="failed", errors=[f"{err!r}"], finished=now, updated=now)
        try:
            sink.write_metadata(metadata)
        except Exception as tiled_err:  # Tiled down as well: the log has it
            logger.error("run %s: could not record the failed refinement in Tiled: %r", uid, tiled_err)
        raise
    finally:  # also on Ctrl-C in a process that lives on: the marker then goes stale instead of beating on
        beat.stop()
    return {**metadata, "path": sink.path}


class _Heartbeat:
    """Writes a running refinement's ``updated`` and ``epochs_done`` every :data:`HEARTBEAT_S`, from a thread.

    Not from pty-chi's per-epoch monitor alone: one epoch of a very large scan on a CPU can outlast
    the stale limit, and pty-chi's set-up and the trust map after it have no epochs at all. Alive
    as long as this process is, so a refinement looks stale only once its process is gone.
    """

    def __init__(self, sink: Any, uid: str) -> None:
        self.sink, self.uid, self.epochs = sink, uid, 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="refine-heartbeat", daemon=True)
        self._thread.start()

    def epoch_done(self, epoch: int, _error: float, _object: Any) -> bool:
        """pty-chi's monitor: count the epoch (the next beat reports it); never stops the run."""
        self.epochs = epoch
        return False

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self.sink.write_metadata({"updated": time.time(), "epochs_done": self.epochs})
            except Exception as err:  # a Tiled hiccup costs a beat, not the refinement
                logger.warning("run %s: could not record the refinement's progress: %r", self.uid, err)


def refine_run(
    run: Any,
    client: Any = None,
    *,
    options: IterativeOptions | None = None,
    seed: SeedSource = "ptychonn",
    predictor: Predictor | None = None,
    refine_probe: bool | None = None,
    photons_per_frame: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Refine an archived run with pty-chi from its PtychoNN image; write ``processed/<uid>/refined``.

    Parameters
    ----------
    run : BlueskyRun client
        A ptychography run of the ``raw`` catalog.
    client : tiled Container, optional
        The server's root (a client that may write); default: the run's connection.
    options : IterativeOptions, optional
        Default :data:`~bluesky_ptychonn.core.refine.REFINE_OPTIONS` (LSQML, at most 200 epochs,
        stopped when the error stalls).
    seed : {"ptychonn", "flat"}
        ``"ptychonn"`` starts from ``processed/<uid>/ptychonn`` on that result's grid, so the two
        align pixel for pixel; ``"flat"`` starts from free space on the run's grid (the baseline).
    predictor : Predictor, optional
        Used only when the run has no PtychoNN result: the run is replayed with it first (recorded
        as ``seed.replayed``). An existing result is never replaced.
    refine_probe : bool, optional
        Also refine the probe; None keeps ``options.refine_probe``.
    photons_per_frame : float, optional
        Flux; default as :func:`~bluesky_ptychonn.archive.labels.run_inputs` finds it.
    progress : bool
        A progress bar over the epochs.

    Returns
    -------
    dict
        The written result's metadata (``status``, ``epochs``, ``stopped_by``, ``error_per_epoch``,
        ``seed``, ``probe``, ``grid``, ...) and its ``path``.

    Raises
    ------
    RunError
        Not a ptychography run; no PtychoNN result and no predictor, or a ``failed`` one; no probe
        (none described, none stored with ``processed/<uid>/iterative``); unusable frames. Before the
        marker nothing is written; after it the result is left ``failed`` and the error raised.
    ConfigurationError
        pty-chi missing, CUDA requested but absent, bad options.
    """
    client = root_of(run) if client is None else client
    plan = plan_refinement(
        run,
        client,
        options=options,
        seed=seed,
        predictor=predictor,
        refine_probe=refine_probe,
        photons_per_frame=photons_per_frame,
    )
    return execute_refinement(plan, client, progress)


def refine_runs(
    catalog: Any, uids_or_queries: Iterable[Any], client: Any = None, **kwargs: Any
) -> list[dict[str, Any]]:
    """:func:`refine_run` (with ``kwargs``) for every run :func:`select` finds; none unless all are ptychography."""
    runs = select(catalog, uids_or_queries)
    check_ptychography(runs)
    client = root_of(catalog) if client is None else client
    return [refine_run(run, client, **kwargs) for run in runs]


def record_refine_failure(client: Any, uid: str, message: str) -> None:
    """Leave a ``failed`` ``processed/<uid>/refined`` saying why, for a refinement that could not start."""
    from .. import __version__
    from ..live.sink import TiledSink

    now = time.time()
    TiledSink(client, uid, REFINED, replace=True).write_metadata(
        {
            "raw_uid": uid,
            "source": "refine",
            "status": "failed",
            "errors": [message],
            "package_version": __version__,
            "finished": now,
            "updated": now,
        }
    )
