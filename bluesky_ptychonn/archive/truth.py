"""Simulation truths in Tiled: stored once per sample, read back for the region a run scanned.

``simulation_truth/<sample_id>`` holds the whole simulated sample as ``amplitude`` and ``phase``
(float32) with metadata that says, in words, that it is simulation ground truth and not a
measurement. A run's start document points at its truth (``ptychography.simulation_truth.tiled_path``)
and at the scanned region (``ptychography.region_grid``); :func:`read_simulation_truth` returns
that region.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import schema
from ..core.geometry import ObjectGrid
from ..errors import ConfigurationError, RunError, TiledKeyError
from ..sim.physics import TRUTH_NOTE, object_from_maps
from ..sim.sample import SampleRegistry, SimulatedSample, default_registry
from ..tiled_paths import SIMULATION_TRUTH, child_container, tiled_key, truth_path

if TYPE_CHECKING:
    from tiled.client.container import Container

logger = logging.getLogger(__name__)


class SimulationTruthWriter:
    """A RunEngine callback: at a start document that references a simulation truth, store it if missing."""

    def __init__(self, client: Container, *, registry: SampleRegistry | None = None) -> None:
        self.client = client
        self.registry = registry or default_registry()

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        """Handle one document; only ``start`` matters."""
        if name != "start":
            return
        truth = (doc.get(schema.SECTION) or {}).get("simulation_truth")
        if truth:
            store_simulation_truth(self.client, self.registry.get(truth["sample"]["sample_id"]))


def store_simulation_truth(client: Container, sample: SimulatedSample) -> str:
    """Write the whole sample to ``simulation_truth/<sample_id>`` once; return that path.

    A sample already stored with the same definition is left alone; a different definition under
    the same id is a :class:`ConfigurationError` (truth is never silently replaced).
    """
    path = truth_path(sample.sample_id)
    parent = child_container(client, SIMULATION_TRUTH, metadata={"note": TRUTH_NOTE})
    description = sample.as_metadata()
    if sample.sample_id in parent:
        stored = dict(parent[sample.sample_id].metadata).get("sample")
        if _definition(stored) != _definition(description):
            raise ConfigurationError(f"{path} holds a different sample {stored}, not {description}")
        return path
    obj = sample.object
    node = parent.create_container(
        sample.sample_id, metadata={"note": TRUTH_NOTE, "sample": description, "grid": sample.grid.as_metadata()}
    )
    array_md = {"note": TRUTH_NOTE, "grid": sample.grid.as_metadata()}
    node.write_array(np.abs(obj).astype(np.float32), key="amplitude", dims=("y", "x"), metadata=array_md)
    phase_md = {**array_md, "units": "rad"}
    node.write_array(np.angle(obj).astype(np.float32), key="phase", dims=("y", "x"), metadata=phase_md)
    logger.info("stored simulation truth of %s (%s pixels) at %s", sample.sample_id, sample.shape_px, path)
    return path


def _definition(description: Mapping[str, Any] | None) -> dict[str, Any]:
    """What defines a sample's object; the generator's import path may move between versions."""
    return {k: v for k, v in (description or {}).items() if k != "generator"}


def read_simulation_truth(run: Any, client: Container | None = None) -> tuple[np.ndarray, ObjectGrid]:
    """The ground truth of the region a simulated run scanned: complex64 (rows, cols) and its grid.

    Parameters
    ----------
    run : BlueskyRun client
        A run from the ``raw`` catalog (anything with ``.metadata["start"]`` and ``.context``).
    client : tiled Container, optional
        The server's root; by default it is reached from the run's own connection.

    Raises
    ------
    RunError
        The run is not a simulated ptychography run, its truth is not in Tiled, or its start
        document points anywhere but ``simulation_truth/<its sample id>``.
    """
    from tiled.client import from_context

    start = run.metadata["start"]
    section = schema.read_section(start)
    truth = section.get("simulation_truth")
    if not truth:
        raise RunError(f"run {start.get('uid')} is not simulated: it has no simulation truth")
    # The path comes from a document: follow it only where truths are kept, or a run could have
    # any node on the server (another run's result, a model) read back as its "truth".
    try:
        path = truth_path(tiled_key((truth.get("sample") or {}).get("sample_id"), "sample id"))
    except TiledKeyError as err:
        raise RunError(f"run {start.get('uid')}: bad simulation truth sample: {err}") from err
    if truth.get("tiled_path") != path:
        raise RunError(
            f"run {start.get('uid')}: the start document puts the simulation truth at {truth.get('tiled_path')!r}; "
            f"only {path!r} may be read"
        )
    root = client if client is not None else from_context(run.context)
    try:
        node = root[path]
    except KeyError as err:
        raise RunError(f"run {start.get('uid')}: no simulation truth at {path} in Tiled") from err
    whole = ObjectGrid.from_metadata(node.metadata["grid"])
    region = ObjectGrid.from_metadata(section["region_grid"])
    offset = np.rint((np.asarray(region.origin_m) - whole.origin_m) / whole.pixel_size_m).astype(int)
    rows = slice(int(offset[0]), int(offset[0]) + region.shape[0])
    cols = slice(int(offset[1]), int(offset[1]) + region.shape[1])
    obj = object_from_maps(node["amplitude"][rows, cols], node["phase"][rows, cols])
    return obj, region
