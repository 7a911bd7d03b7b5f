"""Raw runs and simulation truths in Tiled.

Layout (DESIGN.md): ``raw`` is a container with spec ``CatalogOfBlueskyRuns`` 3.0, written by
``bluesky_tiled_plugins.TiledWriter``; ``simulation_truth/<sample_id>`` holds the whole simulated
sample as ``amplitude`` and ``phase`` (float32) with metadata that says, in words, that it is
simulation ground truth and not a measurement. A run's start document points at its truth
(``ptychography.simulation_truth.tiled_path``) and at the scanned region
(``ptychography.region_grid``); :func:`read_simulation_truth` returns that region.

The embedded server (:func:`start_embedded_server`) is Tiled's in-process ``SimpleTiledServer``
with the detector data folder as readable storage; ``bluesky-ptychonn serve``
(:mod:`bluesky_ptychonn.archive.servers`) runs the facility one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..core.geometry import ObjectGrid
from ..errors import ConfigurationError, RunError
from ..files.scanfile import TRUTH_NOTE
from ..sim.physics import object_from_maps
from ..sim.sample import TRUTH_CONTAINER, SampleRegistry, SimulatedSample, default_registry

if TYPE_CHECKING:
    from bluesky import RunEngine
    from tiled.client.container import Container
    from tiled.server import SimpleTiledServer

logger = logging.getLogger(__name__)

#: Name of the container of raw runs.
RAW_CONTAINER = "raw"


class EmbeddedArchive(NamedTuple):
    """An in-process Tiled server and what a scan needs from it; ``close()`` stops the server."""

    server: SimpleTiledServer
    client: Container
    raw: Container
    data_dir: Path

    def close(self) -> None:
        """Stop the server (its directory stays when one was given)."""
        self.server.close()


def start_embedded_server(
    data_dir: str | Path, *, directory: str | Path | None = None, api_key: str | None = None
) -> EmbeddedArchive:
    """Start ``tiled.server.SimpleTiledServer`` in this process and make sure ``raw`` exists.

    Parameters
    ----------
    data_dir : path
        The detector's data folder; served as readable storage, so runs' HDF5 files can be read.
    directory : path, optional
        Catalog, storage and logs; a temporary folder (removed at close) when omitted.
    api_key : str, optional
        Key of the server; a random one when omitted (the URI carries it). Tiled keeps one
        settings object per process, so servers started in one process must share one key: the
        last one started sets the key of all of them.
    """
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = SimpleTiledServer(directory=directory, api_key=api_key, readable_storage=[data_dir])
    try:
        client = from_uri(server.uri)
        raw = ensure_raw_catalog(client)
    except BaseException:
        server.close()
        raise
    return EmbeddedArchive(server=server, client=client, raw=raw, data_dir=data_dir)


def connect(uri: str, api_key: str | None = None) -> tuple[Container, Container]:
    """Connect to a Tiled server; return the root client and the ``raw`` catalog (created if missing)."""
    from tiled.client import from_uri

    client = from_uri(uri, api_key=api_key)
    return client, ensure_raw_catalog(client)


def ensure_raw_catalog(client: Container) -> Container:
    """The ``raw`` container with spec ``CatalogOfBlueskyRuns`` 3.0, created if missing."""
    from tiled.structures.core import Spec

    if RAW_CONTAINER not in client:
        client.create_container(RAW_CONTAINER, specs=[Spec("CatalogOfBlueskyRuns", version="3.0")])
    raw = client[RAW_CONTAINER]
    specs = [(s.name, s.version) for s in raw.specs]
    if ("CatalogOfBlueskyRuns", "3.0") not in specs:
        raise ConfigurationError(f"'{RAW_CONTAINER}' exists with specs {specs}, not CatalogOfBlueskyRuns 3.0")
    return raw


def subscribe_archive(
    run_engine: RunEngine, client: Container, *, registry: SampleRegistry | None = None, batch_size: int = 1
) -> list[int]:
    """Archive every run the RunEngine makes: ``TiledWriter`` into ``raw``, plus simulation truths.

    ``batch_size=1`` registers frames with Tiled at every flush, so a run can be watched while it
    goes. Both callbacks raise on a Tiled failure, which aborts the run: a run that cannot be
    archived is not silently lost. Returns the subscription tokens.
    """
    from bluesky_tiled_plugins import TiledWriter

    raw = ensure_raw_catalog(client)
    truth = SimulationTruthWriter(client, registry=registry)
    return [run_engine.subscribe(truth, "start"), run_engine.subscribe(TiledWriter(raw, batch_size=batch_size))]


class SimulationTruthWriter:
    """A RunEngine callback: at a start document that references a simulation truth, store it if missing."""

    def __init__(self, client: Container, *, registry: SampleRegistry | None = None) -> None:
        self.client = client
        self.registry = registry or default_registry()

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        """Handle one document; only ``start`` matters."""
        if name != "start":
            return
        truth = (doc.get("ptychography") or {}).get("simulation_truth")
        if truth:
            store_simulation_truth(self.client, self.registry.get(truth["sample"]["sample_id"]))


def store_simulation_truth(client: Container, sample: SimulatedSample) -> str:
    """Write the whole sample to ``simulation_truth/<sample_id>`` once; return that path.

    A sample already stored with the same definition is left alone; a different definition under
    the same id is a :class:`ConfigurationError` (truth is never silently replaced).
    """
    path = f"{TRUTH_CONTAINER}/{sample.sample_id}"
    if TRUTH_CONTAINER not in client:
        client.create_container(TRUTH_CONTAINER, metadata={"note": TRUTH_NOTE})
    parent = client[TRUTH_CONTAINER]
    description = sample.as_metadata()
    if sample.sample_id in parent:
        stored = dict(parent[sample.sample_id].metadata).get("sample")
        if stored != description:
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
        The run is not a simulated ptychography run, or its truth is not in Tiled.
    """
    from tiled.client import from_context

    from ..acquisition.plans import ptychography_section

    start = run.metadata["start"]
    section = ptychography_section(start)
    truth = section.get("simulation_truth")
    if not truth:
        raise RunError(f"run {start.get('uid')} is not simulated: it has no simulation truth")
    root = client if client is not None else from_context(run.context)
    try:
        node = root[truth["tiled_path"]]
    except KeyError as err:
        raise RunError(f"run {start.get('uid')}: no simulation truth at {truth['tiled_path']} in Tiled") from err
    whole = ObjectGrid.from_metadata(node.metadata["grid"])
    region = ObjectGrid.from_metadata(section["region_grid"])
    offset = np.rint((np.asarray(region.origin_m) - whole.origin_m) / whole.pixel_size_m).astype(int)
    rows = slice(int(offset[0]), int(offset[0]) + region.shape[0])
    cols = slice(int(offset[1]), int(offset[1]) + region.shape[1])
    obj = object_from_maps(node["amplitude"][rows, cols], node["phase"][rows, cols])
    return obj, region


def tiled_run_uri(client: Container, uid: str) -> str:
    """The HTTP address of a raw run (without any API key)."""
    return f"{client.context.api_uri}metadata/{RAW_CONTAINER}/{uid}"
