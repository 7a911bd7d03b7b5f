"""The live Bluesky callback: route a run's documents to a :class:`~bluesky_ptychonn.core.engine.LiveReconstruction`.

Subscribing is one line::

    RE.subscribe(PtychoNNCallback.from_checkpoint("model.safetensors", tiled_client, data_roots=["/data"]))

One :class:`PtychoNNCallback` per process holds the loaded model; a ``RunRouter`` factory makes
one :class:`RunReconstructor` per run, an event-model ``DocumentRouter`` (which packs Events into
EventPages and unpacks DatumPages into Datums for it). Runs without the configured frame and
position data keys are ignored after their descriptor. Frames come from StreamResource/StreamDatum
or legacy Resource/Datum (read as :mod:`~bluesky_ptychonn.live.frames` describes, only inside the
data roots), or inline in Event/EventPage; they are matched to positions by stream index and frame
id, never by arrival order.

The RunEngine's thread only queues each document: reading frames from HDF5, loading a stored
probe and writing to Tiled all happen on the callback's intake thread, in document order, so a
slow file system or a slow Tiled never stalls the scan. Frames read from files wait on disk while
inference is behind (never skipped); inline frames beyond ``max_queued_frames`` are skipped and
listed (:class:`~bluesky_ptychonn.core.engine.LiveOptions`).

Failure policy: an exception in any document handler is recorded in the result's metadata and
logged with its traceback; the RunEngine never sees it (bluesky aborts a run when a callback raises)
unless ``BLUESKY_DEBUG_CALLBACKS`` is set, bluesky's debugging switch.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bluesky.callbacks.core import make_class_safe
from event_model import RunRouter
from event_model.documents import RunStart

from ..tiled_paths import PROCESSED, PTYCHONN, RAW, tiled_key
from .config import CallbackConfig
from .run import RunReconstructor
from .sink import TiledSink

logger = logging.getLogger(__name__)


#: Finished runs a callback remembers (for ``wait`` and inspection); older ones are released.
KEEP_FINISHED = 4
#: Uids (runs, descriptors, resources) of other consumers' runs remembered, to ignore their documents.
KEEP_OTHERS = 10_000


@make_class_safe(logger=logger)
class PtychoNNCallback:
    """Subscribe this to a RunEngine (or a 0MQ ``RemoteDispatcher``): one model, one reconstructor per run.

    Parameters
    ----------
    predictor : bluesky_ptychonn.core.inference.Predictor
        The loaded model, shared by every run of the process.
    client : tiled.client.container.Container or None
        Tiled root to write ``processed/<uid>/ptychonn`` into (None: keep results in memory only).
    config : CallbackConfig
        Data keys, data roots and the live policy (defaults: :class:`CallbackConfig`).
    after_final : callable, optional
        Called with a run's uid on a background thread once its final image is written (never on
        the RunEngine's thread), e.g. :meth:`~bluesky_ptychonn.archive.refine_worker.RefineWorker.submit`
        to refine every run with pty-chi; it should return quickly. Its exceptions are logged.

    Notes
    -----
    A document that cannot even be routed (no run, not a document) is recorded in its run when
    there is one, then logged and suppressed by bluesky's ``make_class_safe``, like a failure in
    a run's own handlers.
    """

    def __init__(
        self,
        predictor: Any,
        client: Any,
        config: CallbackConfig | None = None,
        *,
        after_final: Callable[[str], None] | None = None,
    ) -> None:
        self.predictor = predictor
        self.client = client
        self.config = config or CallbackConfig()
        self.after_final = after_final
        self.runs: dict[str, RunReconstructor] = {}
        self._router = RunRouter([self._factory])
        self._lock = threading.Lock()
        self._intake: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # documents taken from the RunEngine, not yet routed
        self._idle = threading.Condition()
        self._intake_thread: threading.Thread | None = None
        self._descriptor_runs: dict[str, str] = {}  # descriptor uid -> run uid, of the runs routed
        self._missed: dict[str, str] = {}  # descriptor uid -> run uid ("?" if unknown), of runs whose start was missed
        self._others: OrderedDict[str, None] = OrderedDict()  # uids of runs in another consumer's share

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        client: Any,
        *,
        device: str = "auto",
        compile: bool = False,
        after_final: Callable[[str], None] | None = None,
        **config: Any,
    ) -> PtychoNNCallback:
        """Load a checkpoint (validated, never unpickled) and build the callback.

        Parameters
        ----------
        checkpoint : str or Path
            The safetensors checkpoint.
        client : tiled.client.container.Container or None
            Where results go (None: in memory only).
        device : str
            ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        compile : bool
            Run the network as a compiled graph, built here (see
            :class:`~bluesky_ptychonn.core.inference.Predictor`): seconds once, then every run of the
            session is faster.
        after_final : callable, optional
            See the class.
        **config
            Fields of :class:`CallbackConfig`.
        """
        from ..core.inference import Predictor

        return cls(
            Predictor.from_checkpoint(checkpoint, device=device, compile=compile),
            client,
            CallbackConfig(**config),
            after_final=after_final,
        )

    def sink_for(self, uid: str) -> Any:
        """The Tiled sink of run ``uid``'s result (None without a client).

        Parameters
        ----------
        uid : str
            The raw run's uid.
        """
        if self.client is None:
            return None
        return TiledSink(self.client, uid)

    def set_predictor(self, predictor: Any) -> None:
        """Use a new model from the next run on (runs in progress keep theirs).

        Parameters
        ----------
        predictor : bluesky_ptychonn.core.inference.Predictor
            The new model.
        """
        self.predictor = predictor

    def _factory(self, name: str, start: RunStart) -> tuple[list, list]:
        run = RunReconstructor(self, start)
        self.runs[start["uid"]] = run
        self._release_finished()
        return [run], []

    def _release_finished(self) -> None:
        """Forget all but the last ``KEEP_FINISHED`` finished runs, so a long-lived consumer stays flat.

        A finished run holds its image and the model it ran with (a hot-swapped one included).
        """
        done = [uid for uid, run in self.runs.items() if run.stopped and (run.live is None or run.live.done)]
        released = set(done[: max(0, len(done) - KEEP_FINISHED)])
        for uid in released:
            del self.runs[uid]
        self._descriptor_runs = {d: r for d, r in self._descriptor_runs.items() if r not in released}

    def __call__(self, name: str, doc: dict) -> None:
        """Queue one document for the intake thread and return at once (the RunEngine's thread is never held).

        Parameters
        ----------
        name : str
            The document's name, as the RunEngine emits it.
        doc : dict
            The document.

        Notes
        -----
        With ``BLUESKY_DEBUG_CALLBACKS`` set (bluesky's debugging switch) the document is routed
        at once in the caller's thread, so a handler's exception reaches the caller.
        """
        if os.environ.get("BLUESKY_DEBUG_CALLBACKS"):
            self.flush()
            self.route(name, doc)
            return
        with self._idle:
            self._queued += 1
            if self._intake_thread is None:
                self._intake_thread = threading.Thread(target=self._drain, name="ptychonn-intake", daemon=True)
                self._intake_thread.start()
        self._intake.put((name, doc))

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every document queued so far is routed; True if it was within ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._queued == 0, timeout)

    def _drain(self) -> None:
        while True:
            name, doc = self._intake.get()
            try:
                self.route(name, doc)
            except Exception:  # recorded in its run by route(); the intake goes on with the next document
                logger.exception("could not route a %r document", name)
            finally:
                with self._idle:
                    self._queued -= 1
                    if self._queued == 0:
                        self._idle.notify_all()

    def route(self, name: str, doc: dict) -> None:
        """Route one document now, in the caller's thread; a malformed or out-of-order one is recorded, then raised."""
        try:
            with self._lock:
                run = self._run_of(doc) if name == "stream_datum" else None
                if run is not None and run.hold_early(doc):  # the router would refuse it: no StreamResource yet
                    return
                if self._of_another_share(name, doc) or self._of_a_missed_run(name, doc):
                    return
                self._router(name, doc)
                if name == "descriptor":
                    self._descriptor_runs[doc["uid"]] = doc["run_start"]
        except Exception as err:
            run = self._run_of(doc)
            if run is not None:
                run.fail(f"could not route a {name!r} document: {err!r}")
            raise

    def _of_another_share(self, name: str, doc: Any) -> bool:
        """True for a document of a run that another consumer on the proxy takes (``[share]``); ignored."""
        share = self.config.share
        if share.by == "all" or not isinstance(doc, dict):
            return False
        if name == "start":
            if share.takes(doc):
                return False
            logger.info("run %s is not in this consumer's share (%s): left to another", doc.get("uid"), share)
            self._remember_other(doc.get("uid"))
            return True
        owner = doc.get("run_start") or doc.get("descriptor") or doc.get("resource") or doc.get("stream_resource")
        if owner not in self._others:
            if not isinstance(doc.get("run_start"), str) or share.takes_uid(doc["run_start"]) is not False:
                return False
            self._remember_other(owner)  # a run whose start this consumer missed, by its uid another's
        if name in ("descriptor", "resource", "stream_resource"):
            self._remember_other(doc.get("uid"))
        return True

    def _remember_other(self, uid: Any) -> None:
        self._others[str(uid)] = None
        while len(self._others) > KEEP_OTHERS:
            self._others.popitem(last=False)

    def _of_a_missed_run(self, name: str, doc: Any) -> bool:
        """True for a document of a run whose start this consumer never saw (it started, or restarted, mid-run).

        Such a run is not ignored silently: its result is marked ``interrupted`` with the command
        that reconstructs it from the archive, at its frames descriptor when that comes, or at its
        stop when an earlier consumer left its result ``running`` (killed mid-run).
        """
        if not isinstance(doc, dict):
            return False
        run_uid, descriptor = doc.get("run_start"), doc.get("descriptor")
        if isinstance(run_uid, str) and name in ("descriptor", "stop", "stream_resource", "resource"):
            if run_uid in self.runs:
                return False
            if name == "descriptor":
                self._missed[str(doc.get("uid"))] = run_uid
                keys = doc.get("data_keys") or {}
                if doc.get("name") == self.config.stream_name and self.config.frames_key in keys:
                    self._mark_missed(run_uid, only_if_running=False)
            elif name == "stop":
                self._mark_missed(run_uid, only_if_running=True)
            return True
        if name in ("event", "event_page", "stream_datum") and isinstance(descriptor, str):
            if descriptor in self._descriptor_runs:
                return False
            if descriptor not in self._missed:
                logger.warning("documents of descriptor %s, of a run whose start was missed: ignored", descriptor)
                self._missed[descriptor] = "?"
            return True
        return False

    def _mark_missed(self, uid: str, *, only_if_running: bool) -> None:
        if not self._in_share(uid):
            return  # another consumer's run: that one reports it
        reason = f"this consumer started after run {uid} began; reconstruct it with: bluesky-ptychonn replay {uid}"
        logger.warning(reason)
        if self.client is None:
            return
        try:
            tiled_key(uid, "run uid")
            if only_if_running:
                processed = self.client[PROCESSED] if PROCESSED in self.client else {}
                results = processed[uid] if uid in processed else {}
                if PTYCHONN not in results or results[PTYCHONN].metadata.get("status") != "running":
                    return
            metadata = {"raw_uid": uid, "status": "interrupted", "reason": reason, "source": "live"}
            TiledSink(self.client, uid).write_metadata({**metadata, "updated": time.time()})
        except Exception as err:
            logger.error("run %s: could not record the missed start in Tiled: %r", uid, err)

    def _in_share(self, uid: str) -> bool:
        """Whether a run whose start was missed is this consumer's; a share by beamline or plan reads the
        archived start (a run Tiled does not hold yet counts as another's: its owner reports it)."""
        mine = self.config.share.takes_uid(uid)
        if mine is not None:
            return mine
        try:
            return self.config.share.takes(self.client[RAW][uid].metadata["start"])
        except Exception as err:
            logger.info("run %s: its start is not in Tiled (%r), so its share is unknown", uid, err)
            return False

    def _run_of(self, doc: Any) -> RunReconstructor | None:
        """The run a document belongs to, by its start uid or its descriptor (None if unknown)."""
        if not isinstance(doc, dict):
            return None
        uid = doc.get("run_start") or doc.get("uid")
        if isinstance(uid, str) and uid in self.runs:
            return self.runs[uid]
        descriptor = doc.get("descriptor")
        return next((r for r in self.runs.values() if descriptor in r._descriptors), None)

    def interrupt(self, reason: str, timeout: float = 30.0) -> list[str]:
        """Finish every run still open as ``interrupted`` with its partial image; return their uids.

        For a consumer that is stopping (SIGTERM, Ctrl-C): the documents already received are
        routed and their frames reconstructed and written before it exits, so no result is left
        ``running``. Waits at most ``timeout`` seconds in all.
        """
        deadline = time.monotonic() + timeout
        if not self.flush(timeout / 2):
            logger.error("documents still queued at exit were not routed")
        with self._lock:
            open_runs = [r for r in self.runs.values() if r.live is not None and not r.stopped]
            for run in open_runs:
                run.stopped = True
                run.live.finish("interrupted", reason=reason)  # type: ignore[union-attr]
        for run in open_runs:
            if not run.live.wait(max(0.0, deadline - time.monotonic())):  # type: ignore[union-attr]
                logger.error("run %s: the interrupted image could not be written to Tiled before exit", run.uid)
                run.live.keep_unwritten()  # type: ignore[union-attr]  # to backup_dir, when there is one
        return [r.uid for r in open_runs]

    def wait(self, uid: str, timeout: float | None = None) -> bool:
        """Block until run ``uid``'s final image is written and handed to the ``after_final`` hook.

        Parameters
        ----------
        uid : str
            The raw run's uid.
        timeout : float or None
            Seconds to wait at most (None: no limit).

        Returns
        -------
        bool
            True if the final image was written (and the hook, if any, called).
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        self.flush(timeout)
        run = self.runs.get(uid)
        # The hook (a refine worker's submit) runs on a thread of its own once the image is final: a
        # caller that goes on to wait for the hook's work must find the run handed over already. That
        # thread is started as the stop document is routed, which the flush above covers once the
        # stop has been given to the callback (a wait begun before the stop came may not see it).
        return bool(run and run.live and run.live.wait(left()) and run.join_after_final(left()))
