"""Shared fixtures: one real in-process Tiled server per session, and small simulated devices.

Starting Tiled's ``SimpleTiledServer`` costs 10-15 s on a 2-core machine (it initialises its
catalog in a subprocess), so the server is shared by every test of the session; tests keep
apart by run uid and by their own data folders under the server's readable ``data_dir``.
``postgres_tiled`` is the same on a PostgreSQL catalog, served as a facility serves it.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest

from bluesky_ptychonn.core.config import DetectorGeometry

if TYPE_CHECKING:
    from postgres import PostgresServer


class TiledServer(NamedTuple):
    """What the ``tiled_server`` fixture yields; unpack it or use the names."""

    server: object
    client: object
    raw: object
    data_dir: Path


@pytest.fixture(scope="session")
def tiled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledServer]:
    """A real Tiled server in this process with a ``raw`` CatalogOfBlueskyRuns 3.0 container.

    ``data_dir`` is its readable storage: detectors must write their files below it.
    """
    from bluesky_ptychonn.archive.servers import start_embedded_server

    root = tmp_path_factory.mktemp("tiled")
    archive = start_embedded_server(root / "detector", directory=root / "server")
    yield TiledServer(archive.server, archive.client, archive.raw, archive.data_dir)
    archive.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback, in a temporary folder (see ``postgres.py``).

    Skips the tests that use it, saying why, where PostgreSQL is not installed or will not start.
    """
    from postgres import PostgresUnavailable, start_postgres, stop_postgres

    try:
        server = start_postgres()
    except PostgresUnavailable as err:
        pytest.skip(f"no PostgreSQL server for these tests: {err}")
    yield server
    stop_postgres(server.directory)


class StartingServe(NamedTuple):
    """A ``bluesky-ptychonn serve`` child that may still be starting, with its key and log."""

    process: subprocess.Popen
    api_key: str
    root: Path


@pytest.fixture(scope="session")
def postgres_serve(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartingServe]:
    """``bluesky-ptychonn serve --catalog postgresql+asyncpg://...`` as a facility runs it, not yet waited for.

    Its start (about 15 s here) can overlap other work; ``postgres_tiled`` waits for it. The API
    key and the database password travel in its environment. Stopped with SIGTERM at the end,
    as a service manager stops it.
    """
    from tiled_servers import free_port, start_serve, stop_serve

    root = tmp_path_factory.mktemp("tiled-postgres")
    key = secrets.token_hex(16)
    process = start_serve(
        root / "server",
        *("--catalog", postgres.uri, "-r", str(root / "detector"), "--port", str(free_port())),
        env={"TILED_API_KEY": key, "PGPASSWORD": postgres.password},
        log=root / "serve.log",
    )
    try:
        yield StartingServe(process, key, root)
    finally:
        stop_serve(process)


@pytest.fixture(scope="session")
def postgres_tiled(postgres_serve: StartingServe) -> Iterator[TiledServer]:
    """The Tiled server on PostgreSQL, once it serves; like ``tiled_server``, with the serve process as ``server``."""
    from tiled.client import from_uri
    from tiled_servers import serve_uri

    uri = serve_uri(postgres_serve.process, postgres_serve.root / "serve.log")
    client = from_uri(uri, api_key=postgres_serve.api_key)
    yield TiledServer(postgres_serve.process, client, client["raw"], postgres_serve.root / "detector")
    client.context.close()


#: 32-pixel frames: small and fast where the frame size does not matter.
SMALL_GEOMETRY = DetectorGeometry(frame_pixels=32)


@pytest.fixture(scope="session")
def small_sample():
    """A 256 x 256 sample for 32-pixel frames, registered in the default registry as ``test-small``."""
    from bluesky_ptychonn.sim.sample import SimulatedSample, default_registry

    sample = SimulatedSample.for_geometry("test-small", SMALL_GEOMETRY, seed=3, shape_px=(256, 256))
    return default_registry().register(sample)


@pytest.fixture
def make_devices(small_sample) -> Callable:
    """A factory ``make_devices(data_dir, **settings) -> (stage, detector)`` for the small sample."""
    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.sim.sample import DetectorSettings

    made = []

    def make(data_dir: Path, name: str = "ptycho", **settings):
        stage = SimStage(name="stage")
        detector = PtychoDetector(
            name=name,
            stage=stage,
            data_dir=data_dir,
            sample=small_sample.sample_id,
            settings=DetectorSettings(geometry=SMALL_GEOMETRY, **settings),
        )
        made.append(detector)
        return stage, detector

    yield make
    for detector in made:  # never leave a writer thread or an open file behind
        detector.stop()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint for 32-pixel frames (see ``tiny_models``)."""
    from tiny_models import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    write_tiny_checkpoint(path)
    return path
