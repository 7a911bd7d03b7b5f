"""Small helpers for tests that start, stop and restart real Tiled servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server_class, **kwargs):
    """Start a Tiled server; its start-up wait is a fixed 20 s, which a loaded 2-core machine can miss."""
    for attempt in range(3):
        try:
            return server_class(**kwargs)
        except TimeoutError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def start_serve(directory: Path, *args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``bluesky-ptychonn serve DIRECTORY ARGS`` as a facility does; :func:`serve_uri` waits for it.

    Secrets go in ``env`` (added to ours), never in ``args``. Its log (tiled's output) goes to ``log``.
    """
    argv = [sys.executable, "-m", "bluesky_ptychonn.cli", "serve", str(directory), *args]
    with log.open("w") as err:
        return subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=err, text=True)


def serve_uri(process: subprocess.Popen, log: Path) -> str:
    """Wait until ``serve`` prints its URI (once Tiled answers and ``raw`` exists); the log's tail if it fails."""
    assert process.stdout is not None
    line = process.stdout.readline()  # '' if it exits: serve gives up by itself when tiled does not answer
    if " Tiled at " not in line:
        stop_serve(process)
        raise RuntimeError(f"bluesky-ptychonn serve did not start: {line}\n{log.read_text()[-4000:]}")
    return line.split(" Tiled at ")[1].split()[0]


def stop_serve(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM, as a service manager stops it (serve stops its tiled child); its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    finally:
        if process.stdout is not None:
            process.stdout.close()
