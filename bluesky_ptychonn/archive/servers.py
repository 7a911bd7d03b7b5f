"""Tiled servers: the embedded one (demo, tests) and the facility one (``bluesky-ptychonn serve``).

:func:`start_embedded_server` is Tiled's in-process ``SimpleTiledServer`` with the detector data
folder as readable storage. :class:`FacilityServer` runs ``tiled serve catalog`` as a child
process (SQLite catalog by default, a PostgreSQL URI accepted), with writable file and tabular
storage, the detector data folders as readable storage, bound to the loopback interface unless
told otherwise, and a required API key. The key travels to the child in
``TILED_SINGLE_USER_API_KEY`` (never on its command line, where ``ps`` would show it), the
child's output is passed on with the key masked (tiled prints it when it comes from the
environment), and no repr shows it. Either way the ``raw`` container (``CatalogOfBlueskyRuns``
3.0) is created if missing, and :func:`subscribe_archive` has a RunEngine archive every run into it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from ..errors import ConfigurationError
from ..live.sink import IN_PROCESS_SERVERS
from ..sim.sample import SampleRegistry
from ..tiled_paths import RAW, child_container
from .truth import SimulationTruthWriter

if TYPE_CHECKING:
    from bluesky import RunEngine
    from tiled.client.container import Container
    from tiled.server import SimpleTiledServer

logger = logging.getLogger(__name__)

#: Environment variable that tiled reads the single-user API key from.
API_KEY_ENV = "TILED_SINGLE_USER_API_KEY"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class EmbeddedArchive(NamedTuple):
    """An in-process Tiled server and what a scan needs from it; ``close()`` stops the server."""

    server: SimpleTiledServer
    client: Container
    raw: Container
    data_dir: Path

    def close(self) -> None:
        """Stop the server (its directory stays when one was given)."""
        IN_PROCESS_SERVERS.discard(urllib.parse.urlsplit(self.server.uri).netloc)
        _restore_settings_override(self.server.app)
        self.server.close()

    def __repr__(self) -> str:
        # Not the tuple's repr: the server's repr is its URI, which carries the API key.
        return f"EmbeddedArchive(uri={self.server.uri.split('?')[0]!r}, data_dir={str(self.data_dir)!r})"


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
    _drop_settings_override(server.app)
    _bound_streaming_cache(server)
    netloc = urllib.parse.urlsplit(server.uri).netloc
    IN_PROCESS_SERVERS.add(netloc)  # sinks writing to it patch one array at a time (TiledSink)
    try:
        client = from_uri(server.uri)
        raw = ensure_raw_catalog(client)
    except BaseException:
        IN_PROCESS_SERVERS.discard(netloc)
        _restore_settings_override(server.app)
        server.close()
        raise
    return EmbeddedArchive(server=server, client=client, raw=raw, data_dir=data_dir)


def _drop_settings_override(app: Any) -> None:
    """Drop tiled's ``get_settings`` override from ``app`` where it changes nothing.

    While any dependency override is set, FastAPI (0.165) rebuilds every dependency of a route on
    each request: 5-15 % of a publish's CPU time on an idle embedded server, a fifth of the
    latency of a paced scan (2-core VM, ``benchmarks/results/ab-settings-override/``). tiled's
    override returns the process's one cached settings object, the one ``get_settings`` returns,
    once it has set the server's key on it (at start-up), so it is dropped only when it is the
    only override and returns that same object.
    """
    from tiled.server.settings import get_settings

    overrides = app.dependency_overrides
    if set(overrides) == {get_settings} and overrides[get_settings]() is get_settings():
        del overrides[get_settings]


#: Entries and seconds tiled's in-memory streaming cache keeps on the embedded server (tiled: 1,000, 1 h).
STREAM_CACHE_ENTRIES, STREAM_CACHE_TTL_S = 64, 60


def _bound_streaming_cache(server: SimpleTiledServer) -> None:
    """Keep tiled's in-memory streaming cache small on the embedded server, which lives in the scan's process.

    ``SimpleTiledServer`` keeps every write's payload (each patch of a live image) for websocket
    subscribers: up to 1,000 of them for an hour. 200 publishes of a 100-row block of a
    1,222x1,222 result held about 360 MiB (the process grew from 364 to 722-731 MiB; bounded: to
    432). A live viewer that subscribes needs the last few, not an hour's.
    """
    from tiled.server.streaming import StreamingCache

    context = server.catalog.context
    if context.streaming_cache is not None and context.cache_config.get("datastore") == "memory":
        bounded = {**context.cache_config, "maxsize": STREAM_CACHE_ENTRIES, "data_ttl": STREAM_CACHE_TTL_S}
        context.streaming_cache = StreamingCache(bounded)


def _restore_settings_override(app: Any) -> None:
    # tiled's shutdown reads the server's settings through the override.
    from tiled.server.settings import get_settings

    app.dependency_overrides.setdefault(get_settings, get_settings)


def connect(uri: str, api_key: str | None = None) -> tuple[Container, Container]:
    """Connect to a Tiled server; return the root client and the ``raw`` catalog (created if missing)."""
    from tiled.client import from_uri

    client = from_uri(uri, api_key=api_key)
    return client, ensure_raw_catalog(client)


def ensure_raw_catalog(client: Container) -> Container:
    """The ``raw`` container with spec ``CatalogOfBlueskyRuns`` 3.0, created if missing."""
    from tiled.structures.core import Spec

    raw = child_container(client, RAW, specs=[Spec("CatalogOfBlueskyRuns", version="3.0")])
    specs = [(s.name, s.version) for s in raw.specs]
    if ("CatalogOfBlueskyRuns", "3.0") not in specs:
        raise ConfigurationError(f"'{RAW}' exists with specs {specs}, not CatalogOfBlueskyRuns 3.0")
    return raw


#: Seconds over which :func:`subscribe_archive` merges a stream resource's flushes into one registration.
REGISTER_EVERY_S = 1.0


def subscribe_archive(
    run_engine: RunEngine,
    client: Container,
    *,
    registry: SampleRegistry | None = None,
    batch_size: int = 1,
    backup_directory: str | Path | None = None,
    register_every_s: float = REGISTER_EVERY_S,
) -> list[int]:
    """Archive every run the RunEngine makes: ``TiledWriter`` into ``raw``, plus simulation truths.

    Frames are registered with Tiled as the run goes, so it can be watched: a detector's flushes
    of one stream resource merged over ``register_every_s`` (:class:`StreamDatumCoalescer`; 0
    registers every flush), events at every document (``batch_size=1``). Without
    ``backup_directory`` both callbacks raise on a Tiled failure, which aborts the run: a run that
    cannot be archived is not silently lost. With it (what a beamline wants), a
    run whose writes fail is kept whole in that folder as JSON Lines and the scan goes on;
    :func:`~bluesky_ptychonn.archive.backup.restore_backups` writes it into Tiled afterwards.
    Returns the subscription tokens.
    """
    from bluesky_tiled_plugins import TiledWriter

    raw = ensure_raw_catalog(client)
    truth = SimulationTruthWriter(client, registry=registry)
    backup = None if backup_directory is None else str(backup_directory)
    writer = TiledWriter(raw, batch_size=batch_size, backup_directory=backup)
    archive = StreamDatumCoalescer(writer, register_every_s) if register_every_s > 0 else writer
    return [run_engine.subscribe(truth, "start"), run_engine.subscribe(archive)]


class StreamDatumCoalescer:
    """Hands documents to ``writer`` with the StreamDatum of each stream resource merged over ``interval_s``.

    TiledWriter registers every StreamDatum with Tiled, a request whose server side (catalog
    lookups and an update of the data source) cost about 38 ms of CPU on the 2-core VM: archiving
    a scan whose detector flushed every 0.1 s took 0.49 of its two cores through the embedded
    server, 0.03 merged over a second, and paced scans with the analysis in the same process had
    a latency median of 1.24-1.59 s against 1.53-1.92 s (three alternating pairs,
    ``benchmarks/results/ab-register-every/``). The analysis is not delayed: it is subscribed
    apart and reads each flush's frames as it comes. A StreamDatum waits here until one of the
    same resource comes ``interval_s`` or more after the first one waiting, or any other document
    (an event, the stop), which sends everything waiting first, in order.
    """

    def __init__(self, writer: Any, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.writer = writer
        self.interval_s = interval_s
        self._clock = clock
        self._waiting: dict[str, tuple[float, dict]] = {}  # stream resource -> (since, merged StreamDatum)

    def __call__(self, name: str, doc: dict) -> None:
        if name != "stream_datum":
            self.flush()
            self.writer(name, doc)
            return
        from bluesky_tiled_plugins.writing.tiled_writer import concatenate_stream_datums

        now = self._clock()
        since, waiting = self._waiting.pop(doc["stream_resource"], (now, None))
        if waiting is not None:
            try:
                doc = concatenate_stream_datums(waiting, doc)
            except ValueError:  # not the next range of the same descriptor: the one waiting goes as it is
                self.writer(name, waiting)
                since = now
        if now - since >= self.interval_s:
            self.writer(name, doc)
        else:
            self._waiting[doc["stream_resource"]] = (since, doc)

    def flush(self) -> None:
        """Send every StreamDatum waiting."""
        waiting, self._waiting = self._waiting, {}
        for _, doc in waiting.values():
            self.writer("stream_datum", doc)


def subscribe_all(
    run_engine: RunEngine,
    client: Container,
    analysis: Any,
    *,
    backup_directory: str | Path,
    registry: SampleRegistry | None = None,
) -> list[int]:
    """Subscribe the live analysis and the archive in the order that survives a Tiled outage.

    The analysis first: the RunEngine calls callbacks in subscription order, so whatever the
    archive does, the analysis has each document, the stop included, and finishes its result.
    The archive keeps a backup instead of aborting the scan (see :func:`subscribe_archive`).
    """
    token = run_engine.subscribe(analysis)
    return [token, *subscribe_archive(run_engine, client, registry=registry, backup_directory=backup_directory)]


@dataclass
class FacilityServer:
    """A ``tiled serve catalog`` child process and its settings; a context manager.

    Attributes
    ----------
    directory : Path
        Holds the SQLite catalog (by default), ``data/`` (writable arrays) and ``tables.duckdb``.
    api_key : str
        Required for writes (and, unless ``public``, for reads). Letters and digits only.
    readable : list of Path
        Detector data folders whose HDF5 files runs point at.
    catalog : str, optional
        Database URI, e.g. ``postgresql://user@host:5432/db`` (the database must exist; its tables
        are created on first start); default ``sqlite:///<directory>/catalog.db``. No password in
        it: tiled's command line would show it; the child reads ``PGPASSWORD`` or ``~/.pgpass``.
    tables : str, optional
        Tabular storage URI; default ``duckdb:///<directory>/tables.duckdb``.
    host, port : str, int
        Bind address; loopback by default.
    public : bool
        Allow anonymous reads (writes still need the key).
    log : Path, optional
        Append tiled's output (a line per request, the key masked) to this file instead of stderr.
    """

    directory: Path
    api_key: str = field(repr=False)
    readable: list[Path] = field(default_factory=list)
    catalog: str | None = None
    tables: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    public: bool = False
    log: Path | None = None
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        if not self.api_key or not self.api_key.isalnum() or len(self.api_key) < 16:
            raise ConfigurationError(
                "an API key of at least 16 letters and digits is required for writes; "
                "e.g. python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        self.directory = Path(self.directory).resolve()
        self.readable = [Path(p).resolve() for p in self.readable]
        if self.catalog and not self.catalog.startswith(("sqlite", "postgresql")):
            raise ConfigurationError(f"catalog must be a sqlite:/// or postgresql:// URI, got {self.catalog!r}")
        if self.catalog and urllib.parse.urlsplit(self.catalog).password is not None:
            raise ConfigurationError(
                "the catalog URI holds a password, which ps would show on tiled's command line: "
                "leave it out and set PGPASSWORD or use ~/.pgpass"
            )
        if self.host not in _LOOPBACK:
            logger.warning("Tiled will listen on %s, beyond this machine: keep the API key secret", self.host)

    @property
    def uri(self) -> str:
        """The API address (no key)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/api/v1"

    def command(self) -> list[str]:
        """The ``tiled serve catalog`` command line (without the key, which goes in the environment)."""
        catalog = self.catalog or f"sqlite:///{self.directory / 'catalog.db'}"
        tables = self.tables or f"duckdb:///{self.directory / 'tables.duckdb'}"
        cmd = [
            sys.executable,
            "-m",
            "tiled",
            "serve",
            "catalog",
            catalog,
            "--init",
            "-w",
            str(self.directory / "data"),
            "-w",
            tables,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        for path in self.readable:
            cmd += ["-r", str(path)]
        if self.public:
            cmd.append("--public")
        return cmd

    def start(self, timeout_s: float = 120.0) -> subprocess.Popen:
        """Start the child, wait until it answers, make sure ``raw`` exists; return the child."""
        import httpx

        self.check_catalog()
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        for path in self.readable:
            path.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, API_KEY_ENV: self.api_key}
        process = self.process = subprocess.Popen(
            self.command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        out = Path(self.log).open("a") if self.log else sys.stderr
        threading.Thread(target=_forward_masked, args=(process, self.api_key, out), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        health = self.uri.removesuffix("/api/v1") + "/healthz"
        with httpx.Client(trust_env=False) as http:
            while True:
                if process.poll() is not None:
                    raise ConfigurationError(f"tiled exited with code {process.returncode}: see its output above")
                try:
                    if http.get(health, timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Tiled did not answer at {health} within {timeout_s} s")
                time.sleep(0.2)
        client, _ = connect(self.uri, api_key=self.api_key)
        client.context.close()
        return process

    def check_catalog(self, timeout_s: float = 10.0) -> None:
        """Open a PostgreSQL catalog once before starting tiled; raise ``ConfigurationError`` if it fails.

        A wrong address, database or password is then one clear error within seconds, not
        tiled's page of traceback after its slow start.
        """
        catalog = self.catalog
        if not catalog or not catalog.startswith("postgresql"):
            return
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        from sqlalchemy.ext.asyncio import create_async_engine
        from tiled.utils import ensure_specified_sql_driver

        async def probe() -> None:
            engine = create_async_engine(ensure_specified_sql_driver(catalog))
            try:
                async with engine.connect():
                    pass
            finally:
                await engine.dispose()

        try:  # in a thread of its own: the caller may be inside an event loop (Jupyter)
            with ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, asyncio.wait_for(probe(), timeout_s)).result()
        except Exception as err:  # asyncpg's and OSError's, whatever the fault: all mean the same here
            raise ConfigurationError(
                f"cannot open the catalog database {catalog}: {type(err).__name__}: {err} "
                "(is PostgreSQL listening there, does the database exist, is PGPASSWORD set?)"
            ) from err

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Terminate the child (SIGTERM, then SIGKILL after ``timeout_s``); return its exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> FacilityServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _forward_masked(process: subprocess.Popen, secret: str, out: TextIO) -> None:
    """Copy the child's output to ``out`` line by line, the API key masked; closes ``out`` (unless stderr)."""
    for line in process.stdout or ():
        out.write(line.replace(secret, "<api-key>"))
    out.flush()
    if out is not sys.stderr:
        out.close()


def tiled_run_uri(client: Container, uid: str) -> str:
    """The HTTP address of a raw run (without any API key)."""
    return f"{client.context.api_uri}metadata/{RAW}/{uid}"
