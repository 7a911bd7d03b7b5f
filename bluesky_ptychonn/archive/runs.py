"""Archived runs read through Tiled (never by opening the detector's files), for replay and training."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..core.geometry import ObjectGrid
from ..errors import RunError
from ..files.scanfile import ScanData
from ..sim.physics import make_probe


def _section(run: Any) -> dict:
    start = run.metadata["start"]
    section = start.get("ptychography")
    if not isinstance(section, dict):
        raise RunError(f"run {start.get('uid')} ({start.get('plan_name')}) is not a ptychography run")
    return section


def scan_from_run(run: Any, *, with_truth: bool = True) -> ScanData:
    """Frames, positions and frame ids of an archived run, read through the Tiled client.

    ``truth`` and ``truth_grid`` are filled for simulated runs whose ground truth is in Tiled
    (``with_truth``); ``probe`` is rebuilt from the run's probe description.
    """
    from ..live.callback import run_geometry
    from .truth import read_simulation_truth

    start = run.metadata["start"]
    uid = start.get("uid")
    section = _section(run)
    keys = section.get("data_keys", {"frames": "diffraction", "positions": "positions_m", "frame_id": "frame_id"})
    stream_name = section.get("stream_name", "primary")
    if stream_name not in run:
        raise RunError(f"run {uid} has no {stream_name!r} stream (was it aborted before any frame?)")
    stream = run[stream_name]
    try:
        frames = stream[keys["frames"]].read()
        positions = np.asarray(stream[keys["positions"]].read(), np.float64)
        ids = stream[keys["frame_id"]].read() if keys.get("frame_id") in stream else np.arange(len(frames))
    except KeyError as err:
        raise RunError(f"run {uid} lacks the data key {err} in its {stream_name!r} stream") from err
    n = min(len(frames), len(positions), len(ids))  # an aborted run may stop between flushes of two keys
    geometry = run_geometry(section)
    probe = None
    if "probe" in section:
        description = dict(section["probe"])
        probe = make_probe(description.pop("kind"), geometry.frame_pixels, **description)
    truth, grid = (None, None)
    if with_truth and section.get("simulation_truth"):
        truth, grid = read_simulation_truth(run)
    return ScanData(
        frames[:n],
        positions[:n],
        np.asarray(ids[:n]),
        geometry,
        probe,
        truth,
        grid,
        metadata={"uid": uid, "sample_id": section.get("sample_id"), "ptychography": section},
    )


def run_grid_for(run: Any, pixel_size_m: float, patch_pixels: int) -> ObjectGrid:
    """The object grid the live callback would use for this run (so replay lands on the same pixels)."""
    from ..live.callback import CallbackConfig, run_grid

    return run_grid(_section(run), CallbackConfig(), pixel_size_m, patch_pixels)


def select_runs(catalog: Any, uids_or_queries: Iterable[Any]) -> list[Any]:
    """Runs of a ``CatalogOfBlueskyRuns`` named by uid (full or partial) or selected by Tiled queries.

    Raises :class:`RunError` naming a uid that does not exist or a query that selects nothing.
    """
    runs: dict[str, Any] = {}
    for item in uids_or_queries:
        if isinstance(item, str):
            try:
                run = catalog[item]
            except KeyError as err:
                raise RunError(f"no run {item!r} in the catalog") from err
            runs[run.metadata["start"]["uid"]] = run
        else:
            found = catalog.search(item)
            if len(found) == 0:
                raise RunError(f"the query {item!r} selects no run")
            for uid in found:
                runs[uid] = found[uid]
    return list(runs.values())
