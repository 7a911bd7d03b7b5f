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

Failure policy: an exception in any document handler is recorded in the result's metadata, then
logged and suppressed by bluesky's ``make_class_safe``; the RunEngine never sees it (bluesky aborts
a run when a callback raises) unless ``BLUESKY_DEBUG_CALLBACKS`` is set, bluesky's debugging switch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bluesky.callbacks.core import make_class_safe
from event_model import RunRouter
from event_model.documents import RunStart

from .config import CallbackConfig
from .run import RunReconstructor

logger = logging.getLogger(__name__)


#: Finished runs a callback remembers (for ``wait`` and inspection); older ones are released.
KEEP_FINISHED = 4


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

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        client: Any,
        *,
        device: str = "auto",
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
        after_final : callable, optional
            See the class.
        **config
            Fields of :class:`CallbackConfig`.
        """
        from ..core.inference import Predictor

        return cls(
            Predictor.from_checkpoint(checkpoint, device=device),
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
        from .sink import TiledSink

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
        for uid in done[: max(0, len(done) - KEEP_FINISHED)]:
            del self.runs[uid]

    def __call__(self, name: str, doc: dict) -> None:
        """Route one document; a malformed or out-of-order one is recorded and logged, never raised.

        Parameters
        ----------
        name : str
            The document's name, as the RunEngine emits it.
        doc : dict
            The document.
        """
        try:
            with self._lock:
                run = self._run_of(doc) if name == "stream_datum" else None
                if run is not None and run.hold_early(doc):  # the router would refuse it: no StreamResource yet
                    return
                self._router(name, doc)
        except Exception as err:
            run = self._run_of(doc)
            if run is not None:
                run.fail(f"could not route a {name!r} document: {err!r}")
            raise

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

        For a consumer that is stopping (SIGTERM, Ctrl-C): the frames already received are
        reconstructed and written before it exits, so no result is left ``running``. Waits at most
        ``timeout`` seconds in all for the writes.
        """
        with self._lock:
            open_runs = [r for r in self.runs.values() if r.live is not None and not r.stopped]
            for run in open_runs:
                run.stopped = True
                run.live.finish("interrupted", reason=reason)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        for run in open_runs:
            if not run.live.wait(max(0.0, deadline - time.monotonic())):  # type: ignore[union-attr]
                logger.error("run %s: the interrupted image could not be written before exit", run.uid)
        return [r.uid for r in open_runs]

    def wait(self, uid: str, timeout: float | None = None) -> bool:
        """Block until run ``uid``'s final image is written.

        Parameters
        ----------
        uid : str
            The raw run's uid.
        timeout : float or None
            Seconds to wait at most (None: no limit).

        Returns
        -------
        bool
            True if the final image was written.
        """
        run = self.runs.get(uid)
        return bool(run and run.live and run.live.wait(timeout))
