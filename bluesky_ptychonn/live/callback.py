"""The live Bluesky callback: route a run's documents to a :class:`~bluesky_ptychonn.core.engine.LiveReconstruction`.

Subscribing is one line::

    RE.subscribe(PtychoNNCallback.from_checkpoint("model.safetensors", tiled_client, data_roots=["/data"]))

One :class:`PtychoNNCallback` per process holds the loaded model; a ``RunRouter`` factory makes
one :class:`RunReconstructor` per run. Runs without the configured frame and position data keys
are ignored after their descriptor. Frames come from StreamResource/StreamDatum (HDF5, SWMR,
only inside the data roots), from legacy Resource/Datum, or inline in Event/EventPage; they are
matched to positions by frame id, never by arrival order.

Failure policy: every document handler is guarded. An exception is logged and recorded in the
result's metadata; the RunEngine never sees it (bluesky aborts a run when a callback raises).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import numpy as np
from event_model import DocumentRouter, RunRouter
from pydantic import Field

from .. import __version__, schema
from ..core.config import Frozen
from ..core.engine import LiveOptions, LiveReconstruction
from ..core.geometry import GRID_MARGIN_PIXELS
from ..errors import RunError
from ..files.readers import DataRoots, HDF5Reader

logger = logging.getLogger(__name__)


class CallbackConfig(Frozen):
    """Which documents carry the frames, where files may be read, and the live policy."""

    frames_key: str = Field(schema.FRAMES_KEY, description="Data key of the diffraction frames.")
    positions_key: str = Field(schema.POSITIONS_KEY, description="Data key of (y, x) positions in metres, shape (2,).")
    frame_id_key: str | None = Field(
        schema.FRAME_ID_KEY, description="Data key of frame ids; None uses the stream index."
    )
    stream_name: str = Field(schema.STREAM_NAME, description="Event stream holding the frames.")
    data_roots: tuple[Path, ...] = Field((), description="Folders whose files documents may name.")
    grid_margin_pixels: int = Field(
        GRID_MARGIN_PIXELS, ge=0, description="Object-grid margin beyond the scan extent (jitter, noise)."
    )
    live: LiveOptions = Field(default_factory=LiveOptions, description="Batching, cadence and retry policy.")


def _guarded(method: Callable) -> Callable:
    """Log and record any exception of a document handler instead of raising it."""

    @wraps(method)
    def guarded(self: RunReconstructor, doc: dict) -> Any:
        try:
            return method(self, doc)
        except Exception as err:
            self.fail(f"{method.__name__} document: {err!r}")
            return None

    return guarded


class RunReconstructor(DocumentRouter):
    """Per-run document router: decode, delegate to the live reconstruction, record."""

    def __init__(self, owner: PtychoNNCallback, start: dict) -> None:
        super().__init__()
        self.owner = owner
        self.config = owner.config
        self.uid = start["uid"]
        self.start_doc = start
        self.live: LiveReconstruction | None = None
        self.active = False
        self.errors: list[str] = []
        self._descriptors: set[str] = set()
        self._stream_resources: dict[str, dict] = {}
        self._resources: dict[str, dict] = {}
        self._datums: dict[str, dict] = {}
        self._reader = HDF5Reader(DataRoots(self.config.data_roots))
        # Rows that arrived per frame index, until frame, position (and id) are all there.
        self._pending: dict[str, dict[int, Any]] = {"frames": {}, "positions": {}, "ids": {}}

    def fail(self, message: str) -> None:
        """Record an error; it goes into the result's metadata when there is a result."""
        self.errors.append(message)
        if self.live is not None:
            self.live.record_error(message)
        else:
            logger.error("run %s: %s", self.uid, message)

    # -- documents --------------------------------------------------------------------------

    @_guarded
    def descriptor(self, doc: dict) -> None:
        keys = doc.get("data_keys", {})
        if doc.get("name") != self.config.stream_name or self.config.frames_key not in keys:
            return
        if self.config.positions_key not in keys:
            self.fail(f"stream {doc.get('name')!r} has frames but no {self.config.positions_key!r} data key")
            return
        self._descriptors.add(doc["uid"])
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
            sink.record_failure(
                {
                    "raw_uid": self.uid,
                    "status": "failed",
                    "errors": self.errors,
                    "package_version": __version__,
                    "source": "live",
                }
            )
        except Exception as err:  # Tiled down as well: the log has it
            logger.error("run %s: could not record the failure in Tiled: %r", self.uid, err)

    def _begin(self) -> None:
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
        }
        self.live = LiveReconstruction(predictor, grid, self.owner.sink_for(self.uid), metadata, self.config.live)
        for message in self.errors:
            self.live.record_error(message)
        self.active = True

    @_guarded
    def stream_resource(self, doc: dict) -> None:
        if doc.get("data_key") in self._roles():
            self._stream_resources[doc["uid"]] = doc

    @_guarded
    def stream_datum(self, doc: dict) -> None:
        resource = self._stream_resources.get(doc["stream_resource"])
        if resource is None or not self.active:
            return
        start, stop = doc["indices"]["start"], doc["indices"]["stop"]
        rows = self._reader.read(resource["uri"], resource["parameters"]["dataset"], start, stop)
        self._arrive(self._roles()[resource["data_key"]], np.arange(start, stop), rows)

    @_guarded
    def resource(self, doc: dict) -> None:
        self._resources[doc["uid"]] = doc

    @_guarded
    def datum(self, doc: dict) -> None:
        self._datums[doc["datum_id"]] = doc

    @_guarded
    def datum_page(self, doc: dict) -> None:
        for i, datum_id in enumerate(doc["datum_id"]):
            self._datums[datum_id] = {
                "datum_id": datum_id,
                "resource": doc["resource"],
                "datum_kwargs": {k: v[i] for k, v in doc["datum_kwargs"].items()},
            }

    @_guarded
    def event_page(self, doc: dict) -> None:
        if doc["descriptor"] not in self._descriptors or not self.active:
            return
        seq = np.asarray(doc["seq_num"])
        index = seq - 1  # the stream index of an event
        for key, role in self._roles().items():
            if key not in doc["data"]:
                continue
            values = doc["data"][key]
            filled = doc.get("filled", {}).get(key, True)
            if isinstance(filled, list):
                filled = all(filled)
            rows = (
                self._resolve_datums(values) if not filled or (len(values) and isinstance(values[0], str)) else values
            )
            self._arrive(role, index, np.asarray(rows))

    @_guarded
    def event(self, doc: dict) -> None:
        # Events are rare here (one per frame caps a scan near 1 kHz) but accepted.
        page = {
            k: [v] if k not in ("data", "timestamps", "filled") else {kk: [vv] for kk, vv in v.items()}
            for k, v in doc.items()
            if k != "descriptor"
        }
        page["descriptor"] = doc["descriptor"]
        self.event_page(page)

    @_guarded
    def stop(self, doc: dict) -> None:
        self._reader.close()
        if self.live is None:
            return
        status = {"success": "complete", "abort": "aborted", "fail": "failed"}.get(
            str(doc.get("exit_status")), "failed"
        )
        if self.errors and status == "complete" and self.live.metadata["frames_done"] == 0:
            status = "failed"
        self.live.finish(
            status,
            exit_status=doc.get("exit_status"),
            reason=doc.get("reason", ""),
            frames_pending=sum(len(v) for v in self._pending.values()),
        )

    # -- frame matching ---------------------------------------------------------------------

    def _roles(self) -> dict[str, str]:
        roles = {self.config.frames_key: "frames", self.config.positions_key: "positions"}
        if self.config.frame_id_key:
            roles[self.config.frame_id_key] = "ids"
        return roles

    def _resolve_datums(self, datum_ids: list[str]) -> np.ndarray:
        """Legacy Resource/Datum: read each datum's frame from its resource's HDF5 file."""
        rows = []
        for datum_id in datum_ids:
            datum = self._datums[datum_id]
            resource = self._resources[datum["resource"]]
            path = str(Path(resource.get("root", "/")) / resource["resource_path"])
            dataset = resource.get("resource_kwargs", {}).get("dataset", "/entry/data/data")
            point = int(datum["datum_kwargs"].get("point_number", datum["datum_kwargs"].get("index", 0)))
            rows.append(self._reader.read(path, dataset, point, point + 1)[0])
        return np.stack(rows)

    def _arrive(self, role: str, index: np.ndarray, rows: np.ndarray) -> None:
        """Store rows by stream index; submit every index whose frame, position and id are all in."""
        store = self._pending[role]
        for i, row in zip(index.tolist(), rows, strict=True):
            store[i] = row
        needed = ["frames", "positions"] + (["ids"] if self.config.frame_id_key else [])
        complete = sorted(set.intersection(*(set(self._pending[r]) for r in needed)))
        if not complete or self.live is None:
            return
        frames = np.stack([self._pending["frames"].pop(i) for i in complete])
        positions = np.stack([self._pending["positions"].pop(i) for i in complete])
        ids = (
            np.array([self._pending["ids"].pop(i) for i in complete])
            if self.config.frame_id_key
            else np.array(complete)
        )
        self.live.submit(ids, frames, positions)


class PtychoNNCallback:
    """Subscribe this to a RunEngine (or a 0MQ ``RemoteDispatcher``): one model, one reconstructor per run.

    Parameters
    ----------
    predictor : bluesky_ptychonn.core.inference.Predictor
        The loaded model, shared by every run of the process.
    client : tiled.client.container.Container or None
        Tiled root to write ``processed/<uid>/ptychonn`` into (None: keep results in memory only).
    config : CallbackConfig
    """

    def __init__(self, predictor: Any, client: Any, config: CallbackConfig | None = None) -> None:
        self.predictor = predictor
        self.client = client
        self.config = config or CallbackConfig()
        self.runs: dict[str, RunReconstructor] = {}
        self._router = RunRouter([self._factory])
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, client: Any, *, device: str = "auto", **config: Any
    ) -> PtychoNNCallback:
        """Load a checkpoint (validated, never unpickled) and build the callback."""
        from ..core.inference import Predictor

        return cls(Predictor.from_checkpoint(checkpoint, device=device), client, CallbackConfig(**config))

    def sink_for(self, uid: str) -> Any:
        """The Tiled sink of one run (None without a client)."""
        if self.client is None:
            return None
        from .sink import TiledSink

        return TiledSink(self.client, uid)

    def set_predictor(self, predictor: Any) -> None:
        """Use a new model from the next run on (runs in progress keep theirs)."""
        self.predictor = predictor

    def _factory(self, name: str, start: dict) -> tuple[list, list]:
        run = RunReconstructor(self, start)
        self.runs[start["uid"]] = run
        return [run], []

    def __call__(self, name: str, doc: dict) -> None:
        """Route one document; never raises (a malformed or out-of-order document is logged)."""
        try:
            with self._lock:
                self._router(name, doc)
        except Exception as err:
            uid = doc.get("run_start") or doc.get("uid") if isinstance(doc, dict) else None
            run = self.runs.get(uid) if isinstance(uid, str) else None
            message = f"could not route a {name!r} document: {err!r}"
            if run is not None:
                run.fail(message)
            else:
                logger.error(message)

    def wait(self, uid: str, timeout: float | None = None) -> bool:
        """Block until run ``uid``'s final image is written; True if it was."""
        run = self.runs.get(uid)
        return bool(run and run.live and run.live.wait(timeout))
