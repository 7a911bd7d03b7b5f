"""Reading the frames and positions that documents point to, only inside configured data roots.

A document names a file (a StreamResource ``uri`` or a Resource ``root``/``resource_path``); a
scan's documents are untrusted input, so every path is resolved (symlinks included) and must
lie under one of the roots the deployment configured. So must every file that HDF5 itself opens
when the file is read: the targets of external links, the sources of virtual datasets and
external raw storage.
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
        """The resolved path of a ``file://`` URI or a plain path, if it and what it reads lie inside a root.

        Every reader calls this just before it opens a file, so an HDF5 file that exists is
        checked here (see :meth:`_check_hdf5`) as well as its path.

        Parameters
        ----------
        location : str
            A ``file://`` URI (host empty or ``localhost``) or a local path.

        Returns
        -------
        Path
            The resolved path; an existing HDF5 file has been opened to be checked, and closed.

        Raises
        ------
        DataPathError
            If the location is remote, not a file URI, or outside every root, or if it is an
            HDF5 file that would read another file outside every root.
        """
        parsed = urlparse(location)
        if parsed.scheme not in ("", "file"):
            raise DataPathError(f"only local files can be read, got the URI {location!r}")
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise DataPathError(f"only files on localhost can be read, got host {parsed.netloc!r} in {location!r}")
        path = Path(unquote(parsed.path) if parsed.scheme else location).resolve()
        if not self._inside(path):
            raise DataPathError(f"{path} is outside the configured data roots {[str(r) for r in self.roots]}")
        self._check_hdf5(path, {path})
        return path

    def _check_hdf5(self, path: Path, seen: set[Path]) -> None:
        """Refuse an HDF5 file that makes HDF5 open a file outside the roots, or one not there to check.

        HDF5 follows external links, virtual dataset sources and external raw storage by itself
        when a dataset is read, so a file inside a root could otherwise read any file on the host.
        A name is looked for where HDF5 looks (as written, beside the file, in the working
        directory; prefixes set in the environment are the deployment's own): at least one place
        must exist, and every one that exists must lie inside a root. Linked HDF5 files are checked
        in turn. The whole file is checked, not only the dataset a document names.

        A file that is missing, not HDF5, or held by a writer without SWMR is not checked: its
        reader cannot open it either, and resolves it again (and so checks it) before it retries.

        Raises :class:`DataPathError` naming the dataset and the file it would read; ``seen``
        holds the files already checked (a link may lead back).
        """
        try:
            f = open_hdf5(path)
        except (OSError, ScanFileError):
            return
        with f:
            reads = _files_read_by(f)
        for what, name in reads:
            written = Path(name)
            tail = Path(written.name) if written.is_absolute() else written
            places = ([written] if written.is_absolute() else []) + [path.parent / tail, Path.cwd() / tail]
            found = [place.resolve() for place in places if place.exists()]
            if not found:
                raise DataPathError(f"{path}: {what} reads {name!r}, which does not exist (so cannot be checked)")
            for target in found:
                if not self._inside(target):
                    roots = [str(r) for r in self.roots]
                    raise DataPathError(f"{path}: {what} reads {target}, outside the configured data roots {roots}")
                if target not in seen:
                    seen.add(target)
                    self._check_hdf5(target, seen)

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)


def _files_read_by(f: h5py.File) -> list[tuple[str, str]]:
    """(what, file name as written) for every other file that reading ``f`` may open."""
    found: list[tuple[str, str]] = []

    def visit(name: str, link: object) -> None:
        # Links are visited without being followed: nothing outside ``f`` is opened here.
        if isinstance(link, h5py.ExternalLink):
            found.append((f"external link /{name}", link.filename))
            return
        obj = f.get(name) if isinstance(link, h5py.HardLink) else None
        if isinstance(obj, h5py.Dataset):
            if obj.is_virtual:
                sources = {s.file_name for s in obj.virtual_sources()} - {"."}  # "." is this file
                found.extend((f"virtual dataset /{name}", source) for source in sorted(sources))
            found.extend((f"external storage of /{name}", entry[0]) for entry in obj.external or ())

    f.visititems_links(visit)
    return found


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
