"""One run's documents, routed to its :class:`~bluesky_ptychonn.core.engine.LiveReconstruction`.

:class:`RunReconstructor` is what :class:`~bluesky_ptychonn.live.callback.PtychoNNCallback`'s
``RunRouter`` makes for each run: it decodes the run's documents, reads the frames they point to
(only inside the data roots), matches frames, positions and ids by stream index, and records
every failure in the run's result.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from functools import partial, reduce
from typing import TYPE_CHECKING, Any

import numpy as np
from bluesky.callbacks.core import make_class_safe
from event_model import DocumentRouter
from event_model.documents import (
    Datum,
    EventDescriptor,
    EventPage,
    Resource,
    RunStart,
    RunStop,
    StreamDatum,
    StreamResource,
)

from .. import __version__, schema
from ..core.engine import LiveReconstruction
from ..errors import RunError
from ..files.readers import DataRoots
from ..files.results import backup_result
from ..tiled_paths import stored_probe, tiled_key
from .frames import DatumFrames, StreamFrames, per_point, stream_indices

if TYPE_CHECKING:
    from .callback import PtychoNNCallback

logger = logging.getLogger(__name__)

#: Pending rows of one kind are joined into one array up to this many rows, or beyond it once
#: MAX_CHUNKS arrays wait: few arrays to match, little copying (see ``RunReconstructor._hold``).
JOIN_ROWS = 256
MAX_CHUNKS = 8


@make_class_safe(logger=logger)
class RunReconstructor(DocumentRouter):
    """Per-run document router: decode, delegate to the live reconstruction, record.

    Parameters
    ----------
    owner : PtychoNNCallback
        The process-wide callback: model, Tiled client and configuration.
    start : RunStart
        The run's start document.

    Notes
    -----
    ``__call__`` records an exception of any handler with :meth:`fail` and re-raises it for
    bluesky's ``make_class_safe`` to log and suppress. ``event`` and ``datum_page`` are left
    undefined on purpose: event-model's router then packs an Event into an EventPage for
    :meth:`event_page` and unpacks a DatumPage into Datums for :meth:`datum`. The handlers return
    None or their document unchanged, which the router passes on; never ``NotImplemented``.
    """

    def __init__(self, owner: PtychoNNCallback, start: RunStart) -> None:
        super().__init__()
        self.owner = owner
        self.config = owner.config
        self.uid = start["uid"]
        self.start_doc = start
        self.live: LiveReconstruction | None = None
        self.active = False
        self.errors: list[str] = []
        self.roles = {self.config.frames_key: "frames", self.config.positions_key: "positions"}
        if self.config.frame_id_key:
            self.roles[self.config.frame_id_key] = "ids"
        self._descriptors: dict[str, EventDescriptor] = {}
        roots = DataRoots(self.config.data_roots)
        self._stream_frames = StreamFrames(roots, self.roles)
        self._datum_frames = DatumFrames(roots, self.roles)
        # Rows that arrived, kept as the (stream indices, rows) arrays they came in, until frame,
        # position (and id) of a point are all there.
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"frames": [], "positions": [], "ids": []}
        # StreamDatums that came before their StreamResource, by its uid: read when it comes.
        self._early: dict[str, list[Any]] = {}
        self._frames_on_disk = False
        self.stopped = False
        self._after_final_thread: threading.Thread | None = None

    def __call__(self, name: str, doc: dict, validate: bool = False) -> tuple[str, dict]:
        """Route one document to its handler; a failure is recorded here, then raised.

        Parameters
        ----------
        name : str
            The document's name (``"descriptor"``, ``"stream_datum"``, ...).
        doc : dict
            The document.
        validate : bool
            Validate the documents coming out (event-model's option; not needed here).

        Returns
        -------
        tuple of (str, dict)
            The name and the document, as event-model's routers return them.
        """
        try:
            return super().__call__(name, doc, validate)
        except Exception as err:
            cause = f" (caused by {err.__cause__!r})" if err.__cause__ is not None else ""
            self.fail(f"{name} document: {err!r}{cause}")
            raise

    def fail(self, message: str) -> None:
        """Record an error; it goes into the result's metadata when there is a result.

        Parameters
        ----------
        message : str
            What went wrong, naming the bad value.
        """
        self.errors.append(message)
        if self.live is not None:
            self.live.record_error(message)
        else:
            logger.error("run %s: %s", self.uid, message)

    # -- documents --------------------------------------------------------------------------

    def descriptor(self, doc: EventDescriptor) -> None:
        """Start the reconstruction at the first descriptor of the frames stream."""
        keys = doc.get("data_keys", {})
        if doc.get("name") != self.config.stream_name or self.config.frames_key not in keys:
            return
        if self.config.positions_key not in keys:
            self.fail(f"stream {doc.get('name')!r} has frames but no {self.config.positions_key!r} data key")
            self._record_failure()
            return
        self._descriptors[doc["uid"]] = doc
        # Frames in files can wait on disk while inference is behind; inline ones are in memory.
        self._frames_on_disk = bool(keys[self.config.frames_key].get("external"))
        self._datum_frames.descriptor(doc)
        if self.live is None:
            try:
                self._begin()
            except Exception as err:
                self.fail(f"cannot reconstruct this run: {err}")
                self._record_failure()

    def _record_failure(self) -> None:
        """Leave a ``failed`` result in Tiled that says why, so nobody waits for an image."""
        sink = self.owner.sink_for(self.uid)
        if sink is None:
            return
        try:
            sink.write_metadata(
                {
                    "raw_uid": self.uid,
                    "status": "failed",
                    "updated": time.time(),
                    "errors": self.errors,
                    "package_version": __version__,
                    "source": "live",
                }
            )
        except Exception as err:  # Tiled down as well: the log has it
            logger.error("run %s: could not record the failure in Tiled: %r", self.uid, err)

    def _begin(self) -> None:
        tiled_key(self.uid, "run uid")  # a uid that is not one Tiled key would write elsewhere: refuse it now
        predictor = self.owner.predictor
        section = schema.read_section(self.start_doc)
        geometry = schema.geometry(section)
        recipe = predictor.info.recipe
        if tuple(recipe.frame_shape) != (geometry.frame_pixels, geometry.frame_pixels):
            raise RunError(
                f"run {self.uid} has {geometry.frame_pixels}-pixel frames; the model expects {recipe.frame_shape}"
            )
        grid = schema.object_grid(
            section, recipe.pixel_size_m(geometry), predictor.patch_pixels, self.config.grid_margin_pixels
        )
        metadata = {
            "raw_uid": self.uid,
            "scan_id": self.start_doc.get("scan_id"),
            "sample_id": section.get("sample_id"),
            "package_version": __version__,
            "started": time.time(),
            "source": "live",
            "consumer": {"host": socket.gethostname(), "pid": os.getpid(), "share": str(self.config.share)},
        }
        stored = stored_probe(self.owner.client, self.config.probe_run)
        if self.config.probe_run and stored is None:
            self.fail(f"probe_run {self.config.probe_run}: no complete iterative reconstruction with a probe in Tiled")
        probe, probe_source = schema.probe_for(section, predictor.info.provenance, stored)
        self.live = LiveReconstruction(
            predictor,
            grid,
            self.owner.sink_for(self.uid),
            metadata,
            self.config.live,
            probe=probe,
            probe_source=probe_source,
        )
        if self.config.backup_dir is not None:
            self.live.fallback = partial(backup_result, self.config.backup_dir, self.uid)
        for message in self.errors:
            self.live.record_error(message)
        self.active = True
        logger.info(
            "run %s: started (sample %s, %s points), model %s on %s, grid %dx%d, trust map %s",
            self.uid[:8],
            section.get("sample_id"),
            self.start_doc.get("num_points", "?"),
            predictor.info.content_hash[:12],
            predictor.device,
            *grid.shape,
            "on" if self.live.consistency is not None else "off",
        )

    def stream_resource(self, doc: StreamResource) -> None:
        """Keep a StreamResource of the frames, positions or ids (refused if outside the data roots).

        StreamDatums that arrived before it are read now.
        """
        early = self._early.pop(doc["uid"], [])
        self._stream_frames.stream_resource(doc)  # refused: its early StreamDatums go with it
        for datum in early:
            self.stream_datum(datum)

    def stream_datum(self, doc: StreamDatum) -> None:
        """Read the rows a StreamDatum announces and match them by stream index."""
        descriptor = self._descriptors.get(doc["descriptor"])
        if descriptor is None or not self.active:
            return
        read = self._stream_frames.read(doc, descriptor)
        if read is None:
            return
        key, rows = read
        role = self.roles[key]
        self._arrive(role, stream_indices(doc), per_point(role, rows))

    def hold_early(self, doc: dict) -> bool:
        """Keep a StreamDatum whose StreamResource has not come yet (True if kept), to read it when it does."""
        if doc.get("stream_resource") in self._stream_frames.seen:
            return False
        self._early.setdefault(doc["stream_resource"], []).append(doc)
        return True

    def resource(self, doc: Resource) -> None:
        """Keep a legacy Resource for the Filler (refused if its file lies outside the data roots)."""
        self._datum_frames.resource(doc)

    def datum(self, doc: Datum) -> Datum:
        """Keep a legacy Datum for the Filler.

        Returns
        -------
        Datum
            ``doc``, unchanged (event-model types this handler, unlike most, as returning it).
        """
        self._datum_frames.datum(doc)
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        """Fill the page's external frames from their files and match its rows by stream index.

        Returns
        -------
        EventPage
            ``doc``, unchanged (the filled copy stays here; event-model types this handler as
            returning the page).
        """
        if doc["descriptor"] not in self._descriptors or not self.active:
            return doc
        page = self._datum_frames.fill(doc)
        if page is None:
            return doc
        index = np.asarray(page["seq_num"]) - 1  # the stream index of an event
        for key, role in self.roles.items():
            if key in page["data"]:
                self._arrive(role, index, per_point(role, np.asarray(page["data"][key])))
        return doc

    def stop(self, doc: RunStop) -> None:
        """Finish the reconstruction with the run's exit status and close the run's files."""
        self.stopped = True
        try:
            if self.live is None:
                return
            exit_status = doc.get("exit_status")
            status = {"success": "complete", "abort": "aborted", "fail": "failed"}.get(str(exit_status), "failed")
            reason = doc.get("reason") or ("" if exit_status else "the stop document has no exit_status")
            for resource, datums in self._early.items():
                self.fail(f"{len(datums)} StreamDatums name StreamResource {resource}, which never came")
            # The engine decides the status once its queue is drained: an image with no frame is never complete.
            self.live.finish(
                status,
                exit_status=exit_status,
                reason=reason,
                frames_pending=len(_pending_points(self._pending)),  # points with a part missing
                frames_expected=self._expected(doc),
            )
            if self.owner.after_final is not None:
                # Waiting for the final image here would hold up the RunEngine (or the dispatcher).
                self._after_final_thread = threading.Thread(
                    target=self._after_final, name=f"ptychonn-after-{self.uid[:8]}", daemon=True
                )
                self._after_final_thread.start()
        finally:
            self._stream_frames.close()
            self._datum_frames.close()

    def _expected(self, stop: RunStop) -> int | None:
        """Points the scan had: the start's ``num_points``, else the stop's event count of the stream."""
        planned = self.start_doc.get("num_points")
        if isinstance(planned, int) and planned > 0:
            return planned
        counted = (stop.get("num_events") or {}).get(self.config.stream_name)
        return counted if isinstance(counted, int) and counted > 0 else None

    def join_after_final(self, timeout: float | None = None) -> bool:
        """Wait until the ``after_final`` hook has been called (or was never due); False on timeout.

        The hook runs on its own thread once the final image is written, so a caller that waits for
        the image and then for the hook's own work (a refine worker's queue) must wait for this too,
        or it may look before the run was handed over. From the hook itself it returns at once.
        """
        thread = self._after_final_thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _after_final(self) -> None:
        """Call the owner's ``after_final`` hook once the final image is written; log, never raise."""
        hook = self.owner.after_final
        try:
            if self.live is not None and hook is not None and self.live.wait():
                hook(self.uid)
        except Exception as err:
            logger.error("run %s: the after-final hook failed: %r", self.uid, err)

    # -- frame matching ---------------------------------------------------------------------

    def _arrive(self, role: str, index: np.ndarray, rows: np.ndarray) -> None:
        """Keep rows by stream index; submit every index whose frame, position and id are all in.

        Rows stay in the arrays they came in (one per document), matched with vectorised set
        operations, never split per row: the frames of a StreamDatum and the positions of the
        same points usually meet whole and are submitted as they are, without a copy. Arrays of
        another dtype or row shape are never joined (see ``_hold``): one malformed document
        (strings, another shape) is refused on its own and cannot spoil the rows it meets.
        """
        index = np.asarray(index)
        if rows.ndim == 0 or len(rows) != len(index):
            raise ValueError(f"{len(index)} stream indices for {role} rows of shape {rows.shape}")
        self._hold(role, index, rows)
        if self.live is None:
            return
        needed = ["frames", "positions"] + (["ids"] if self.config.frame_id_key else [])
        held = [self._pending[r] for r in needed]
        taken = [[np.zeros(len(i), bool) for i, _ in chunks] for chunks in held]
        submissions = []
        for combo in itertools.product(*(range(len(chunks)) for chunks in held)):  # usually one
            complete = reduce(np.intersect1d, (held[k][j][0] for k, j in enumerate(combo)))  # sorted
            if not len(complete):
                continue
            parts = []
            for k, j in enumerate(combo):
                index, rows = held[k][j]
                order = np.argsort(index, kind="stable")
                parts.append(_select(rows, order[np.searchsorted(index, complete, sorter=order)]))
                taken[k][j] |= np.isin(index, complete)
            submissions.append((complete, parts))
        for k, r in enumerate(needed):
            rest = [(i, x, np.flatnonzero(~t)) for (i, x), t in zip(held[k], taken[k], strict=True)]
            self._pending[r] = [(_select(i, keep), _select(x, keep)) for i, x, keep in rest if len(keep)]
        for complete, (frames, positions, *ids) in submissions:
            # Runs on the callback's intake thread: waiting for room holds up only the reading of files.
            self.live.submit(ids[0] if ids else complete, frames, positions, wait=self._frames_on_disk)

    def _hold(self, role: str, index: np.ndarray, rows: np.ndarray) -> None:
        """Add rows to the pending ones of ``role``, joined to the last array where that cannot change them.

        Only arrays of the same dtype and row shape are joined (no promotion: a string array would
        turn numbers into strings). Small ones are, so that points sent one Event at a time do not
        pile up as thousands of arrays; large ones stay as they came unless many are waiting.
        """
        chunks = self._pending[role]
        if chunks:
            last_index, last = chunks[-1]
            if (
                last.dtype == rows.dtype
                and last.shape[1:] == rows.shape[1:]
                and (len(last) + len(rows) <= JOIN_ROWS or len(chunks) >= MAX_CHUNKS)
            ):
                chunks[-1] = (np.concatenate([last_index, index]), np.concatenate([last, rows]))
                return
        chunks.append((index, rows))


def _select(rows: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """``rows[picks]``, as a view where the picks are one ascending run (rows consumed in order: no copy)."""
    if len(picks) and np.all(np.diff(picks) == 1):
        return rows[picks[0] : picks[-1] + 1]
    return rows[picks]


def _pending_points(pending: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> np.ndarray:
    """Stream indices with some but not all of their rows in."""
    indices = [index for chunks in pending.values() for index, _ in chunks]
    return np.unique(np.concatenate(indices)) if indices else np.empty(0, np.int64)
