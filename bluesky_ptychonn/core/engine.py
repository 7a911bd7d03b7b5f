"""One run's live reconstruction: micro-batched inference and stitching off the caller's thread.

:class:`LiveReconstruction` takes frames as they arrive (``submit`` never blocks on inference),
runs the model in micro-batches on a worker thread, stitches incrementally, and hands snapshots
to a sink on a publisher thread at a fixed cadence, so neither inference nor the RunEngine ever
waits for Tiled. Failures are recorded, never raised to the caller:

* a bad frame (wrong shape, NaN, negative) or a position off the grid is dropped and counted;
* an exception in a batch is logged, kept in ``errors`` and the run goes on;
* a sink failure (Tiled unreachable) keeps the image in memory and retries with back-off; the
  final image is written once the sink works again (within ``final_retry_s``).

With the run's probe, every batch is also scored against its frames on the inference device
(:mod:`~bluesky_ptychonn.core.consistency`) and stitched into a trust map beside the image; frames
worse than the checkpoint's out-of-domain threshold are flagged. Without a probe there is no trust
map, and the metadata says why.

The class knows nothing of Bluesky: the callback and replay both feed it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..errors import PositionError
from .consistency import FrameConsistency, live_trust
from .geometry import ObjectGrid
from .host_runtime import heap_trim, lower_thread_priority, release_openmp_team
from .live_options import LiveOptions
from .preprocess import bad_frames, malformed_submission
from .publishing import Publishing
from .stitching import PatchStitcher, StitchedImage, patch_window

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Where snapshots go (the Tiled sink, or anything with this method)."""

    def publish(self, image: StitchedImage, metadata: dict[str, Any]) -> None:
        """Write the image and metadata; raise on failure (the caller retries)."""


_STOP = object()

#: Flagged or skipped frame ids and error messages kept in the metadata (the counts are always complete).
MAX_FLAGGED_IDS = 100
MAX_ERRORS = 50

#: Seconds between the worker's hand-backs of free heap pages to the system (see ``heap_trim``).
TRIM_INTERVAL_S = 1.0

_MALLOC_TRIM = heap_trim()


class LiveReconstruction(Publishing):
    """Reconstructs one run from frames submitted in any order and any batch size."""

    def __init__(
        self,
        predictor: Any,
        grid: ObjectGrid,
        sink: Sink | None,
        metadata: dict[str, Any],
        options: LiveOptions | None = None,
        *,
        probe: np.ndarray | None = None,
        probe_source: str = "",
    ) -> None:
        self.predictor = predictor
        self.options = options or LiveOptions()
        n = predictor.patch_pixels
        self.consistency, trust = live_trust(predictor, probe, probe_source)
        footprint = self.consistency.footprint if self.consistency else None
        pipeline = "device" if self.options.pipeline == "auto" else self.options.pipeline
        self.stitcher = PatchStitcher(
            grid,
            n,
            patch_window(n, self.options.window, width_fraction=self.options.window_width),
            trust_window=footprint,
            device=predictor.device if pipeline == "device" else None,  # there the sums stay beside the predictions
        )
        self.sink = sink
        self._frame_scores: list[FrameConsistency] = []
        self._flagged_ids: list[int] = []
        self.metadata = {
            **metadata,
            "status": "running",
            "model_hash": predictor.info.content_hash,
            "grid": grid.as_metadata(),
            "pixel_size_m": grid.pixel_size_m,
            "frames_done": 0,
            "frames_dropped": 0,
            "frames_duplicate": 0,
            "frames_skipped": 0,
            "skipped_ids": [],
            "errors": [],
            "errors_total": 0,
            "trust": trust,
        }
        self.timings: dict[str, float] = {"inference_s": 0.0, "consistency_s": 0.0, "stitch_s": 0.0, "publish_s": 0.0}
        # (time, frames so far) at each submit and each successful publish, for latency figures.
        self.submit_log: list[tuple[float, int]] = []
        self.publish_log: list[tuple[float, int]] = []
        self._seen: set[int] = set()  # ids reconstructed
        self._arrived: set[int] = set()  # ids submitted, whatever became of them
        self._queued = 0  # frames waiting for the worker
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards stitcher and metadata between worker and publisher
        self._dirty = threading.Event()
        self._finished = threading.Event()
        self._published_final = threading.Event()
        self._first_frame: float | None = None
        self._sink_has_image = False  # after a whole image is written, publishes send the changed block
        # Called with (image, metadata) when the final image cannot reach the sink, to keep it elsewhere.
        self.fallback: Callable[[StitchedImage, dict[str, Any]], Any] | None = None
        self._permanent: str | None = None  # why publishing can never succeed, if it cannot
        self._worker = threading.Thread(target=self._work, name="ptychonn-inference", daemon=True)
        self._publisher = threading.Thread(target=self._publish_loop, name="ptychonn-publish", daemon=True)
        release_openmp_team()  # the model runs on the worker now: this thread's idle team would slow it down
        self._worker.start()
        self._publisher.start()

    # -- input ------------------------------------------------------------------------------

    def submit(self, frame_ids: np.ndarray, frames: np.ndarray, positions_m: np.ndarray, *, wait: bool = False) -> None:
        """Queue frames with their ids and positions (y, x) in metres.

        Returns at once: frames beyond ``max_queued_frames`` are skipped and listed. With
        ``wait`` (frames that can stay on disk: replay, or files read off the RunEngine's thread)
        it waits instead until fewer than ``read_ahead_frames`` are queued, and is never skipped.
        """
        if self._first_frame is None:
            self._first_frame = time.time()
        ids = np.atleast_1d(np.asarray(frame_ids))
        frames = np.asarray(frames)
        positions_m = np.asarray(positions_m)
        problem = malformed_submission(ids, frames, positions_m, tuple(self.predictor.info.recipe.frame_shape))
        if ids.dtype.kind in "iu":
            with self._lock:
                self._arrived.update(ids.tolist())
        if problem:  # refuse here: one bad submission must not sink a whole micro-batch
            self.record_error(f"dropped {len(ids)} frames: {problem}")
            self._count("frames_dropped", len(ids))
            return
        # Frames that can wait come in whole once fewer than read_ahead_frames are queued, so the
        # queue never runs dry between two submissions (the model would idle while the next one is
        # read) and stays long enough for the publisher to see the model behind. They are in memory
        # already: refusing them for their size would only lose them.
        limit = min(self.options.read_ahead_frames, self.options.max_queued_frames)
        while wait and self._queued >= limit and self._worker.is_alive():
            time.sleep(0.01)
        with self._lock:
            skip = self._queued + len(ids) > self.options.max_queued_frames and not (wait and self._worker.is_alive())
            if skip:  # never block the RunEngine and never grow without bound: skip, and say exactly which
                self.metadata["frames_skipped"] += len(ids)
                room = MAX_FLAGGED_IDS - len(self.metadata["skipped_ids"])
                self.metadata["skipped_ids"].extend(int(i) for i in ids[:room])
            else:
                self._queued += len(ids)
        if skip:
            self._dirty.set()
            return
        self._queue.put((ids, frames, positions_m.astype(np.float64).reshape(len(ids), 2)))
        submitted = (self.submit_log[-1][1] if self.submit_log else 0) + len(ids)
        self.submit_log.append((time.time(), submitted))

    def record_error(self, message: str) -> None:
        """Keep an error in the result's metadata (and the log)."""
        logger.error("run %s: %s", self.metadata.get("raw_uid"), message)
        with self._lock:
            self.metadata["errors_total"] += 1
            if len(self.metadata["errors"]) < MAX_ERRORS:  # a bad stream must not grow every publish
                self.metadata["errors"].append(message)
        self._dirty.set()

    def finish(self, status: str = "complete", **extra: Any) -> None:
        """No more frames: process what is queued, then publish the final image with ``status``."""
        self._queue.put((_STOP, status, extra))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run has ended: image published or given up on; True if it was published.

        Joins both threads: the publisher can give up (a permanent refusal) while the worker is
        still concluding, and a run is only over, ready for ``write_final``, once both have ended.
        """
        give_up_at = None if timeout is None else time.monotonic() + timeout
        for thread in (self._publisher, self._worker):
            thread.join(None if give_up_at is None else max(0.0, give_up_at - time.monotonic()))
        return self._published_final.is_set()

    def write_final(self, sink: Sink, timeout_s: float | None = None) -> bool:
        """Write the finished image to ``sink`` at once, retrying with back-off; True if written.

        For a reconstruction made in memory (no sink, as replay does) that must reach Tiled only
        when complete. Gives up after ``timeout_s`` (default ``final_retry_s``).
        """
        if not self._finished.is_set():
            raise RuntimeError("write_final before the reconstruction finished")
        self.sink = sink
        self._sink_has_image = False
        give_up_at = time.monotonic() + (self.options.final_retry_s if timeout_s is None else timeout_s)
        delay = self.options.retry_s
        while not self._publish():
            if self._permanent or time.monotonic() + delay > give_up_at:
                return False
            time.sleep(delay)
            delay = min(30.0, delay * 2)
        return True

    @property
    def done(self) -> bool:
        """True once the final image is written or given up on: the run's threads have ended."""
        return self._finished.is_set() and not self._publisher.is_alive()

    def snapshot(self) -> StitchedImage:
        """The current image (the sums copied under the lock, divided after it, as a publish does)."""
        with self._lock:
            sums = self.stitcher.sums()
        return sums.image()

    # -- worker -----------------------------------------------------------------------------

    def _next_batch(self) -> tuple[list, Any]:
        """Collect up to batch_size frames, waiting at most max_wait_s after the first.

        A run silent for ``idle_timeout_s`` (its stop never came) ends as ``interrupted``, so its
        threads are released and its result does not stay ``running``.
        """
        items, stop, count = [], None, 0
        try:
            first = self._queue.get(timeout=self.options.idle_timeout_s)
        except queue.Empty:
            reason = f"no frames and no stop document for {self.options.idle_timeout_s:g} s"
            return [], (_STOP, "interrupted", {"reason": reason})
        deadline = time.monotonic() + self.options.max_wait_s
        while True:
            if first[0] is _STOP:
                stop = first
                break
            items.append(first)
            count += len(first[0])
            if count >= self.options.batch_size:
                break
            try:
                first = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
        return items, stop

    def _work(self) -> None:
        lower_thread_priority(self.options.worker_nice)
        trimmed = time.monotonic()
        while True:
            items, stop = self._next_batch()
            if items:
                try:
                    self._process(items)
                except Exception as err:  # the analysis never takes the scan down
                    self._batch_failed(sum(len(i[0]) for i in items), err)
            if _MALLOC_TRIM is not None and (stop is not None or time.monotonic() - trimmed > TRIM_INTERVAL_S):
                _MALLOC_TRIM(0)
                trimmed = time.monotonic()
            if stop is not None:
                self._conclude(*stop[1:])
                return

    def _conclude(self, status: str, extra: dict[str, Any]) -> None:
        """Final metadata once every queued frame is done; an image with no frame is never ``complete``."""
        expected = extra.pop("frames_expected", None)
        with self._lock:
            self.metadata.update(extra)
            self._summarise_trust()
            # Points of the scan whose frame never reached the analysis (dropped ones are counted apart);
            # unknown (None) when the documents do not say how many points the scan had.
            self.metadata["frames_expected"] = expected
            self.metadata["frames_missing"] = max(0, expected - len(self._arrived)) if expected else None
            if status == "complete" and self.stitcher.frames == 0:
                status = "failed"
                self.metadata["reason"] = (
                    self.metadata.get("reason") or "the run ended without a single frame that could be reconstructed"
                )
            self.metadata["status"] = status
            self.metadata["finished"] = time.time()
            self.metadata["first_frame"] = self._first_frame
        self._finished.set()
        self._dirty.set()

    def _process(self, items: list) -> None:
        # The items' frames count as queued until their micro-batch starts (or they are refused), so
        # that the publisher sees a backlog also within one large submission.
        waiting = sum(len(i[0]) for i in items)
        try:
            ids = np.concatenate([np.atleast_1d(i[0]) for i in items])
            frames = np.concatenate([i[1] if i[1].ndim == 3 else i[1][None] for i in items])
            positions = np.concatenate([np.atleast_2d(i[2]) for i in items])
            keep = self._accept(ids, frames, positions)
            ids, frames, positions = ids[keep], frames[keep], positions[keep]
            self._dequeue(waiting - len(ids))
            waiting = len(ids)
            # One submission can hold a whole burst (a detector that flushed late): stitched and
            # published micro-batch by micro-batch, its first frames reach Tiled without waiting for its last.
            step = self.options.batch_size
            for s in range(0, len(ids), step):
                batch = slice(s, s + step)
                n = len(ids[batch])
                self._dequeue(n)
                waiting -= n
                try:
                    self._reconstruct(ids[batch], frames[batch], positions[batch])
                except Exception as err:  # never takes the scan down: this micro-batch is lost, not the rest
                    self._batch_failed(n, err)
        finally:
            self._dequeue(waiting)

    def _dequeue(self, frames: int) -> None:
        with self._lock:
            self._queued -= frames

    def _batch_failed(self, frames: int, err: Exception) -> None:
        self.record_error(f"batch of {frames} frames failed: {err!r}")
        logger.error("run %s: traceback of the failed batch", self.metadata.get("raw_uid"), exc_info=True)

    def _reconstruct(self, ids: np.ndarray, measured: Any, positions: np.ndarray) -> None:
        """Infer, score and stitch accepted frames, then wake the publisher."""
        t0 = time.perf_counter()
        if self.stitcher.device is not None:  # the batch crosses to the device once and stays there
            measured = self.predictor.upload(measured)
            amplitude, phase = self.predictor.predict_counts(measured)
        else:
            amplitude, phase = self.predictor.predict(measured)
        t1 = time.perf_counter()
        scores = None
        if self.consistency is not None:
            scores = self.consistency.score(amplitude, phase, measured)
        t2 = time.perf_counter()
        with self._lock:
            self.stitcher.add(amplitude, phase, positions, trust=None if scores is None else scores.error)
            self.metadata["frames_done"] = self.stitcher.frames
            if scores is not None:
                self._record_trust(ids, scores)
        self.timings["inference_s"] += t1 - t0
        self.timings["consistency_s"] += t2 - t1
        self.timings["stitch_s"] += time.perf_counter() - t2
        self._dirty.set()

    def _record_trust(self, ids: np.ndarray, scores: FrameConsistency) -> None:
        """Keep a batch's scores and flag its out-of-domain frames (called under the lock)."""
        trust = self.metadata["trust"]
        self._frame_scores.append(scores)
        threshold = trust.get("threshold")
        if threshold is not None:
            flagged = ids[scores.error > threshold]
            room = MAX_FLAGGED_IDS - len(self._flagged_ids)
            self._flagged_ids.extend(int(i) for i in flagged[:room])
            trust["frames_flagged"] += int(len(flagged))
            trust["flagged_ids"] = list(self._flagged_ids)

    def _summarise_trust(self) -> None:
        """Put the scores so far into the metadata's trust summary (under the lock).

        Called per publish and at the end, not per batch: a median over a long scan costs a sort.
        """
        if not self._frame_scores:
            return
        if len(self._frame_scores) > 1:  # merged into one array, so the list stays short
            self._frame_scores = [
                FrameConsistency(
                    error=np.concatenate([f.error for f in self._frame_scores]),
                    chi2=np.concatenate([f.chi2 for f in self._frame_scores]),
                )
            ]
        self.metadata["trust"].update(self._frame_scores[0].summary())

    def _accept(self, ids: np.ndarray, frames: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Mask of frames to reconstruct; the rest are counted as dropped or duplicate."""
        keep = ~bad_frames(frames)
        if self.options.saturation_counts is not None:
            keep &= frames.reshape(len(frames), -1).max(axis=1) < self.options.saturation_counts
        if (~keep).any():
            self.record_error(
                f"dropped {int((~keep).sum())} NaN, negative or saturated frames (ids {ids[~keep][:5].tolist()})"
            )
            self._count("frames_dropped", int((~keep).sum()))
        try:
            self.stitcher.grid.patch_corners(positions[keep], self.stitcher.n)
        except PositionError:
            off = np.zeros(len(frames), bool)
            for i in np.flatnonzero(keep):
                try:
                    self.stitcher.grid.patch_corners(positions[i : i + 1], self.stitcher.n)
                except PositionError:
                    off[i] = True
            self.record_error(
                f"dropped {int(off.sum())} frames whose positions are off the grid (ids {ids[off][:5].tolist()})"
            )
            self._count("frames_dropped", int(off.sum()))
            keep &= ~off
        kept = ids[keep].tolist()
        if len(set(kept)) == len(kept) and self._seen.isdisjoint(kept):  # the usual case, without a loop per frame
            self._seen.update(kept)
            return keep
        duplicate = np.zeros(len(ids), bool)
        for k in np.flatnonzero(keep):  # in order, so a repeat inside this batch counts as well
            duplicate[k] = int(ids[k]) in self._seen
            self._seen.add(int(ids[k]))
        if duplicate.any():
            self._count("frames_duplicate", int(duplicate.sum()))
        return keep & ~duplicate

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self.metadata[key] += n
