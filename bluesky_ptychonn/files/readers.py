"""Reading the frames and positions that documents point to, only inside configured data roots.

A document names a file (a StreamResource ``uri`` or a Resource ``root``/``resource_path``); a
scan's documents are untrusted input, so every path is resolved (symlinks included) and must
lie under one of the roots the deployment configured.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse

import h5py
import numpy as np

from ..errors import DataPathError, ScanFileError


class DataRoots:
    """The folders whose files documents may name.

    Parameters
    ----------
    roots : iterable of str or Path
        The folders; resolved once (symlinks included). No roots: every file is refused.
    """

    def __init__(self, roots: Iterable[str | Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]

    def resolve(self, location: str) -> Path:
        """The resolved path of a ``file://`` URI or a plain path, if it lies inside a root.

        Parameters
        ----------
        location : str
            A ``file://`` URI (host empty or ``localhost``) or a local path.

        Returns
        -------
        Path
            The resolved path; nothing is opened.

        Raises
        ------
        DataPathError
            If the location is remote, not a file URI, or outside every root.
        """
        parsed = urlparse(location)
        if parsed.scheme not in ("", "file"):
            raise DataPathError(f"only local files can be read, got the URI {location!r}")
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise DataPathError(f"only files on localhost can be read, got host {parsed.netloc!r} in {location!r}")
        path = Path(unquote(parsed.path) if parsed.scheme else location).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise DataPathError(f"{path} is outside the configured data roots {[str(r) for r in self.roots]}")
        return path


class AreaDetectorHDF5Handler:
    """Reads the frames of one areaDetector HDF5 file (Resource spec ``AD_HDF5``), only inside data roots.

    The handler protocol of event-model's ``Filler``: it makes one handler per Resource with
    ``handler(full_path, **resource_kwargs)`` and calls it with each Datum's ``datum_kwargs``. The
    file stays open for the run (SWMR where the writer allows it), as areaDetector's own handler does.
    Use :func:`confined_handler` to bind the data roots; this base class has none and refuses every file.

    Parameters
    ----------
    filename : str
        Full path of the file (the Resource's ``root`` joined with its ``resource_path``).
    frame_per_point : int
        Frames written per datum (areaDetector's ``NumCapture`` per trigger).
    dataset : str
        The frames dataset, (frames, y, x); areaDetector's default layout unless the Resource says otherwise.

    Raises
    ------
    DataPathError
        If ``filename`` lies outside the data roots; nothing is opened then.
    ScanFileError
        If the file or its dataset does not exist, or ``frame_per_point`` is below 1.
    """

    #: The Resource specs this handler reads (``AD_HDF5_SWMR`` is the same layout written in SWMR mode).
    specs: ClassVar[frozenset[str]] = frozenset({"AD_HDF5", "AD_HDF5_SWMR"})
    #: Folders whose files may be opened; bound by :func:`confined_handler`.
    data_roots: ClassVar[DataRoots] = DataRoots(())

    def __init__(self, filename: str, frame_per_point: int = 1, dataset: str = "/entry/data/data") -> None:
        if int(frame_per_point) < 1:
            raise ScanFileError(f"frame_per_point must be at least 1, got {frame_per_point!r} for {filename}")
        self.path = self.data_roots.resolve(filename)
        self.frame_per_point = int(frame_per_point)
        self._file = open_hdf5(self.path)
        try:
            self._dataset = self._file[dataset]
        except KeyError as err:
            self._file.close()
            raise ScanFileError(f"{self.path} has no dataset {dataset!r}") from err

    def __call__(self, point_number: int) -> np.ndarray:
        """The frames of one datum: (y, x) with one frame per point, else (frame_per_point, y, x)."""
        start = int(point_number) * self.frame_per_point
        stop = start + self.frame_per_point
        ds = self._dataset
        if ds.shape[0] < stop and self._file.swmr_mode:
            ds.refresh()  # the detector may still be writing: see the rows flushed since the last read
        if ds.shape[0] < stop:
            raise ScanFileError(f"{self.path}:{ds.name} has {ds.shape[0]} frames, a datum asked for {start}:{stop}")
        rows = ds[start:stop]
        return rows[0] if self.frame_per_point == 1 else rows

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def confined_handler(roots: DataRoots) -> type[AreaDetectorHDF5Handler]:
    """:class:`AreaDetectorHDF5Handler` bound to ``roots``, for a handler registry.

    A class rather than a ``functools.partial``: event-model's ``Filler`` subclasses the handler
    classes it is given (to coerce results to numpy).

    Parameters
    ----------
    roots : DataRoots
        The folders whose files the handler may open.

    Returns
    -------
    type
        A subclass of :class:`AreaDetectorHDF5Handler` whose ``data_roots`` are ``roots``.
    """

    class ConfinedAreaDetectorHDF5Handler(AreaDetectorHDF5Handler):
        data_roots = roots

    return ConfinedAreaDetectorHDF5Handler


def open_hdf5(path: Path) -> h5py.File:
    """Open ``path`` for reading, in SWMR mode when the writer allows it."""
    if not path.is_file():
        raise ScanFileError(f"{path} does not exist")
    try:
        return h5py.File(path, "r", swmr=True)
    except OSError:
        # Not written in SWMR mode (e.g. an archived file): a plain read is fine once it is closed.
        return h5py.File(path, "r")
