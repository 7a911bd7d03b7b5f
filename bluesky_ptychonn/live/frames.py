"""Where a run's frames come from, read with the ecosystem's own parts.

- StreamResource/StreamDatum: bluesky-tiled-plugins' consolidators turn the documents into the data
  source that ``TiledWriter`` registers (its assets, structure and adapter parameters, which honour
  ``multiplier``, ``template``, ``slice``, ``squeeze``, ``join_method`` and ``swmr``), and Tiled's HDF5
  adapter reads the rows each StreamDatum announces, as a Tiled server would serve the same run.
  One plain file (no ``template``, ``slice`` or ``squeeze``) is read directly with h5py instead,
  rows mapped by the consolidator's datum shape: the adapter reopens its files on every read.
- Legacy Resource/Datum: event-model's ``Filler`` with the areaDetector HDF5 handler of
  :mod:`~bluesky_ptychonn.files.readers`, bound to the data roots.

A scan's documents are untrusted: every file they name is checked against the data roots before
it is opened.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple, cast

import h5py
import numpy as np

# Both take seconds to import (tiled.adapters.hdf5 loads Tiled's catalog). They are imported with
# this module, when the callback is set up, so that the first StreamDatum of a scan does not stall
# the RunEngine, which calls the callback in its own thread.
from bluesky_tiled_plugins.writing.consolidators import (
    ConsolidatorBase,
    MultipartRelatedConsolidator,
    Patch,
    consolidator_factory,
)
from event_model import Filler, pack_event_page, unpack_event_page
from event_model.documents import Datum, EventDescriptor, EventPage, Resource, StreamDatum, StreamResource
from tiled.adapters.hdf5 import HDF5ArrayAdapter
from tiled.ndslice import NDSlice
from tiled.structures.array import ArrayStructure

from ..errors import DataPathError, ScanFileError
from ..files.readers import DataRoots, confined_handler, open_hdf5

HDF5_MIMETYPE = "application/x-hdf5"

#: Dimensions of one value of each role: a frame is (y, x), a position (y, x), a frame id a scalar.
ROLE_RANK = {"frames": 2, "positions": 1, "ids": 0}

#: Seconds between the Filler's attempts to open a file that is not there yet. Short: the callback
#: runs in the RunEngine's thread, and a long wait would hold up the scan.
FILL_RETRY_S = (0.01, 0.05, 0.1)


def per_point(role: str, rows: np.ndarray) -> np.ndarray:
    """One value per scan point: the frames of a point (``multiplier > 1``) averaged into one pattern.

    Parameters
    ----------
    role : {"frames", "positions", "ids"}
        What the rows hold.
    rows : numpy.ndarray
        (points, *value) or, with several frames per point, (points, frames_per_point, *value).

    Returns
    -------
    numpy.ndarray
        (points, *value). Rows of any other shape are returned as they are, for the live
        reconstruction to refuse and count.
    """
    rows = np.asarray(rows)
    if rows.ndim != ROLE_RANK[role] + 2:
        return rows
    if role == "ids":
        return rows[:, 0]  # a point is known by the id of its first frame
    # The mean, not the sum: one averaged pattern keeps the counts per exposure that the model was
    # trained on (and the mean of positions is the centre of the point's exposures).
    return rows.mean(axis=1)


def stream_indices(doc: StreamDatum) -> np.ndarray:
    """The stream indices (Event ``seq_num - 1``) of the points a StreamDatum announces.

    The RunEngine numbers a StreamDatum's points in ``seq_nums`` as it numbers Events, so frames
    from files and values from Events meet at the same index. Documents composed outside a
    RunEngine leave ``seq_nums`` at 0:0; they are numbered by their ``indices``.

    Parameters
    ----------
    doc : StreamDatum

    Returns
    -------
    numpy.ndarray
        (points,) int.
    """
    seq = doc["seq_nums"]
    if seq["stop"] > seq["start"]:
        return np.arange(seq["start"] - 1, seq["stop"] - 1)
    return np.arange(doc["indices"]["start"], doc["indices"]["stop"])


class StreamFrames:
    """Rows announced by StreamDatum documents, read as TiledWriter's consolidators describe them.

    One consolidator per (descriptor, data key), as TiledWriter keeps them: a further StreamResource
    for the same key (a detector that starts a new file) extends it.

    The common case, one HDF5 file per data key without ``slice`` or ``squeeze``, is read
    directly from the file, kept open (SWMR) for the run: the consolidator's datum shape says how
    many stored frames make one row (``multiplier``). Everything else goes through Tiled's HDF5
    adapter, which opens its files afresh for each StreamDatum and costs about 1 ms a 64 x 64
    frame with one-frame chunks plus 10 ms a StreamDatum on a 2-core CPU, against about 0.02 ms
    a frame read directly; ``tests/test_stream_resources.py`` checks that both paths agree.

    Parameters
    ----------
    roots : DataRoots
        The folders whose files may be opened.
    data_keys : iterable of str
        The data keys to read; StreamResources of other keys are ignored.
    """

    def __init__(self, roots: DataRoots, data_keys: Iterable[str]) -> None:
        self.roots = roots
        self.data_keys = frozenset(data_keys)
        self._resources: dict[str, StreamResource] = {}
        self.seen: set[str] = set()  # uids of every StreamResource so far, kept or not
        self._by_key: dict[tuple[str, str], ConsolidatorBase] = {}
        self._by_resource: dict[str, ConsolidatorBase] = {}
        self._files: dict[Path, h5py.File] = {}

    def stream_resource(self, doc: StreamResource) -> None:
        """Keep a StreamResource of a wanted data key.

        Parameters
        ----------
        doc : StreamResource

        Raises
        ------
        DataPathError
            If it names one file outside the data roots (refused once, here; its StreamDatums are
            then ignored). The files of a ``template`` are checked as StreamDatums name them.
        ScanFileError
            If its mimetype is not HDF5.
        """
        self.seen.add(doc["uid"])
        if doc["data_key"] not in self.data_keys:
            return
        if doc["mimetype"] != HDF5_MIMETYPE:
            raise ScanFileError(
                f"StreamResource {doc['uid']} of {doc['data_key']!r} has mimetype {doc['mimetype']!r}; "
                f"only {HDF5_MIMETYPE!r} can be read"
            )
        if not doc["parameters"].get("template"):
            self.roots.resolve(doc["uri"])
        self._resources[doc["uid"]] = doc

    def read(self, doc: StreamDatum, descriptor: EventDescriptor) -> tuple[str, np.ndarray] | None:
        """The data key and the rows that one StreamDatum announces.

        Parameters
        ----------
        doc : StreamDatum
        descriptor : EventDescriptor
            The descriptor ``doc`` refers to (its data key gives the shape and dtype of a row).

        Returns
        -------
        tuple of (str, numpy.ndarray) or None
            The data key and its rows, (points, *datum shape) as the consolidator describes a
            datum (with ``multiplier > 1``: (points, multiplier, y, x)); None for a StreamDatum
            of a StreamResource that was not kept.

        Raises
        ------
        DataPathError
            If a file it names lies outside the data roots; nothing is opened then.
        """
        resource = self._resources.get(doc["stream_resource"])
        if resource is None or doc["indices"]["stop"] <= doc["indices"]["start"]:
            return None
        consolidator = self._consolidator(resource, descriptor)
        before = len(consolidator.assets)
        patch = consolidator.consume_stream_datum(doc)
        rows = self._read_directly(consolidator, patch)
        if rows is None:
            rows = _read_patch(consolidator, patch, consolidator.assets[before:], self.roots)
        return resource["data_key"], rows

    def close(self) -> None:
        """Close the files kept open for direct reads."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _read_directly(self, consolidator: ConsolidatorBase, patch: Patch) -> np.ndarray | None:
        """The rows of ``patch`` read with h5py from one kept-open file, or None where Tiled's adapter must read.

        The consolidator stacks rows of ``datum_shape`` in C order over the stored frames, so row
        ``i`` is stored frames ``i * k`` to ``(i + 1) * k`` with ``k`` frames per row.
        """
        params = consolidator.adapter_parameters()
        if isinstance(consolidator, MultipartRelatedConsolidator) or len(consolidator.assets) != 1:
            return None
        if params.get("slice") or params.get("squeeze") or consolidator.join_method != "stack":
            return None
        path = self.roots.resolve(consolidator.assets[0].data_uri)
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open_hdf5(path)
        try:
            dataset = f[params["dataset"]]
        except KeyError as err:
            raise ScanFileError(f"{path} has no dataset {params['dataset']!r}") from err
        per_row, per_frame = math.prod(consolidator.datum_shape), math.prod(dataset.shape[1:])
        if not per_frame or per_row % per_frame:
            return None
        k = per_row // per_frame
        start, stop = patch.offset[0] * k, (patch.offset[0] + patch.shape[0]) * k
        if dataset.shape[0] < stop and f.swmr_mode:
            dataset.refresh()  # the detector appends while we read
        if dataset.shape[0] < stop:
            raise ScanFileError(
                f"{path}:{params['dataset']} has {dataset.shape[0]} frames; {start}:{stop} were announced"
            )
        return dataset[start:stop].reshape(patch.shape[0], *consolidator.datum_shape)

    def _consolidator(self, resource: StreamResource, descriptor: EventDescriptor) -> ConsolidatorBase:
        found = self._by_resource.get(resource["uid"])
        if found is not None:
            return found
        key = (descriptor["uid"], resource["data_key"])
        consolidator = self._by_key.get(key)
        if consolidator is None:
            consolidator = self._by_key[key] = consolidator_factory(resource, descriptor)
        else:
            consolidator.update_from_stream_resource(resource)
        self._by_resource[resource["uid"]] = consolidator
        return consolidator


class _CatalogNode(NamedTuple):
    """The two fields of a catalog node that Tiled's adapters read (``init_adapter`` fakes it the same way)."""

    metadata_: dict
    specs: list


class _AnnouncedFramesAdapter(HDF5ArrayAdapter):
    """Tiled's HDF5 array adapter, blind to frames written after the last announced one.

    A detector's file grows ahead of its StreamDatum documents. Tiled drops such extra rows itself
    when a row is one frame; with several frames per point (``multiplier > 1``) its reshape of the
    stored frames (F, y, x) into points (rows, m, y, x) fails unless F is exactly rows x m.
    """

    def __init__(self, array: Any, structure: ArrayStructure, **kwargs: Any) -> None:
        announced = math.prod(structure.shape)
        per_row = math.prod(array.shape[1:])
        if array.ndim and per_row and announced % per_row == 0 and array.shape[0] * per_row > announced:
            array = array[: announced // per_row]
        super().__init__(array, structure, **kwargs)


def _read_patch(consolidator: ConsolidatorBase, patch: Patch, new_assets: list, roots: DataRoots) -> np.ndarray:
    """Read the rows of ``patch`` through Tiled's HDF5 adapter, after checking the files it will open.

    This is the consolidator's ``init_adapter`` followed by ``read``, except that a multi-file
    datum's data source is narrowed to its own files, and the adapter ignores unannounced frames.
    """
    source = consolidator.get_data_source()
    rows = NDSlice(slice(patch.offset[0], patch.offset[0] + patch.shape[0]))
    if isinstance(consolidator, MultipartRelatedConsolidator):
        # A multi-file datum lives in its own files, the assets it has just added: read those alone,
        # or each StreamDatum would reopen every earlier file of the scan.
        window = ArrayStructure(
            data_type=consolidator.data_type,
            shape=tuple(patch.shape),
            chunks=tuple((n,) for n in patch.shape),
            dims=source.structure.dims,
        )
        source = dataclasses.replace(source, assets=new_assets, structure=window)
        rows = NDSlice(slice(None))
    for asset in source.assets:
        roots.resolve(asset.data_uri)  # before anything is opened
    adapter = _AnnouncedFramesAdapter.from_catalog(source, _CatalogNode({}, []), **consolidator.adapter_parameters())
    return np.asarray(adapter.read(rows))


class DatumFrames:
    """Values that legacy Resource/Datum documents point to, filled into EventPages by event-model's Filler.

    Parameters
    ----------
    roots : DataRoots
        The folders whose files may be opened.
    data_keys : iterable of str
        The data keys to fill; other external keys of an EventPage stay unfilled (they may belong
        to another detector, with files this service has no business reading).
    """

    def __init__(self, roots: DataRoots, data_keys: Iterable[str]) -> None:
        self.roots = roots
        self.data_keys = frozenset(data_keys)
        handler = confined_handler(roots)
        # Our own handler cache, so that the files the handlers hold open are closed with the run.
        self._handlers: dict[tuple[str, str], Any] = {}
        self.filler = Filler(
            dict.fromkeys(handler.specs, handler),
            coerce="force_numpy",
            inplace=False,  # the same documents go to TiledWriter: never put arrays into them
            handler_cache=self._handlers,
            retry_intervals=list(FILL_RETRY_S),
        )
        self._external: dict[str, frozenset[str]] = {}
        self._refused_resources: set[str] = set()
        self._refused_datums: set[str] = set()

    def descriptor(self, doc: EventDescriptor) -> None:
        """Remember a descriptor (the Filler looks up its data keys).

        Parameters
        ----------
        doc : EventDescriptor
        """
        self.filler.descriptor(doc)
        self._external[doc["uid"]] = frozenset(
            key
            for key, data_key in doc["data_keys"].items()
            if key in self.data_keys and data_key.get("external") and not data_key["external"].startswith("STREAM:")
        )

    def resource(self, doc: Resource) -> None:
        """Remember a Resource; refuse one of a readable spec whose file lies outside the data roots.

        Parameters
        ----------
        doc : Resource

        Raises
        ------
        DataPathError
            If the file lies outside the data roots (refused once, here; the Events that point
            into it are then skipped).
        """
        if doc["spec"] in self.filler.handler_registry:
            try:
                # The full path as the Filler builds it for the handler.
                self.roots.resolve(os.path.join(doc.get("root", ""), doc["resource_path"]))
            except DataPathError:
                self._refused_resources.add(doc["uid"])
                raise
        self.filler.resource(doc)

    def datum(self, doc: Datum) -> None:
        """Remember a Datum (a DatumPage is unpacked into Datums by the run's DocumentRouter).

        Parameters
        ----------
        doc : Datum
        """
        if doc["resource"] in self._refused_resources:
            self._refused_datums.add(doc["datum_id"])
            return
        self.filler.datum(doc)

    def fill(self, page: EventPage) -> EventPage | None:
        """The page with the wanted keys read from their files as numpy arrays.

        Parameters
        ----------
        page : EventPage

        Returns
        -------
        EventPage or None
            A new page (``page`` itself when nothing needed filling); Events pointing into a
            refused Resource are left out, and None is returned when none is left.
        """
        filled = page.get("filled")
        if filled is None:
            # The page does not say: its external keys are unfilled (what the Filler assumes of an
            # Event without ``filled``; unpacking a page would lose that, so say it explicitly).
            n = len(page["seq_num"])
            filled = {k: [False] * n for k in self._external.get(page["descriptor"], ()) if k in page["data"]}
            page = cast(EventPage, {**page, "filled": filled})
        unfilled = frozenset(k for k in self.data_keys & filled.keys() if not all(filled[k]))
        if not unfilled:
            return page
        refused = self._refused_datums
        keep = [
            not any(isinstance(value, str) and value in refused for value in values)
            for values in zip(*(page["data"][k] for k in unfilled), strict=True)
        ]
        if not all(keep):
            events = [event for event, kept in zip(unpack_event_page(page), keep, strict=True) if kept]
            if not events:
                return None
            page = pack_event_page(*events)
        return self.filler.fill_event_page(page, include=unfilled, inplace=False)

    def close(self) -> None:
        """Close the files the handlers hold open and drop the Filler's caches."""
        for handler in self._handlers.values():
            handler.close()
        self._handlers.clear()
        self.filler.close()
