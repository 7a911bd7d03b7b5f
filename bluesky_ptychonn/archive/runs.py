"""Archived runs through Tiled and databroker: selecting them, and reading their frames and positions.

Runs are named by uid (full or at least 5 leading characters) or selected by Tiled queries on their
start documents (:func:`where`, :func:`queries_for`, :func:`select`, :func:`select_matching`); frames,
positions and frame ids are read through the Tiled client (:func:`scan_from_run`), never by opening
the detector's files.
Every problem with a run (unknown uid, a query that selects nothing, not a ptychography run) is a
:class:`~bluesky_ptychonn.errors.RunError` naming the run or the query.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from .. import schema
from ..core.geometry import ObjectGrid
from ..errors import ConfigurationError, RunError
from ..files.scanfile import ScanData


def where(condition: str) -> Any:
    """A ``KEY=VALUE`` condition on the start document as a Tiled query.

    A bare key is looked up in the run's ``ptychography`` section (``sample_id=sim-0`` means
    ``start.ptychography.sample_id == "sim-0"``); a dotted key is a path in the start document
    (``start.operator=alice``, ``plan_args.exposure_s=0.001``). VALUE is read as JSON when it is a
    number, ``true``, ``false`` or a quoted string, else taken as text.
    """
    from tiled.queries import Key

    key, sep, text = condition.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigurationError(f"a condition is KEY=VALUE, got {condition!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if not isinstance(value, str | int | float | bool):  # a list or object is not a value to compare with
        value = text
    return Key(key if "." in key else f"{schema.SECTION}.{key}") == value


def queries_for(
    conditions: Sequence[str] = (),
    *,
    since: str | None = None,
    until: str | None = None,
    plan_name: str | None = None,
) -> list[Any]:
    """Tiled queries for ``KEY=VALUE`` conditions, a time range and a plan name (all to hold together).

    ``since`` and ``until`` are ISO 8601 times (local time when no zone is given); ``until`` is exclusive.
    """
    queries = [where(c) for c in conditions]
    if plan_name:
        from tiled.queries import Key

        queries.append(Key("plan_name") == plan_name)
    if since or until:
        from databroker.queries import TimeRange

        try:
            stamps = [datetime.fromisoformat(t).timestamp() if t else None for t in (since, until)]
            queries.append(TimeRange(since=stamps[0], until=stamps[1]))
        except ValueError as err:
            raise ConfigurationError(f"--since/--until must be ISO 8601 times in order: {err}") from err
    return queries


def select_matching(catalog: Any, uids: Sequence[str], queries: Sequence[Any]) -> list[Any]:
    """The runs named by ``uids`` (any of them), each meeting every query; with no uid, every run that does.

    A named run that misses a condition is a :class:`RunError` naming it, never silently left out,
    and a selection by conditions alone must match a run: a typo does not act on nothing quietly.
    """
    if not uids and not queries:
        raise ConfigurationError("name runs by uid or select them with KEY=VALUE, --since, --until or --plan-name")
    if not uids:
        return select(catalog, [tuple(queries)])
    runs = select(catalog, list(uids))
    if queries:
        found = catalog
        for query in queries:
            found = found.search(query)
        missing = [run.metadata["start"]["uid"] for run in runs if run.metadata["start"]["uid"] not in found]
        if missing:
            raise RunError(f"runs {', '.join(u[:8] for u in missing)} do not meet the conditions {list(queries)!r}")
    return runs


def select(catalog: Any, uids_or_queries: Iterable[Any]) -> list[Any]:
    """Runs of a databroker ``CatalogOfBlueskyRuns`` named by uid or selected by queries, without repeats.

    Parameters
    ----------
    catalog : databroker.client.CatalogOfBlueskyRuns
        The ``raw`` catalog (``tiled.client.from_uri(...)["raw"]``).
    uids_or_queries : iterable
        Each item a uid (full or at least 5 leading characters), a Tiled query, or a tuple of
        queries that must all hold (e.g. from :func:`queries_for`); the union of the items.

    Raises
    ------
    RunError
        A uid that names no run (or several), a query that selects nothing.
    ConfigurationError
        ``catalog`` is not a catalog of Bluesky runs.
    """
    from databroker.client import CatalogOfBlueskyRuns

    if not isinstance(catalog, CatalogOfBlueskyRuns):
        raise ConfigurationError(f"expected a databroker CatalogOfBlueskyRuns (the 'raw' container), got {catalog!r}")
    runs: dict[str, Any] = {}
    for item in uids_or_queries:
        if isinstance(item, str):
            try:
                chosen = [catalog[item]]
            except KeyError as err:
                raise RunError(f"no run {item!r} in the catalog") from err
            except ValueError as err:  # a partial uid too short or matching several runs
                raise RunError(f"{item!r} does not name one run: {err}") from err
        else:
            queries = list(item) if isinstance(item, tuple | list) else [item]
            found = catalog
            for query in queries:  # chained searches: every condition must hold
                found = found.search(query)
            if len(found) == 0:
                raise RunError(f"the selection {queries!r} matches no run in the catalog")
            chosen = list(found.values())
        runs.update((run.metadata["start"]["uid"], run) for run in chosen)
    return list(runs.values())


def check_ptychography(runs: Iterable[Any]) -> None:
    """Raise :class:`RunError` naming the first run that is not a ptychography run (cheap: metadata only)."""
    for run in runs:
        schema.read_section(run.metadata["start"])


def root_of(run_or_catalog: Any) -> Any:
    """The server's root container reached from a run's (or catalog's) own connection."""
    from tiled.client import from_context

    return from_context(run_or_catalog.context)


def scan_from_run(run: Any, *, with_truth: bool = True) -> ScanData:
    """Frames, positions and frame ids of an archived run, read through the Tiled client.

    ``truth`` and ``truth_grid`` are filled for simulated runs whose ground truth is in Tiled
    (``with_truth``); ``probe`` is rebuilt from the run's probe description.
    """
    from .truth import read_simulation_truth

    start = run.metadata["start"]
    uid = start.get("uid")
    section = schema.read_section(start)
    keys = schema.data_keys(section)
    stream_name = schema.stream_name(section)
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
    geometry = schema.geometry(section)
    probe = schema.probe(section)
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
    return schema.object_grid(schema.read_section(run.metadata["start"]), pixel_size_m, patch_pixels)
