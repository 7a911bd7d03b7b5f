"""Replay: archived runs reconstructed again by the network, read through Tiled, written like live results.

:func:`replay_run` pulls a run's frames, positions and frame ids through the Tiled client
(:func:`~bluesky_ptychonn.archive.runs.scan_from_run`, never the detector's files) and pushes them in
batches through the same :class:`~bluesky_ptychonn.core.engine.LiveReconstruction` and
:class:`~bluesky_ptychonn.live.sink.TiledSink` as the live callback, on the same object grid, so a replay
with the live model reproduces the live ``processed/<uid>/ptychonn``.

Runs are named by uid or selected by Tiled queries (:func:`select`); the command lines of replay,
iterative reconstruction and training share the same selection arguments
(:func:`add_selection_arguments`): ``KEY=VALUE`` conditions (:func:`where`), ``--since``,
``--until`` and ``--plan-name``. Every problem with a run (unknown uid, a query that selects
nothing, not a ptychography run) is a :class:`~bluesky_ptychonn.errors.RunError` naming the run
or the query.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RunError

if TYPE_CHECKING:
    from ..core.engine import LiveOptions
    from ..core.inference import Predictor

#: Where the command line looks for the Tiled API key unless told otherwise.
API_KEY_ENV = "TILED_API_KEY"


# ----------------------------------------------------------------------------------------------
# Replay through the live pipeline


def replay_run(
    run: Any,
    predictor: Predictor,
    client: Any = None,
    *,
    options: LiveOptions | None = None,
    replace: bool = True,
    name: str = "ptychonn",
    progress: bool = False,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Reconstruct an archived run with ``predictor`` and write ``processed/<uid>/<name>`` in Tiled.

    The frames go through the live pipeline in batches of ``options.batch_size``, on the grid the
    live callback uses, so the result equals the live one for the same model. Blocks until the
    final image is written.

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
    from .runs import run_grid_for, scan_from_run

    options = options or LiveOptions()
    scan = scan_from_run(run, with_truth=False)
    uid = scan.metadata["uid"]
    recipe = predictor.info.recipe
    if tuple(recipe.frame_shape) != scan.frames.shape[1:]:
        raise RunError(f"run {uid} has frames of shape {scan.frames.shape[1:]}; the model expects {recipe.frame_shape}")
    grid = run_grid_for(run, recipe.pixel_size_m(scan.geometry), predictor.patch_pixels)
    client = root_of(run) if client is None else client
    if not replace and "processed" in client and name in client["processed"].get(uid, {}):
        raise RunError(f"run {uid} already has processed/{uid}/{name}; replay with replace=True to overwrite it")
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
    live = LiveReconstruction(predictor, grid, sink, metadata, options)
    bar = tqdm(total=len(scan.frames), desc=f"replay {uid[:8]}", unit="frame", disable=not progress, leave=False)
    for s in range(0, len(scan.frames), options.batch_size):
        batch = slice(s, s + options.batch_size)
        live.submit(scan.frame_ids[batch], scan.frames[batch], scan.positions_m[batch])
    live.finish("complete", raw_exit_status=(run.metadata.get("stop") or {}).get("exit_status"))
    # The worker sets "finished" once every frame is processed; wait(0.1) doubles as the poll's sleep.
    while not live.wait(0.1) and "finished" not in live.metadata:
        m = live.metadata
        bar.update(m["frames_done"] + m["frames_dropped"] + m["frames_duplicate"] - bar.n)
    bar.update(len(scan.frames) - bar.n)
    bar.close()
    if not live.wait(timeout_s):
        raise RunError(f"run {uid}: the replayed image could not be written to {sink.path} (see the log)")
    return {**live.metadata, "timings": dict(live.timings), "path": sink.path}


def replay_runs(
    catalog: Any,
    uids_or_queries: Iterable[Any],
    predictor: Predictor,
    client: Any = None,
    *,
    options: LiveOptions | None = None,
    replace: bool = True,
    name: str = "ptychonn",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """:func:`replay_run` for every run :func:`select` finds; none is replayed unless all are ptychography runs."""
    from tqdm.auto import tqdm

    runs = select(catalog, uids_or_queries)
    check_ptychography(runs)
    client = root_of(catalog) if client is None else client
    return [
        replay_run(run, predictor, client, options=options, replace=replace, name=name, progress=progress)
        for run in tqdm(runs, desc="replay", unit="run", disable=not progress or len(runs) < 2)
    ]


# ----------------------------------------------------------------------------------------------
# Command line (shared by the replay, iterative, train-runs and fine-tune commands)


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """Run selection and the Tiled connection: RUN (uid or KEY=VALUE), --uid, --where, --since, --until, ..."""
    parser.add_argument(
        "runs", nargs="*", metavar="RUN", help="a run uid (or its first 5+ characters), or a KEY=VALUE condition"
    )
    parser.add_argument("--uid", dest="uids", action="append", default=[], help="a run uid (repeatable)")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="start-document condition; a bare KEY is in the ptychography section (sample_id=...), "
        "a dotted one a path from the start document (start.operator=...); all conditions must hold",
    )
    parser.add_argument("--since", help="runs started at or after this ISO 8601 time")
    parser.add_argument("--until", help="runs started before this ISO 8601 time")
    parser.add_argument("--plan-name", help="runs of this plan only (e.g. ptycho_fly_scan)")
    parser.add_argument("--tiled-uri", required=True, help="Tiled server root URI")
    parser.add_argument(
        "--api-key-env", default=API_KEY_ENV, help=f"environment variable with the API key (default {API_KEY_ENV})"
    )


def runs_from_args(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """Connect as the arguments say; return (root client, raw catalog, selection items for :func:`select`)."""
    from .servers import connect

    uids = [r for r in args.runs if "=" not in r] + list(args.uids)
    conditions = [r for r in args.runs if "=" in r] + list(args.where)
    items = selection(uids, conditions, since=args.since, until=args.until, plan_name=args.plan_name)
    client, raw = connect(args.tiled_uri, api_key=os.environ.get(args.api_key_env) or None)
    return client, raw, items


def add_replay_command(sub: argparse._SubParsersAction) -> None:
    """Register ``bluesky-ptychonn replay``."""
    p = sub.add_parser("replay", help="reconstruct archived runs again with a model, reading them through Tiled")
    add_selection_arguments(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="the model (.safetensors)")
    p.add_argument("--name", default="ptychonn", help="result name under processed/<uid> (default ptychonn)")
    p.add_argument("--keep", action="store_true", help="refuse to replace an existing result")
    p.add_argument("--batch-size", type=int, default=64, help="frames per inference batch")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:n]'")
    p.set_defaults(func=_replay_command)


def _replay_command(args: argparse.Namespace) -> list[dict]:
    from ..core.engine import LiveOptions
    from ..core.inference import Predictor

    client, raw, items = runs_from_args(args)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    results = replay_runs(
        raw,
        items,
        predictor,
        client,
        options=LiveOptions(batch_size=args.batch_size),
        replace=not args.keep,
        name=args.name,
    )
    keys = ("raw_uid", "path", "status", "frames_done", "frames_dropped", "frames_duplicate", "model_hash")
    return [{k: r.get(k) for k in keys} | {"errors": r["errors"]} for r in results]
