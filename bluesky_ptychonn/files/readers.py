"""Reading the frames and positions that documents point to, only inside configured data roots.

A document names a file (a StreamResource ``uri`` or a Resource ``root``/``resource_path``); a
scan's documents are untrusted input, so every path is resolved (symlinks included) and must
lie under one of the roots the deployment configured.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlparse

import h5py
import numpy as np

from ..errors import DataPathError, ScanFileError


class DataRoots:
    """The folders whose files documents may name."""

    def __init__(self, roots: Iterable[str | Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]

    def resolve(self, location: str) -> Path:
        """A ``file://`` URI or a path -> a resolved path inside a root, or :class:`DataPathError`."""
        parsed = urlparse(location)
        if parsed.scheme not in ("", "file"):
            raise DataPathError(f"only local files can be read, got the URI {location!r}")
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise DataPathError(f"only files on localhost can be read, got host {parsed.netloc!r} in {location!r}")
        path = Path(unquote(parsed.path) if parsed.scheme else location).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise DataPathError(f"{path} is outside the configured data roots {[str(r) for r in self.roots]}")
        return path


class HDF5Reader:
    """Keeps the files of one run open (SWMR where the writer allows it) and reads index ranges."""

    def __init__(self, roots: DataRoots) -> None:
        self.roots = roots
        self._files: dict[Path, h5py.File] = {}
        self._lock = threading.Lock()

    def read(self, location: str, dataset: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``dataset`` in the file at ``location``; refreshes for SWMR growth."""
        path = self.roots.resolve(location)
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = _open(path)
            try:
                ds = f[dataset]
            except KeyError as err:
                raise ScanFileError(f"{path} has no dataset {dataset!r}") from err
            if ds.shape[0] < stop and f.swmr_mode:
                ds.refresh()
            if ds.shape[0] < stop:
                raise ScanFileError(f"{path}:{dataset} has {ds.shape[0]} rows, a document asked for {start}:{stop}")
            return ds[start:stop]

    def close(self) -> None:
        """Close every open file."""
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise ScanFileError(f"{path} does not exist")
    try:
        return h5py.File(path, "r", swmr=True)
    except OSError:
        # Not written in SWMR mode (e.g. an archived file): a plain read is fine once it is closed.
        return h5py.File(path, "r")
