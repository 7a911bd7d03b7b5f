"""Replay: archived runs reconstructed again by the network, read through Tiled, written like live results.

:func:`replay_run` pulls a run's frames, positions and frame ids through the Tiled client
(:func:`~bluesky_ptychonn.archive.runs.scan_from_run`, never the detector's files) and pushes them in
batches through the same :class:`~bluesky_ptychonn.core.engine.LiveReconstruction` and
:class:`~bluesky_ptychonn.live.sink.TiledSink` as the live callback, on the same object grid, so a replay
with the live model reproduces the live ``processed/<uid>/ptychonn``. Runs are selected with
:mod:`bluesky_ptychonn.archive.runs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .. import schema
from ..core.geometry import ObjectGrid
from ..errors import ConfigurationError, RunError
from ..tiled_paths import PROCESSED, PTYCHONN, stored_probe
from .runs import check_ptychography, root_of, run_grid_for, scan_from_run, select

if TYPE_CHECKING:
    from ..core.engine import LiveOptions
    from ..core.inference import Predictor
    from ..core.iterative import IterativeOptions


def replay_run(
    run: Any,
    predictor: Predictor,
    client: Any = None,
    *,
    options: LiveOptions | None = None,
    replace: bool = True,
    name: str = PTYCHONN,
    progress: bool = False,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Reconstruct an archived run with ``predictor`` and write ``processed/<uid>/<name>`` in Tiled.

    The frames go through the live pipeline in batches of ``options.batch_size``, on the grid of
    the live result when there is one (else the grid the live callback's defaults give), so the
    result equals the live one for the same model. The image is made in memory and written once,
    complete: an existing result is replaced only then, so a replay that fails half way never
    leaves a run with less than it had. Blocks until the final image is written.

    Parameters
    ----------
    run : BlueskyRun client
        A run of the ``raw`` catalog.
    predictor : Predictor
    client : tiled Container, optional
        The server's root to write into (a client that may write); default: the run's connection.
    options : LiveOptions, optional
    replace : bool
        Replace an existing result; otherwise finding one is a :class:`RunError`.
    name : str
        Result name under ``processed/<uid>``.
    progress : bool
        A progress bar over the run's frames.
    timeout_s : float, optional
        Longest wait for the final write (default: as long as the live retry policy keeps trying).

    Returns
    -------
    dict
        The result's metadata (``status``, ``frames_done``, ``model_hash``, ``grid``, ...) and its ``path``.
    """
    from tqdm.auto import tqdm

    from .. import __version__
    from ..core.engine import LiveOptions, LiveReconstruction
    from ..live.sink import TiledSink

    options = options or LiveOptions()
    scan = scan_from_run(run, with_truth=False)
    uid = scan.metadata["uid"]
    recipe = predictor.info.recipe
    if tuple(recipe.frame_shape) != scan.frames.shape[1:]:
        raise RunError(f"run {uid} has frames of shape {scan.frames.shape[1:]}; the model expects {recipe.frame_shape}")
    client = root_of(run) if client is None else client
    existing = _existing(client, uid, name)
    if existing is not None and not replace:
        raise RunError(f"run {uid} already has processed/{uid}/{name}; replay with replace=True to overwrite it")
    pixel_size_m = recipe.pixel_size_m(scan.geometry)
    grid = _grid([existing, _existing(client, uid, PTYCHONN)], run, pixel_size_m, predictor.patch_pixels)
    start = run.metadata["start"]
    metadata = {
        "raw_uid": uid,
        "scan_id": start.get("scan_id"),
        "sample_id": scan.metadata.get("sample_id"),
        "package_version": __version__,
        "started": time.time(),
        "source": "replay",
    }
    sink = TiledSink(client, uid, name, replace=replace)
    # A probe reconstructed from this very run, if any, beats the one the model was trained with.
    probe, probe_source = schema.probe_for(
        schema.read_section(start), predictor.info.provenance, stored_probe(client, uid)
    )
    live = LiveReconstruction(predictor, grid, None, metadata, options, probe=probe, probe_source=probe_source)
    bar = tqdm(total=len(scan.frames), desc=f"replay {uid[:8]}", unit="frame", disable=not progress, leave=False)
    for s in range(0, len(scan.frames), options.batch_size):
        batch = slice(s, s + options.batch_size)
        live.submit(scan.frame_ids[batch], scan.frames[batch], scan.positions_m[batch], wait=True)
    stop = run.metadata.get("stop") or {}
    live.finish("complete", raw_exit_status=stop.get("exit_status"), frames_expected=len(scan.frames))
    # The worker sets "finished" once every frame is processed; wait(0.1) doubles as the poll's sleep.
    while not live.wait(0.1) and "finished" not in live.metadata:
        m = live.metadata
        bar.update(m["frames_done"] + m["frames_dropped"] + m["frames_duplicate"] - bar.n)
    bar.update(len(scan.frames) - bar.n)
    bar.close()
    if not live.wait(timeout_s) or not live.write_final(sink, timeout_s):  # only now may it replace what is there
        raise RunError(f"run {uid}: the replayed image could not be written to {sink.path} (see the log)")
    return {**live.metadata, "timings": dict(live.timings), "path": sink.path}


def _existing(client: Any, uid: str, name: str) -> dict[str, Any] | None:
    """Metadata of ``processed/<uid>/<name>``, or None when there is none."""
    if PROCESSED not in client or uid not in client[PROCESSED] or name not in client[PROCESSED][uid]:
        return None
    return dict(client[PROCESSED][uid][name].metadata)


def _grid(stored: list[dict[str, Any] | None], run: Any, pixel_size_m: float, patch_pixels: int) -> ObjectGrid:
    """The grid of a stored result of this run at the same pixel size (the live callback's, with its margin),
    else the grid the callback's defaults give."""
    for md in stored:
        grid = (md or {}).get("grid")
        if grid and math.isclose(grid["pixel_size_m"], pixel_size_m, rel_tol=1e-9):
            return ObjectGrid.from_metadata(grid)
    return run_grid_for(run, pixel_size_m, patch_pixels)


def replay_runs(
    catalog: Any,
    uids_or_queries: Iterable[Any],
    predictor: Predictor,
    client: Any = None,
    *,
    options: LiveOptions | None = None,
    replace: bool = True,
    name: str = PTYCHONN,
    progress: bool = True,
    refine: bool | IterativeOptions = False,
) -> list[dict[str, Any]]:
    """:func:`replay_run` for every run :func:`select` finds; none is replayed unless all are ptychography runs.

    ``refine`` (True, or the pty-chi options to refine with) then refines each replayed run from its new
    image with :func:`~bluesky_ptychonn.archive.refine.refine_run`; the summary is under ``"refined"``.
    """
    from tqdm.auto import tqdm

    runs = select(catalog, uids_or_queries)
    check_ptychography(runs)
    if refine is not False and name != PTYCHONN:
        raise ConfigurationError(f"refinement seeds from processed/<uid>/{PTYCHONN}, not from a replay named {name!r}")
    client = root_of(catalog) if client is None else client
    results = []
    for run in tqdm(runs, desc="replay", unit="run", disable=not progress or len(runs) < 2):
        result = replay_run(run, predictor, client, options=options, replace=replace, name=name, progress=progress)
        if refine is not False:
            from .refine import refine_run

            refine_options = None if refine is True else refine
            result["refined"] = refine_run(run, client, options=refine_options, progress=progress)
        results.append(result)
    return results


#: Live results in these states are final; any other, or none, leaves a stopped run to ``replay --incomplete``.
FINAL = ("complete", "aborted")


def incomplete_runs(client: Any, runs: Iterable[Any], *, stale_after_s: float | None = None) -> list[tuple[Any, str]]:
    """The ptychography runs among ``runs`` that ended but whose live result is not final, with its state.

    A run counts once its stop document is archived and its ``processed/<uid>/ptychonn`` is
    missing (no consumer took it), ``interrupted`` (its consumer stopped or restarted), ``failed``,
    or ``running`` with no update for ``stale_after_s`` seconds (its consumer died, or Tiled was
    away past the retry limit; default
    :data:`~bluesky_ptychonn.live.lifecycle.STALE_AFTER_S`). A run still acquiring is never taken.
    """
    from ..live.lifecycle import STALE_AFTER_S, is_stale

    stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
    processed = client[PROCESSED] if PROCESSED in client else {}
    now, found = time.time(), []
    for run in runs:
        start = run.metadata["start"]
        if not run.metadata.get("stop") or schema.SECTION not in start:
            continue
        uid = start["uid"]
        results = processed[uid] if uid in processed else {}
        md = dict(results[PTYCHONN].metadata) if PTYCHONN in results else {}
        status = md.get("status", "missing")
        if status in FINAL or (status == "running" and not is_stale(md, now, stale_after_s)):
            continue
        found.append((run, "stale" if status == "running" else status))
    return found
