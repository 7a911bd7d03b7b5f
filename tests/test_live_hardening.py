"""Issue 11's findings on the live path, each reproduced: results that were lost, miscounted or left lying.

The callback runs without Tiled (``client=None``) unless the finding is about what reaches Tiled;
documents come from event-model's ``compose_*`` helpers, the model is the tiny test checkpoint.
"""

import os
import threading
import time

import event_model
import numpy as np
import pytest
import torch
from test_callback import _inline_run

from bluesky_ptychonn import schema
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.engine import LiveOptions, LiveReconstruction
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.live.callback import KEEP_FINISHED, CallbackConfig, PtychoNNCallback
from bluesky_ptychonn.sim.physics import simulate_scan

FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.1, retry_s=0.1)


@pytest.fixture(scope="module")
def scan():
    geometry = DetectorGeometry(frame_pixels=32)
    return simulate_scan(geometry=geometry, scan_shape=(4, 4), probe={"kind": "gaussian", "fwhm_px": 8})


@pytest.fixture(scope="module")
def section(scan):
    return {
        "version": schema.VERSION,
        **DetectorGeometry(frame_pixels=32).model_dump(),
        "scan": {"shape": [4, 4], "step_m": scan.metadata["scan"]["step_m"], "center_m": [0, 0]},
    }


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint, device="cpu")


class Slow(Predictor):
    """A model that takes ``delay`` seconds a micro-batch, as a large model on a busy CPU does."""

    delay = 0.5

    def predict_counts(self, frames):
        time.sleep(self.delay)
        return super().predict_counts(frames)


def _slow(predictor, delay=0.5):
    slow = Slow(predictor.model, predictor.info, device="cpu")
    slow.delay = delay
    return slow


def _feed(callback, docs):
    for name, doc in docs:
        callback(name, doc)
    uid = docs[0][1]["uid"]
    assert callback.wait(uid, 60)
    return callback.runs[uid].live.metadata


def test_a_good_run_stopped_before_its_first_batch_is_done_is_complete(scan, section, predictor):
    """Was: an earlier document error plus a stop before the first micro-batch finished gave ``failed``."""
    callback = PtychoNNCallback(_slow(predictor), None, CallbackConfig(live=FAST))
    docs = _inline_run(scan.frames, scan.positions_m, section, frame_ids=scan.frame_ids)
    start, desc, page, stop = docs
    broken = ("event_page", {"descriptor": desc[1]["uid"], "data": {}})  # malformed: recorded as an error
    md = _feed(callback, [start, desc, broken, page, stop])
    assert md["status"] == "complete" and md["frames_done"] == len(scan.frames)
    assert md["errors_total"] >= 1


def test_duplicates_inside_one_micro_batch_are_counted_once(scan, predictor):
    """Was: a repeated id inside one batch was stitched twice and not counted."""
    live = LiveReconstruction(predictor, scan.grid, None, {"raw_uid": "dup"}, FAST)
    ids = np.array([0, 1, 1, 2, 2, 2])
    live.submit(ids, scan.frames[ids], scan.positions_m[ids])
    live.finish("complete", frames_expected=3)
    assert live.wait(30)
    assert live.metadata["frames_done"] == 3 and live.metadata["frames_duplicate"] == 3
    assert live.snapshot().frames == 3 and live.metadata["frames_missing"] == 0


def test_frames_lost_after_the_highest_id_are_missing_and_pending_counts_points(scan, section, predictor):
    """Was: frames missing after the highest id were not seen; pending summed frames, positions and ids."""
    callback = PtychoNNCallback(predictor, None, CallbackConfig(live=FAST))
    docs = _inline_run(scan.frames[:10], scan.positions_m[:10], section, num_points=20)
    # Two more points whose positions came but whose frames never did.
    docs.insert(3, ("event_page", _positions_only(docs[1][1]["uid"], scan.positions_m[10:12], seq_start=11)))
    md = _feed(callback, docs)
    assert md["frames_done"] == 10 and md["frames_expected"] == 20
    assert md["frames_missing"] == 10  # 2 half-arrived and 8 never announced
    assert md["frames_pending"] == 2


def test_frames_and_positions_sent_apart_are_matched_and_a_bad_page_spoils_nothing(scan, section, predictor):
    """Frames in one page, positions one Event at a time; a page of string frames among them is refused alone.

    Was (a first cut of the vectorised matching): pending rows joined with ``np.concatenate``
    turned the valid frames into strings once a string page came, and all of them were lost.
    """
    callback = PtychoNNCallback(predictor, None, CallbackConfig(live=FAST))
    n = len(scan.frames)
    docs = _inline_run(scan.frames, scan.positions_m, section, frame_ids=scan.frame_ids, num_points=n + 2)
    start, desc, (_, page), stop = docs
    frames_only = {
        **page,
        "data": {k: v for k, v in page["data"].items() if k != "positions_m"},
        "timestamps": {k: v for k, v in page["timestamps"].items() if k != "positions_m"},
    }
    strings = {
        **page,
        "uid": ["s1", "s2"],
        "seq_num": [n + 1, n + 2],
        "time": [0.0, 0.0],
        "data": {"diffraction": [np.full(scan.frames[0].shape, "x")] * 2, "frame_id": [n, n + 1]},
        "timestamps": {"diffraction": [0.0, 0.0], "frame_id": [0.0, 0.0]},
    }
    positions = np.concatenate([scan.positions_m, scan.positions_m[:2]])
    events = [
        ("event_page", _positions_only(desc[1]["uid"], positions[i : i + 1], seq_start=i + 1)) for i in range(n + 2)
    ]
    md = _feed(callback, [start, desc, ("event_page", frames_only), ("event_page", strings), *events, stop])
    assert md["status"] == "complete" and md["frames_done"] == n and md["frames_dropped"] == 2, md
    assert md["frames_pending"] == 0 and md["frames_missing"] == 0
    assert any("dtype <U1" in e for e in md["errors"]), md["errors"]


def _positions_only(descriptor_uid, positions, seq_start):
    n = len(positions)
    return {
        "descriptor": descriptor_uid,
        "uid": [f"p{seq_start + i}" for i in range(n)],
        "seq_num": list(range(seq_start, seq_start + n)),
        "time": [0.0] * n,
        "data": {"positions_m": list(positions)},
        "timestamps": {"positions_m": [0.0] * n},
        "filled": {},
    }


def test_a_run_whose_every_frame_is_wrong_is_failed_not_complete(scan, section, predictor):
    """Was: ``complete`` with 0 frames and no error."""
    callback = PtychoNNCallback(predictor, None, CallbackConfig(live=FAST))
    md = _feed(callback, _inline_run(np.zeros((4, 16, 16)), scan.positions_m[:4], section))
    assert md["status"] == "failed" and md["frames_done"] == 0 and md["frames_dropped"] == 4
    assert "without a single frame" in md["reason"]


def test_a_stop_without_exit_status_says_so(scan, section, predictor):
    callback = PtychoNNCallback(predictor, None, CallbackConfig(live=FAST))
    docs = _inline_run(scan.frames, scan.positions_m, section)
    stop = dict(docs[-1][1])
    del stop["exit_status"]
    md = _feed(callback, [*docs[:-1], ("stop", stop)])
    assert md["status"] == "failed" and md["reason"] == "the stop document has no exit_status"


def test_a_descriptor_without_positions_leaves_a_failed_result_in_tiled(tiled_server, scan, section, predictor):
    """Was: no result in Tiled at all, so nobody knew why there was no image."""
    callback = PtychoNNCallback(predictor, tiled_server.client, CallbackConfig(live=FAST))
    bundle = event_model.compose_run(metadata={"ptychography": section})
    desc = bundle.compose_descriptor(
        name="primary", data_keys={"diffraction": {"source": "test", "dtype": "array", "shape": [32, 32]}}
    )
    callback("start", bundle.start_doc)
    callback("descriptor", desc.descriptor_doc)
    callback("stop", bundle.compose_stop())
    assert callback.flush(30)
    md = dict(tiled_server.client["processed"][bundle.start_doc["uid"]]["ptychonn"].metadata)
    assert md["status"] == "failed" and any("positions_m" in e for e in md["errors"])


def test_frames_faster_than_inference_are_bounded_never_block_and_are_listed(scan, predictor):
    """A bounded queue: the caller never waits for inference; skipped frames are counted and named."""
    options = FAST.model_copy(update={"max_queued_frames": 4, "batch_size": 2})
    live = LiveReconstruction(_slow(predictor, 0.3), scan.grid, None, {"raw_uid": "load"}, options)
    t0 = time.perf_counter()
    for i in range(len(scan.frames)):
        live.submit(scan.frame_ids[i : i + 1], scan.frames[i : i + 1], scan.positions_m[i : i + 1])
    assert time.perf_counter() - t0 < 0.25  # 16 submits against 0.3 s a batch: nothing waited
    live.finish("complete", frames_expected=len(scan.frames))
    assert live.wait(30)
    md = live.metadata
    assert md["frames_skipped"] > 0 and md["frames_done"] + md["frames_skipped"] == len(scan.frames)
    assert len(md["skipped_ids"]) == md["frames_skipped"] and md["frames_missing"] == 0


def test_frames_on_disk_wait_while_read_ahead_frames_are_queued_and_none_is_skipped(scan, predictor):
    """Frames in files come in once fewer than ``read_ahead_frames`` wait: flat memory behind a fast scan."""
    options = FAST.model_copy(update={"read_ahead_frames": 4, "batch_size": 2})
    live = LiveReconstruction(_slow(predictor, 0.05), scan.grid, None, {"raw_uid": "disk"}, options)
    most = 0
    for i in range(0, 12, 2):
        live.submit(scan.frame_ids[i : i + 2], scan.frames[i : i + 2], scan.positions_m[i : i + 2], wait=True)
        most = max(most, live._queued)
    live.finish("complete", frames_expected=12)
    assert live.wait(30)
    assert most <= 4 + 1  # fewer than 4 waiting, then one submission of 2; the old bound let all 12 queue
    assert live.metadata["frames_done"] == 12 and live.metadata["frames_skipped"] == 0


def test_frames_on_disk_are_never_skipped_even_past_max_queued_frames(scan, predictor):
    """A late flush can bring more frames than the queue's bound; read from disk already, they are kept."""
    options = FAST.model_copy(update={"max_queued_frames": 4, "read_ahead_frames": 4, "batch_size": 4})
    live = LiveReconstruction(predictor, scan.grid, None, {"raw_uid": "late"}, options)
    live.submit(scan.frame_ids[:10], scan.frames[:10], scan.positions_m[:10], wait=True)
    live.submit(scan.frame_ids[10:12], scan.frames[10:12], scan.positions_m[10:12], wait=True)
    live.finish("complete", frames_expected=12)
    assert live.wait(30)
    assert live.metadata["frames_done"] == 12 and live.metadata["frames_skipped"] == 0


def test_a_run_whose_stop_never_comes_is_released_as_interrupted(scan, predictor):
    options = FAST.model_copy(update={"idle_timeout_s": 0.5})
    live = LiveReconstruction(predictor, scan.grid, None, {"raw_uid": "silent"}, options)
    live.submit(scan.frame_ids[:4], scan.frames[:4], scan.positions_m[:4])
    assert live.wait(10) and live.done
    assert live.metadata["status"] == "interrupted" and "no stop document" in live.metadata["reason"]
    assert live.metadata["frames_done"] == 4


def test_errors_are_capped_and_counted(scan, predictor):
    live = LiveReconstruction(predictor, scan.grid, None, {"raw_uid": "noisy"}, FAST)
    for i in range(200):
        live.submit(np.array([i]), np.zeros((1, 8, 8)), np.zeros((1, 2)))
    live.finish("complete")
    assert live.wait(30)
    assert live.metadata["errors_total"] == 200 and len(live.metadata["errors"]) == 50


def test_many_runs_through_one_callback_are_released(scan, section, predictor):
    """Was: every run stayed in memory forever, with its image and the model it ran with."""
    callback = PtychoNNCallback(predictor, None, CallbackConfig(live=FAST))
    rss, threads = [], threading.active_count()
    for i in range(50):
        _feed(callback, _inline_run(scan.frames, scan.positions_m, section))
        if i in (9, 49):
            rss.append(_rss_mib())
    assert len(callback.runs) <= KEEP_FINISHED + 1
    assert threading.active_count() <= threads + 2  # each finished run's worker and publisher have ended
    assert rss[1] - rss[0] < 32, f"resident memory grew {rss[1] - rss[0]:.0f} MiB over 40 runs"


def test_results_left_running_by_a_dead_consumer_are_marked_interrupted_at_start_up(tiled_server):
    """Was: a SIGKILLed consumer left ``running`` forever (refined ones too); a restarted one says what happened."""
    import uuid

    from bluesky_ptychonn.live.lifecycle import mark_stale_results
    from bluesky_ptychonn.live.sink import TiledSink

    client = tiled_server.client
    stale, fresh, refining = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    TiledSink(client, stale).write_metadata({"status": "running", "updated": time.time() - 3600})
    TiledSink(client, fresh).write_metadata({"status": "running", "updated": time.time()})
    # A refinement whose process was killed with its consumer, and one still making progress.
    TiledSink(client, refining, "refined").write_metadata({"status": "running", "updated": time.time() - 3600})
    TiledSink(client, fresh, "refined").write_metadata({"status": "running", "updated": time.time() - 60})
    marked = mark_stale_results(client)
    assert stale in marked and refining in marked and fresh not in marked  # (the server is shared with other tests)
    md = dict(client["processed"][stale]["ptychonn"].metadata)
    assert md["status"] == "interrupted" and f"bluesky-ptychonn replay {stale}" in md["reason"]
    assert client["processed"][fresh]["ptychonn"].metadata["status"] == "running"
    md = dict(client["processed"][refining]["refined"].metadata)
    assert md["status"] == "failed" and f"bluesky-ptychonn refine {refining}" in md["errors"][0]
    assert md["finished"] == md["updated"] > time.time() - 60
    assert client["processed"][fresh]["refined"].metadata["status"] == "running"


def test_waiting_for_a_run_waits_until_the_after_final_hook_has_it(scan, section, predictor):
    """Was: ``wait`` returned at the final image, before the hook's thread had called it, so a caller
    that then waited for the hook's work (a refine worker) could find nothing submitted."""
    handed = []

    def slow_hook(uid):
        time.sleep(0.5)  # the hook's thread is late: it must still be waited for
        handed.append(uid)

    callback = PtychoNNCallback(predictor, None, CallbackConfig(live=FAST), after_final=slow_hook)
    docs = _inline_run(scan.frames, scan.positions_m, section)
    for name, doc in docs:
        callback(name, doc)
    uid = docs[0][1]["uid"]
    assert callback.wait(uid, 30)
    assert handed == [uid]


def test_interrupt_finishes_open_runs_with_their_partial_image(scan, section, predictor):
    callback = PtychoNNCallback(predictor, None, CallbackConfig(live=FAST))
    docs = _inline_run(scan.frames, scan.positions_m, section)[:-1]  # no stop: the consumer is told to stop
    for name, doc in docs:
        callback(name, doc)
    assert callback.interrupt("stopping", timeout=30) == [docs[0][1]["uid"]]
    md = callback.runs[docs[0][1]["uid"]].live.metadata
    assert md["status"] == "interrupted" and md["frames_done"] == len(scan.frames) and md["reason"] == "stopping"


def test_a_wrong_api_key_fails_at_start_up_in_one_line(tiled_server, environment_clean):
    from bluesky_ptychonn.errors import ConfigurationError
    from bluesky_ptychonn.live.service import TiledSection, tiled_client

    uri = tiled_server.server.uri.split("/api/v1")[0]
    with pytest.raises(ConfigurationError, match="TILED_API_KEY") as info:
        tiled_client(TiledSection(uri=uri, api_key="not-the-key"))
    assert "\n" not in str(info.value) and "not-the-key" not in str(info.value)
    assert tiled_client(TiledSection(uri=uri, api_key=tiled_server.server.api_key)) is not None


class _Refused:
    """Fault injection: a server that answers 401 to every write, as one with a revoked key does."""

    calls = 0

    def publish(self, image, metadata):
        import httpx

        self.calls += 1
        request = httpx.Request("PUT", "http://tiled/api/v1/metadata/processed")
        raise httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))


def test_a_permanent_refusal_is_not_retried_as_an_outage(scan, predictor):
    """Was: a read-only key's 401 retried for 10 minutes as if Tiled were down."""
    sink = _Refused()
    options = FAST.model_copy(update={"final_retry_s": 600})
    live = LiveReconstruction(predictor, scan.grid, sink, {"raw_uid": "refused"}, options)
    live.submit(scan.frame_ids, scan.frames, scan.positions_m)
    live.finish("complete")
    t0 = time.monotonic()
    assert not live.wait(30)
    assert time.monotonic() - t0 < 20 and sink.calls <= 2  # not final_retry_s (600 s); generous for a loaded CI
    assert not live.write_final(sink, timeout_s=600)


@pytest.fixture
def environment_clean(monkeypatch):
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    return monkeypatch


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_a_100000_frame_scan_through_the_callback_loses_nothing_and_memory_stays_flat(scan, section, predictor):
    """100,000 frames as 200 EventPages: every frame in the image, resident memory flat after warm-up."""
    total, page = 100_000, 500
    fast = Predictor(predictor.model, predictor.info, device="cpu", batch_size=256)  # fewer, larger forwards
    callback = PtychoNNCallback(fast, None, CallbackConfig(live=FAST.model_copy(update={"batch_size": 256})))
    docs = _inline_run(scan.frames[:1], scan.positions_m[:1], section, num_points=total)
    start, desc, stop = docs[0], docs[1], docs[-1]
    callback(*start)
    callback(*desc)
    assert callback.flush(30)
    run = callback.runs[start[1]["uid"]]
    rss = []
    for s in range(0, total, page):
        ids = np.arange(s, s + page)
        k = ids % len(scan.frames)
        data = {"diffraction": scan.frames[k], "positions_m": scan.positions_m[k], "frame_id": ids}
        callback(
            "event_page",
            {
                "descriptor": desc[1]["uid"],
                "uid": [f"e{i}" for i in ids],
                "seq_num": (ids + 1).tolist(),
                "time": [0.0] * page,
                "data": data,
                "timestamps": {key: [0.0] * page for key in data},
                "filled": {},
            },
        )
        while callback._queued > 1 or run.live._queued > 4 * page:  # a detector at the rate inference keeps up with
            time.sleep(0.01)
        if s in (20_000, total - page):
            rss.append(_rss_mib())
    callback(*stop)
    assert callback.wait(start[1]["uid"], 120)
    md = run.live.metadata
    assert md["frames_done"] == total and md["frames_skipped"] == 0 and md["frames_missing"] == 0, md
    assert md["status"] == "complete" and run.live.snapshot().frames == total
    assert rss[1] - rss[0] < 64, f"resident memory grew {rss[1] - rss[0]:.0f} MiB from 20,000 to 100,000 frames"


class _TightMemory(torch.nn.Module):
    """Fault injection: a device that runs out of memory above ``limit`` frames per batch, as a shared GPU does."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"injected: {len(x)} frames do not fit")
        return self.model(x)


def test_out_of_memory_on_the_device_retries_in_smaller_batches(scan, predictor):
    tight = Predictor(_TightMemory(predictor.model, 3), predictor.info, device="cpu", batch_size=16)
    amplitude, phase = tight.predict(scan.frames)
    expected = predictor.predict(scan.frames)
    np.testing.assert_allclose(amplitude, expected[0], atol=1e-5)
    np.testing.assert_allclose(phase, expected[1], atol=1e-5)
    assert tight.batch_size == 2
    with pytest.raises(torch.OutOfMemoryError):  # one frame does not fit on the CPU: nowhere left to go
        Predictor(_TightMemory(predictor.model, 0), predictor.info, device="cpu").predict(scan.frames[:1])


def test_a_run_uid_that_is_not_one_tiled_key_is_refused_at_its_start(tiled_server, scan, section, predictor):
    callback = PtychoNNCallback(predictor, tiled_server.client, CallbackConfig(live=FAST))
    docs = _inline_run(scan.frames, scan.positions_m, section)
    hostile = "../raw/hostile-run"
    docs[0][1]["uid"] = hostile
    for _, doc in docs[1:]:
        doc["run_start"] = hostile
    for name, doc in docs:
        callback(name, doc)
    assert callback.flush(30)
    run = callback.runs[hostile]
    assert run.live is None and any("cannot be a Tiled key" in e for e in run.errors)
    assert "hostile-run" not in list(tiled_server.client["raw"])


def test_a_consumer_started_mid_run_marks_that_run_interrupted_with_the_fix(tiled_server, scan, section, predictor):
    """Was: a consumer restarted mid-scan silently ignored every run whose start document it missed."""
    callback = PtychoNNCallback(predictor, tiled_server.client, CallbackConfig(live=FAST))
    docs = _inline_run(scan.frames, scan.positions_m, section)
    for name, doc in docs[1:]:  # the start went to the consumer that died
        callback(name, doc)
    assert callback.flush(30)
    uid = docs[0][1]["uid"]
    md = dict(tiled_server.client["processed"][uid]["ptychonn"].metadata)
    assert md["status"] == "interrupted" and f"bluesky-ptychonn replay {uid}" in md["reason"]
    assert uid not in callback.runs


def test_a_result_left_running_is_marked_interrupted_at_its_stop_by_a_restarted_consumer(
    tiled_server, scan, section, predictor
):
    """A consumer killed mid-run left ``running``; its successor sees only the stop document."""
    from bluesky_ptychonn.live.sink import TiledSink

    callback = PtychoNNCallback(predictor, tiled_server.client, CallbackConfig(live=FAST))
    docs = _inline_run(scan.frames, scan.positions_m, section)
    uid = docs[0][1]["uid"]
    TiledSink(tiled_server.client, uid).write_metadata({"raw_uid": uid, "status": "running", "source": "live"})
    callback(*docs[-1])
    assert callback.flush(30)
    md = dict(tiled_server.client["processed"][uid]["ptychonn"].metadata)
    assert md["status"] == "interrupted" and f"bluesky-ptychonn replay {uid}" in md["reason"]


def test_file_reads_and_tiled_writes_stay_off_the_runengine_thread(
    tiled_server, make_devices, predictor, tmp_path, monkeypatch
):
    """Was: HDF5 reads and failure writes ran in the RunEngine's thread, so a slow disk stalled the scan."""
    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.live.frames import StreamFrames

    readers: set[str] = set()
    read = StreamFrames.read

    def slow_read(self, doc, descriptor):  # fault injection: a file system that takes 50 ms per read
        readers.add(threading.current_thread().name)
        time.sleep(0.05)
        return read(self, doc, descriptor)

    monkeypatch.setattr(StreamFrames, "read", slow_read)
    callback = PtychoNNCallback(
        predictor, tiled_server.client, CallbackConfig(data_roots=[tiled_server.data_dir], live=FAST)
    )
    run_engine = RunEngine({})
    run_engine.subscribe(callback)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=2e-7, shape=(4, 4), exposure_s=2e-3))
    assert callback.wait(uid, 60)
    assert readers == {"ptychonn-intake"}, readers  # the callback's own thread, whichever thread the RunEngine uses
    assert callback.runs[uid].live.metadata["frames_done"] == 16


def test_a_reader_never_sees_a_torn_image_while_a_consumer_publishes(tiled_server, monkeypatch):
    """Was: a publish patches one array at a time: a reader could get amplitude and phase of two publishes."""
    import uuid

    from tiled.client.array import ArrayClient

    from bluesky_ptychonn.core.geometry import ObjectGrid
    from bluesky_ptychonn.core.stitching import StitchedImage
    from bluesky_ptychonn.live.sink import TiledSink, read_image

    uid = f"torn-{uuid.uuid4().hex}"
    sink = TiledSink(tiled_server.client, uid)
    grid = ObjectGrid(shape=(48, 48), origin_m=(0.0, 0.0), pixel_size_m=1e-8)

    def publish(k):
        image = np.full(grid.shape, float(k), np.float32)
        sink.publish(StitchedImage(image, image, image, grid, k), {"status": "running", "frames_done": k})

    publish(1)
    amplitude_in, half_way, resume = threading.Event(), threading.Event(), threading.Event()
    patch = ArrayClient.patch

    def paused_patch(self, *args, **kwargs):  # fault injection: the phase's patch stalls, the amplitude's goes in
        if self.item["id"] == "phase":
            half_way.set()
            resume.wait(30)
        done = patch(self, *args, **kwargs)
        if self.item["id"] == "amplitude":
            amplitude_in.set()
        return done

    monkeypatch.setattr(ArrayClient, "patch", paused_patch)
    writer = threading.Thread(target=publish, args=(2,))
    writer.start()
    try:
        assert half_way.wait(30) and amplitude_in.wait(30)
        node = tiled_server.client["processed"][uid]["ptychonn"]
        torn = {key: float(node[key].read().max()) for key in ("amplitude", "phase")}
        assert torn == {"amplitude": 2.0, "phase": 1.0}  # what a plain read gets in the middle of a publish
        with pytest.raises(TimeoutError):
            read_image(node, timeout_s=0.5)  # never the torn image
    finally:
        resume.set()
        writer.join()
    arrays, md = read_image(node)
    assert {float(v) for a in arrays.values() for v in (a.min(), a.max())} == {2.0} and md["frames_done"] == 2


def _tiled_down(monkeypatch):
    """Fault injection: every publish fails as it does while Tiled is unreachable."""
    import httpx

    from bluesky_ptychonn.live.sink import TiledSink

    def refuse(self, image, metadata):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(TiledSink, "publish", refuse)


def test_a_final_image_tiled_will_not_take_is_backed_up_then_restored(
    tiled_server, scan, section, predictor, tmp_path, monkeypatch
):
    """Was: after final_retry_s the final image was dropped with a log line."""
    from bluesky_ptychonn.archive.backup import restore_backups

    _tiled_down(monkeypatch)
    options = FAST.model_copy(update={"final_retry_s": 0.3})
    callback = PtychoNNCallback(predictor, tiled_server.client, CallbackConfig(live=options, backup_dir=tmp_path))
    docs = _inline_run(scan.frames, scan.positions_m, section)
    uid = docs[0][1]["uid"]
    for name, doc in docs:
        callback(name, doc)
    assert not callback.wait(uid, 30)  # never reached Tiled
    assert callback.runs[uid].live.done and (tmp_path / f"{uid}.ptychonn.h5").exists()
    monkeypatch.undo()  # Tiled is back
    assert restore_backups(tiled_server.client, tmp_path) == [uid]
    node = tiled_server.client["processed"][uid]["ptychonn"]
    assert node.metadata["status"] == "complete" and node.metadata["frames_done"] == len(scan.frames)
    assert node["amplitude"].read().shape == tuple(node.metadata["grid"]["shape"])
    assert (tmp_path / "restored" / f"{uid}.ptychonn.h5").exists()


def test_sigterm_with_tiled_down_and_the_disk_full_says_what_was_lost(scan, section, predictor, tmp_path, caplog):
    """Interrupted at exit, Tiled unreachable, the backup disk full (/dev/full): logged, nothing raised, no torn file"""
    callback = PtychoNNCallback(
        _slow(predictor, 0.2), None, CallbackConfig(live=FAST.model_copy(update={"batch_size": 4}), backup_dir=tmp_path)
    )
    docs = _inline_run(scan.frames, scan.positions_m, section)
    uid = docs[0][1]["uid"]
    (tmp_path / f"{uid}.ptychonn.h5.partial").symlink_to("/dev/full")  # writes fail with ENOSPC
    for name, doc in docs[:-1]:  # no stop: the consumer is told to quit mid-scan
        callback(name, doc)
    assert callback.flush(30)
    callback.runs[uid].live.sink = _Unreachable()
    assert callback.interrupt("SIGTERM", timeout=1.0) == [uid]
    assert "No space left on device" in caplog.text and "could not be backed up either" in caplog.text
    assert not (tmp_path / f"{uid}.ptychonn.h5").exists()  # never a half-written backup under the name restore reads


class _Unreachable:
    """A sink whose server is gone (fault injection)."""

    def publish(self, image, metadata):
        raise ConnectionRefusedError("[Errno 111] Connection refused")


def test_the_0mq_proxy_with_curve_admits_only_known_keys_and_survives_a_restart(scan, section, checkpoint, tmp_path):
    """The proxy's output with CURVE: the consumer with its key gets the run; a keyless subscriber hears nothing;
    the proxy restarted mid-run loses nothing that was not sent while it was down.

    bluesky's proxy cannot run CURVE on both sockets at once (each starts a ZAP authenticator at
    the same inproc address); its input stays on the loopback, where only the RunEngine's host reaches it.
    """
    import asyncio
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import zmq.auth
    from bluesky.callbacks.zmq import Publisher, RemoteDispatcher
    from tiled_servers import free_port

    from bluesky_ptychonn.live.service import Consumer
    from bluesky_ptychonn.live.settings import ServiceConfig
    from bluesky_ptychonn.live.wire import deserialize, serialize

    keys = {}
    for name in ("proxy", "consumer"):
        keys[name] = zmq.auth.create_certificates(tmp_path, name)  # (public, secret) files
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(keys["consumer"][0], trusted)
    zmq_in, zmq_out = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    script = Path(sys.executable).with_name("bluesky-0MQ-proxy")
    curve = ["--out-curve-secret", keys["proxy"][1], "--out-curve-client-keys", trusted]
    proxy = subprocess.Popen(
        [str(script) if script.exists() else "bluesky-0MQ-proxy", "--in-address", zmq_in, "--out-address", zmq_out]
        + [str(c) for c in curve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = ServiceConfig(
        model={"checkpoint": checkpoint, "device": "cpu", "reload_interval_s": 0},
        zmq={"address": zmq_out, "client_secret_key": keys["consumer"][1], "server_public_key": keys["proxy"][0]},
        live=FAST,
    )
    consumer = Consumer(config)
    heard = []
    eavesdropper = RemoteDispatcher(zmq_out, deserializer=deserialize)  # no key
    eavesdropper.subscribe(lambda name, doc: heard.append(name))

    def listen():
        try:
            eavesdropper.start()
        except asyncio.CancelledError:  # how it is stopped below
            pass

    threads = [threading.Thread(target=consumer.run), threading.Thread(target=listen)]
    for thread in threads:
        thread.start()
    try:
        publisher = Publisher(zmq_in, serializer=serialize)
        deadline = time.monotonic() + 120
        while not consumer.callback.runs:  # PUB/SUB drops what is sent before both ends are connected
            assert time.monotonic() < deadline and proxy.poll() is None
            publisher("start", {"uid": f"hello-{time.monotonic()}", "time": time.time()})
            time.sleep(0.25)
        docs = _inline_run(scan.frames, scan.positions_m, section)
        for name, doc in docs:
            publisher(name, doc)
        uid = docs[0][1]["uid"]
        while uid not in consumer.callback.runs or not consumer.callback.wait(uid, 1):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert consumer.callback.runs[uid].live.metadata["frames_done"] == len(scan.frames)
        assert heard == []

        # The proxy restarted in the middle of a run: the consumer reconnects by itself and the
        # run goes on (what is published while no proxy listens is lost, and would be counted missing).
        start, desc, page, stop = _inline_run(scan.frames, scan.positions_m, section)
        first, rest = _halves(page[1])
        for doc in (start, desc, ("event_page", first)):
            publisher(*doc)
        uid = start[1]["uid"]
        # (the run's reconstruction exists once its descriptor is handled: `live` is None until then)
        while uid not in consumer.callback.runs or getattr(consumer.callback.runs[uid].live, "_arrived", None) != set(
            range(8)
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proxy.terminate()
        proxy.wait(10)
        proxy = subprocess.Popen(proxy.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # a deadline of its own: a busy CI machine is slow to reconnect
        known = len(consumer.callback.runs)
        while len(consumer.callback.runs) == known:  # until both ends have reconnected
            assert time.monotonic() < deadline and proxy.poll() is None
            publisher("start", {"uid": f"hello-{time.monotonic()}", "time": time.time()})
            time.sleep(0.25)
        publisher("event_page", rest)
        publisher(*stop)
        assert consumer.callback.wait(uid, 30)
        md = consumer.callback.runs[uid].live.metadata
        assert md["status"] == "complete" and md["frames_done"] == len(scan.frames) and md["frames_missing"] == 0
    finally:
        consumer.stop()
        eavesdropper.loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(eavesdropper.loop)])
        for thread in threads:
            thread.join(10)
        proxy.terminate()
        proxy.wait(10)


def _halves(page):
    """An EventPage split in two at its middle row."""
    half = len(page["seq_num"]) // 2

    def cut(value, part):
        if isinstance(value, dict):
            return {k: cut(v, part) for k, v in value.items()}
        return (value[:half] if part == 0 else value[half:]) if isinstance(value, list) else value

    return cut(page, 0), cut(page, 1)
