"""Automatic refinement: every run whose live image is final is refined with pty-chi, off the RunEngine's path.

:class:`RefineWorker` is what the live callback's ``after_final`` hook calls (the command line and
the demo wire it; the live layer may not import this one). It refines one run at a time on its own
thread and records every failure in the run's ``processed/<uid>/refined`` instead of raising it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from ..core.refine import RUN_ARRIVAL_TIMEOUT_S
from ..errors import ConfigurationError, RunError
from ..tiled_paths import RAW
from .refine import SeedSource, execute_refinement, plan_refinement, record_refine_failure

if TYPE_CHECKING:
    from ..core.inference import Predictor
    from ..core.iterative import IterativeOptions

logger = logging.getLogger(__name__)


class RefineWorker:
    """Refines runs one at a time on a background thread, off the RunEngine's and the live callback's path.

    Give :meth:`submit` to :class:`~bluesky_ptychonn.live.callback.PtychoNNCallback` as its
    ``after_final`` hook: once a run's live image is final, the worker waits (at most
    ``run_timeout_s``) for the raw run to be in Tiled with its stop document, then calls
    :func:`refine_run`. Failures are logged and recorded in the refined result, never raised.

    Parameters
    ----------
    client : tiled Container
        The server's root, with a key that may write.
    options : IterativeOptions, optional
        Passed to :func:`refine_run` (default its refinement options).
    seed, predictor, refine_probe
        As for :func:`refine_run`.
    run_timeout_s : float
        Longest wait for the raw run and its stop document.
    poll_s : float
        Pause between looks for the raw run.
    """

    def __init__(
        self,
        client: Any,
        *,
        options: IterativeOptions | None = None,
        seed: SeedSource = "ptychonn",
        predictor: Predictor | None = None,
        refine_probe: bool | None = None,
        run_timeout_s: float = RUN_ARRIVAL_TIMEOUT_S,
        poll_s: float = 0.5,
    ) -> None:
        if run_timeout_s < 0 or poll_s <= 0:
            raise ConfigurationError(f"run_timeout_s must be >= 0 and poll_s > 0, got {run_timeout_s}, {poll_s}")
        self.client = client
        self.kwargs: dict[str, Any] = {
            "options": options,
            "seed": seed,
            "predictor": predictor,
            "refine_probe": refine_probe,
        }
        self.run_timeout_s, self.poll_s = run_timeout_s, poll_s
        #: Outcome per uid: the written metadata, or ``{"status": "failed", "errors": [...]}``.
        self.results: dict[str, dict[str, Any]] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, name="ptychonn-refine", daemon=True)
        self._thread.start()

    def submit(self, uid: str) -> None:
        """Queue run ``uid`` for refinement; returns at once."""
        with self._idle:
            self._pending += 1
        self._queue.put(uid)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted run is refined or has failed; True if none is left."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop after the run in progress (queued runs are dropped, and logged); waits up to ``timeout``."""
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (uid := self._queue.get()) is not None:
            try:
                if self._closing.is_set():
                    logger.warning("run %s: refinement dropped, the worker is closing", uid)
                else:
                    self.results[uid] = self._refine(uid)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _refine(self, uid: str) -> dict[str, Any]:
        """Refine one run; any failure is logged and recorded, and returned as the outcome."""
        try:
            plan = plan_refinement(self._wait_for_run(uid), self.client, photons_per_frame=None, **self.kwargs)
        except Exception as err:
            logger.error("run %s: refinement could not start: %s", uid, err)
            try:
                record_refine_failure(self.client, uid, f"{err!r}")
            except Exception as tiled_err:
                logger.error("run %s: could not record the failed refinement in Tiled: %r", uid, tiled_err)
            return {"raw_uid": uid, "status": "failed", "errors": [f"{err!r}"]}
        try:
            return execute_refinement(plan, self.client, progress=False)
        except Exception as err:  # already recorded in the result by _execute
            logger.error("run %s: refinement failed: %r", uid, err)
            return {"raw_uid": uid, "status": "failed", "errors": [f"{err!r}"]}

    def _wait_for_run(self, uid: str) -> Any:
        """The raw run once Tiled has its stop document (the archive writer may lag the live callback)."""
        deadline = time.monotonic() + self.run_timeout_s
        while True:
            try:
                run = self.client[RAW][uid]  # looked up afresh: a node's metadata is a snapshot
                if run.metadata.get("stop"):
                    return run
            except KeyError:
                pass
            if time.monotonic() >= deadline:
                raise RunError(f"run {uid} did not reach Tiled with its stop document within {self.run_timeout_s} s")
            if self._closing.wait(self.poll_s):
                raise RunError(f"run {uid}: the refine worker closed while waiting for the run")
