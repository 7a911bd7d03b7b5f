"""The publisher side of a live reconstruction: snapshots to the sink at a cadence, retries, the backup.

A mixin of :class:`~bluesky_ptychonn.core.engine.LiveReconstruction`, kept apart so that each file
reads as one thread's work: the engine's worker makes the image, this thread ships it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .faults import permanent_error
from .stitching import StitchedImage

logger = logging.getLogger("bluesky_ptychonn.core.engine")  # one logger for the run's threads

#: How often a publisher held back by a queue of frames looks whether the model has caught up.
QUEUE_POLL_S = 0.05


class Publishing:
    """Publishing of :class:`LiveReconstruction`'s snapshots; expects its attributes (sink, stitcher, lock, ...)."""

    # Set by LiveReconstruction.__init__ (declared here for the type checker).
    sink: Any
    fallback: Any
    options: Any
    metadata: dict[str, Any]
    timings: dict[str, float]
    publish_log: list[tuple[float, int]]
    stitcher: Any
    consistency: Any
    _lock: threading.Lock
    _queued: int
    _dirty: threading.Event
    _finished: threading.Event
    _published_final: threading.Event
    _sink_has_image: bool
    _permanent: str | None
    _first_frame: float | None

    def _prepare_sink(self) -> None:
        """Let the sink create the result before the first image (see ``TiledSink.prepare``); best effort."""
        prepare = getattr(self.sink, "prepare", None)
        if prepare is None:
            return
        with self._lock:
            metadata = dict(self.metadata)
        try:
            prepare(self.stitcher.grid.shape, trust=self.consistency is not None, metadata=metadata)
            self._sink_has_image = True  # the empty arrays hold the empty image: blocks patch in from here
        except Exception as err:  # the first publish retries it all
            logger.warning("run %s: could not prepare the result (%r)", self.metadata.get("raw_uid"), err)

    def _publish_loop(self) -> None:
        delay = self.options.retry_s
        give_up_at: float | None = None
        progress_at = time.monotonic() + self.options.progress_s
        self._prepare_sink()
        while True:
            tick = time.monotonic()
            finished = self._finished.is_set()
            if finished and give_up_at is None:
                give_up_at = time.monotonic() + self.options.final_retry_s
            publishing = self._dirty.is_set() or finished
            if publishing:
                self._dirty.clear()
                if self._publish():
                    delay = self.options.retry_s
                    if finished:
                        self._published_final.set()
                        self._log_final()
                        return
                    progress_at = self._log_progress(progress_at)
                else:
                    self._dirty.set()
                    if self._permanent:  # a wrong key stays wrong: one clear line, no 10 minutes of retries
                        logger.error("run %s: %s", self.metadata.get("raw_uid"), self._permanent)
                        if finished:
                            self.keep_unwritten()
                        return
                    if give_up_at is not None and time.monotonic() > give_up_at:
                        logger.error("run %s: gave up writing the final image", self.metadata.get("raw_uid"))
                        self.keep_unwritten()
                        return
                    time.sleep(delay)
                    delay = min(30.0, delay * 2)
                    continue
            if publishing:
                self._space(tick, time.monotonic() - tick)
            self._dirty.wait()  # a batch, an error, a skip or the run's end (set by _conclude) wakes it

    def _space(self, tick: float, took: float) -> None:
        """Wait for the next publish's turn: one cadence after this one started, and later while the model is behind.

        While frames queue for the model, publishing (and the Tiled server, often on the same cores)
        takes at most ``publish_share_behind`` of the time, so a slow server cannot starve
        inference; but only as long as the queue lasts. On a paced scan frames queue during every
        publish of a second or more; the next publish now follows once the model has caught up, not
        ten publish durations later (a latency median of 4.9-7.9 s on 13-25 s scans, 2.9-4.0 s now).
        """
        cadence_at = tick + self.options.publish_interval_s
        share_at = max(cadence_at, tick + took / self.options.publish_share_behind)  # never sooner than the cadence
        while not self._finished.is_set():
            now = time.monotonic()
            if now >= share_at or (now >= cadence_at and not self._frames_waiting()):
                return
            self._finished.wait(min(share_at, max(cadence_at, now + QUEUE_POLL_S)) - now)  # poll after the cadence

    def _frames_waiting(self) -> bool:
        """More frames queued than one micro-batch: the model is behind (not just a burst of arrivals)."""
        return self._queued > self.options.batch_size

    def _log_progress(self, due: float) -> float:
        """With ``progress_s``, one INFO line of frames so far and their rate when due; returns the next due time."""
        if not self.options.progress_s or time.monotonic() < due:
            return due
        frames, first = self.metadata["frames_done"], self._first_frame
        rate = frames / max(1e-9, time.time() - first) if first else 0.0
        logger.info("run %s: %d frames so far, %.0f frames/s", str(self.metadata.get("raw_uid"))[:8], frames, rate)
        return time.monotonic() + self.options.progress_s

    def _log_final(self) -> None:
        """One line per run: how it ended, what was lost, and where the time went."""
        md, t = self.metadata, self.timings
        wall = (md.get("finished") or time.time()) - (md.get("first_frame") or md.get("started") or time.time())
        logger.info(
            "run %s: %s, %d frames in %.1f s (%d dropped, %d duplicate, %d skipped, %s missing, %d flagged); "
            "inference %.1f s, trust %.1f s, stitching %.1f s, publishing %.1f s",
            str(md.get("raw_uid"))[:8],
            md.get("status"),
            md.get("frames_done", 0),
            wall,
            md.get("frames_dropped", 0),
            md.get("frames_duplicate", 0),
            md.get("frames_skipped", 0),
            md.get("frames_missing"),
            (md.get("trust") or {}).get("frames_flagged", 0),
            t["inference_s"],
            t["consistency_s"],
            t["stitch_s"],
            t["publish_s"],
        )

    def keep_unwritten(self) -> Any:
        """Hand the current image to ``fallback`` (a backup on disk), for a final image the sink could not take.

        Returns what ``fallback`` returned (None without one, or if it failed: logged).
        """
        if self.fallback is None:
            return None
        image, metadata = self._for_sink(changed_only=False)
        try:
            kept = self.fallback(image, metadata)
        except Exception as err:
            logger.error("run %s: the image could not be backed up either: %r", self.metadata.get("raw_uid"), err)
            return None
        logger.warning("run %s: image kept at %s", self.metadata.get("raw_uid"), kept)
        return kept

    def _for_sink(self, *, changed_only: bool) -> tuple[StitchedImage, dict[str, Any]]:
        """A snapshot and a copy of the metadata, taken together: the sums copied under the lock, divided after.

        ``changed_only``: the block changed since the last publish (empty if none), which the sink
        patches in at its offset, instead of the whole image; the block is forgotten here, and a
        failed publish sends the whole image next time. The lock is held for copies only: the
        inference thread, which needs it to stitch, waits for no division or angle.
        """
        with self._lock:
            if changed_only:
                sums = self.stitcher.sums(self.stitcher.take_changed() or (0, 0, 0, 0))
            else:
                sums = self.stitcher.sums()
            metadata = {
                **self.metadata,
                "updated": time.time(),  # readers (and a restarted consumer) tell a live result from a stale one
                "errors": list(self.metadata["errors"]),
                "trust": dict(self.metadata["trust"]),
                "timings": dict(self.timings),
            }
        return sums.image(), metadata

    def _publish(self) -> bool:
        if self.sink is None:
            return True
        image, metadata = self._for_sink(changed_only=self._sink_has_image)
        t0 = time.perf_counter()
        try:
            self.sink.publish(image, metadata)
            self._sink_has_image = True
        except Exception as err:  # Tiled down, network error: keep the image and retry
            self._sink_has_image = False  # the whole image next time: the sink may hold part of this one
            self._permanent = permanent_error(err)
            logger.warning("run %s: publishing failed (%r); will retry", self.metadata.get("raw_uid"), err)
            return False
        self.timings["publish_s"] += time.perf_counter() - t0
        self.publish_log.append((time.time(), image.frames))
        return True
