"""``bluesky-ptychonn serve``: a persistent Tiled server for a facility, with the ``raw`` catalog.

It runs ``tiled serve catalog`` as a child process (SQLite catalog by default, a PostgreSQL URI
accepted), with writable file and tabular storage, the detector data folders as readable
storage, bound to the loopback interface unless told otherwise, and a required API key. The key
travels to the child in ``TILED_SINGLE_USER_API_KEY`` (never on its command line, where ``ps``
would show it), and the child's output is passed on with the key masked (tiled prints it when it
comes from the environment). Once the server answers, the ``raw`` container
(``CatalogOfBlueskyRuns`` 3.0) is created if missing.

Register the command with ``add_serve_command(subparsers)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

#: Environment variable that tiled reads the single-user API key from.
API_KEY_ENV = "TILED_SINGLE_USER_API_KEY"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
        Database URI, e.g. ``postgresql://user@host/db``; default ``sqlite:///<directory>/catalog.db``.
    tables : str, optional
        Tabular storage URI; default ``duckdb:///<directory>/tables.duckdb``.
    host, port : str, int
        Bind address; loopback by default.
    public : bool
        Allow anonymous reads (writes still need the key).
    """

    directory: Path
    api_key: str
    readable: list[Path] = field(default_factory=list)
    catalog: str | None = None
    tables: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    public: bool = False
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        if not self.api_key or not self.api_key.isalnum() or len(self.api_key) < 16:
            raise ConfigurationError(
                f"an API key of at least 16 letters and digits is required for writes "
                f"(pass --api-key or set {API_KEY_ENV}); e.g. python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        self.directory = Path(self.directory).resolve()
        self.readable = [Path(p).resolve() for p in self.readable]
        if self.catalog and not self.catalog.startswith(("sqlite", "postgresql")):
            raise ConfigurationError(f"catalog must be a sqlite:/// or postgresql:// URI, got {self.catalog!r}")
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

        from .truth import connect

        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        for path in self.readable:
            path.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, API_KEY_ENV: self.api_key}
        process = self.process = subprocess.Popen(
            self.command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=_forward_masked, args=(process, self.api_key), daemon=True).start()
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


def _forward_masked(process: subprocess.Popen, secret: str) -> None:
    """Copy the child's output to our stderr, line by line, with the API key replaced."""
    for line in process.stdout or ():
        sys.stderr.write(line.replace(secret, "<api-key>"))
    sys.stderr.flush()


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``bluesky-ptychonn`` command line; returns its parser."""
    p = subparsers.add_parser("serve", help="run a persistent Tiled server with the 'raw' catalog of Bluesky runs")
    p.add_argument("directory", type=Path, help="folder for the catalog, array data and tables")
    p.add_argument(
        "-r",
        "--detector-data",
        type=Path,
        action="append",
        default=[],
        help="detector data folder the server may read (repeat for several)",
    )
    p.add_argument("--catalog", default=None, help="catalog database URI (default: SQLite in DIRECTORY)")
    p.add_argument("--tables", default=None, help="tabular storage URI (default: DuckDB in DIRECTORY)")
    p.add_argument("--api-key", default=None, help=f"API key for writes (default: ${API_KEY_ENV})")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--public", action="store_true", help="allow anonymous reads (writes still need the key)")
    p.set_defaults(func=serve)
    return p


def serve(args: argparse.Namespace) -> dict:
    """Run the server until it exits or is interrupted; returns a summary."""
    server = FacilityServer(
        directory=args.directory,
        api_key=args.api_key or os.environ.get(API_KEY_ENV, ""),
        readable=list(args.detector_data),
        catalog=args.catalog,
        tables=args.tables,
        host=args.host,
        port=args.port,
        public=args.public,
    )
    process = server.start()
    print(f"bluesky-ptychonn serve: Tiled at {server.uri} with catalog 'raw'; Ctrl-C stops it", flush=True)
    code: int | None
    try:
        code = process.wait()
    except KeyboardInterrupt:
        code = server.stop()
    return {"uri": server.uri, "directory": str(server.directory), "exit_code": code}
