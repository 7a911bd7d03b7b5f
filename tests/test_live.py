"""LiveReconstruction and the Tiled sink against a real in-process Tiled server."""

import threading
import time

import numpy as np
import pytest
import torch
from tiled.client import from_uri

from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import DetectorGeometry, NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.engine import LiveOptions, LiveReconstruction
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN
from bluesky_ptychonn.core.reconstruct import reconstruct
from bluesky_ptychonn.live.sink import TiledSink
from bluesky_ptychonn.sim.physics import simulate_scan

FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.05, retry_s=0.1, final_retry_s=60)


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(
        geometry=DetectorGeometry(frame_pixels=32), scan_shape=(6, 6), probe={"kind": "gaussian", "fwhm_px": 8}
    )


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    net = NetworkConfig(input_pixels=32, base_channels=4, depth=2)
    info = CheckpointInfo(net, PreprocessRecipe(frame_shape=(32, 32), scale=0.05), content_hash="f" * 64)
    return Predictor(PtychoNN(net).eval(), info, device="cpu")


@pytest.fixture(scope="module")
def server(tiled_server):
    return tiled_server.server


def _read(client, uid):
    node = client["processed"][uid]["ptychonn"]
    return {k: node[k].read() for k in ("amplitude", "phase", "weight")}, dict(node.metadata)


def test_live_result_in_tiled_equals_offline(server, scan, predictor):
    client = from_uri(server.uri)
    live = LiveReconstruction(predictor, scan.grid, TiledSink(client, "run-a"), {"raw_uid": "run-a"}, FAST)
    order = np.random.default_rng(0).permutation(len(scan.frames))  # out of order, odd chunk sizes
    for chunk in np.array_split(order, 7):
        live.submit(scan.frame_ids[chunk], scan.frames[chunk], scan.positions_m[chunk])
    live.finish("complete")
    assert live.wait(30)
    arrays, md = _read(client, "run-a")
    offline = reconstruct(predictor, scan.frames, scan.positions_m, grid=scan.grid)
    np.testing.assert_allclose(arrays["amplitude"], offline.amplitude, atol=1e-5)
    np.testing.assert_allclose(arrays["phase"], offline.phase, atol=1e-5)
    np.testing.assert_allclose(arrays["weight"], offline.weight, rtol=1e-5)
    assert md["status"] == "complete" and md["frames_done"] == len(scan.frames)
    assert md["model_hash"] == "f" * 64 and md["grid"]["shape"] == list(scan.grid.shape)
    assert md["timings"]["inference_s"] > 0 and md["errors"] == []


def test_partial_coverage_grows_in_tiled(server, scan, predictor):
    client = from_uri(server.uri)
    slow = LiveOptions(batch_size=8, max_wait_s=0.05, publish_interval_s=1.0, retry_s=0.1)
    sink = TiledSink(client, "run-b")
    sent = []  # (shape, offset) of each image the sink is given
    publish = sink.publish
    sink.publish = lambda image, md: (sent.append((image.weight.shape, image.offset)), publish(image, md))
    live = LiveReconstruction(predictor, scan.grid, sink, {"raw_uid": "run-b"}, slow)
    # Prepared before any frame: the result and its empty arrays, so the first image is only a patch.
    # (`processed` itself is made by the first result on a fresh server: the engine's thread may not have yet.)
    _wait_until(lambda: "processed" in client and "weight" in client["processed"].get("run-b", {}).get("ptychonn", {}))
    empty, md = _read(client, "run-b")
    assert md["status"] == "running" and not empty["weight"].any() and empty["weight"].shape == scan.grid.shape
    rows = np.argsort(scan.positions_m[:, 0], kind="stable")
    live.submit(scan.frame_ids[rows[:12]], scan.frames[rows[:12]], scan.positions_m[rows[:12]])
    _wait_until(lambda: live.metadata["frames_done"] == 12)
    _wait_until(lambda: live.publish_log and live.publish_log[-1][1] == 12)  # at most a cadence after the first
    first, md = _read(client, "run-b")
    assert md["status"] == "running" and md["frames_done"] == 12
    live.submit(scan.frame_ids[rows[12:]], scan.frames[rows[12:]], scan.positions_m[rows[12:]])
    live.finish("complete")
    assert live.wait(30)
    final, md = _read(client, "run-b")
    assert md["status"] == "complete"
    # The arrays have the grid's shape from the start; each publish patched in only the block that changed.
    assert first["weight"].shape == final["weight"].shape == scan.grid.shape
    assert (first["weight"] > 0).sum() < (final["weight"] > 0).sum()
    assert all(0 < np.prod(shape) < np.prod(scan.grid.shape) for shape, _ in sent)
    assert sent[0][1] != sent[-1][1]
    np.testing.assert_allclose(final["phase"], live.snapshot().phase, atol=1e-6)
    # Publishes are progress, not history: the catalog keeps no revision of their metadata.
    assert len(client["processed"]["run-b"]["ptychonn"].metadata_revisions) == 0


def test_bad_frames_are_dropped_counted_and_recorded(server, scan, predictor):
    client = from_uri(server.uri)
    live = LiveReconstruction(predictor, scan.grid, TiledSink(client, "run-c"), {"raw_uid": "run-c"}, FAST)
    frames = scan.frames.astype(np.float32)
    frames[3, 1, 1] = np.nan
    frames[4, 0, 0] = -5
    positions = scan.positions_m.copy()
    positions[5] += 1e-3  # a millimetre off the grid
    live.submit(scan.frame_ids, frames, positions)
    live.submit(scan.frame_ids[:2], frames[:2], positions[:2])  # duplicates
    live.submit(np.array([99]), np.zeros((1, 16, 16)), np.zeros((1, 2)))  # wrong shape
    live.finish("complete", frames_expected=len(frames) + 3)  # two points after the last never came
    assert live.wait(30)
    _, md = _read(client, "run-c")
    assert md["frames_done"] == len(frames) - 3
    assert md["frames_dropped"] == 4 and md["frames_duplicate"] == 2
    assert md["frames_missing"] == 2  # dropped frames arrived: they are counted as dropped, not missing
    assert any("NaN" in e for e in md["errors"]) and any("off the grid" in e for e in md["errors"])
    assert any("shape" in e for e in md["errors"]) and md["status"] == "complete"


class FailingOnce(Predictor):
    """Fault injection: the second micro-batch raises, as a CUDA or driver error would."""

    calls = 0

    def predict_counts(self, frames):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("injected fault in batch 2")
        return super().predict_counts(frames)


def test_an_exception_in_one_batch_is_recorded_and_the_run_goes_on(server, scan, predictor):
    client = from_uri(server.uri)
    flaky = FailingOnce(predictor.model, predictor.info, device="cpu")
    options = FAST.model_copy(update={"batch_size": 12})  # one micro-batch per submission
    live = LiveReconstruction(flaky, scan.grid, TiledSink(client, "run-d"), {"raw_uid": "run-d"}, options)
    for chunk in np.array_split(np.arange(len(scan.frames)), 3):
        live.submit(scan.frame_ids[chunk], scan.frames[chunk], scan.positions_m[chunk])
        _wait_until(lambda c=chunk: live.metadata["frames_done"] + 12 >= c[-1] + 1)
    live.finish("complete")
    assert live.wait(30)
    _, md = _read(client, "run-d")
    assert md["status"] == "complete"
    assert any("injected fault" in e for e in md["errors"])
    assert md["frames_done"] == len(scan.frames) - 12


def test_a_run_with_zero_frames(server, scan, predictor):
    client = from_uri(server.uri)
    live = LiveReconstruction(predictor, scan.grid, TiledSink(client, "run-e"), {"raw_uid": "run-e"}, FAST)
    live.finish("complete")
    assert live.wait(30)
    arrays, md = _read(client, "run-e")
    assert md["frames_done"] == 0 and not arrays["weight"].any() and arrays["weight"].shape == scan.grid.shape


def _wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def test_progress_is_logged_while_the_run_goes_on_when_asked(server, scan, predictor, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="bluesky_ptychonn")
    options = FAST.model_copy(update={"progress_s": 0.01})
    live = LiveReconstruction(
        predictor, scan.grid, TiledSink(from_uri(server.uri), "run-p"), {"raw_uid": "run-p"}, options
    )
    live.submit(scan.frame_ids[:10], scan.frames[:10], scan.positions_m[:10])
    _wait_until(lambda: any("10 frames so far" in r.getMessage() for r in caplog.records))
    live.finish("complete")
    assert live.wait(30)
    assert caplog.records[-1].getMessage().startswith("run run-p: complete, 10 frames in ")


class _Recording:
    """A sink that keeps what each publish carried (frames done), and says when it was prepared and first used."""

    def __init__(self):
        self.frames: list[int] = []
        self.prepared, self.published = threading.Event(), threading.Event()

    def prepare(self, shape, *, trust, metadata):
        self.prepared.set()

    def publish(self, image, metadata):
        self.frames.append(image.frames)
        self.published.set()


class _Slow(Predictor):
    """Each micro-batch takes 0.1 s more, as on a busy CPU: the publisher has time between two of them."""

    def predict_counts(self, frames):
        time.sleep(0.1)
        return super().predict_counts(frames)


def test_a_burst_is_stitched_and_published_micro_batch_by_micro_batch(scan, predictor):
    """Was: one late submission of many frames (a detector flushing a burst) reached Tiled only as a whole."""
    sink = _Recording()
    slow = _Slow(predictor.model, predictor.info, device="cpu")
    options = FAST.model_copy(update={"batch_size": 8})
    live = LiveReconstruction(slow, scan.grid, sink, {"raw_uid": "burst"}, options)
    live.submit(scan.frame_ids, scan.frames, scan.positions_m)  # 36 frames in one submission
    live.finish("complete")
    assert live.wait(30)
    partial = [n for n in sink.frames if 0 < n < len(scan.frames)]
    assert partial and all(n % 8 == 0 for n in partial), sink.frames
    assert sink.frames[-1] == live.metadata["frames_done"] == len(scan.frames)


class _SlowSink(_Recording):
    """A Tiled server on busy cores: each publish takes 0.1 s; notes when, and how many frames were queued
    as it began and after."""

    def __init__(self):
        super().__init__()
        self.live, self.spans = None, []

    def publish(self, image, metadata):
        start, before = time.monotonic(), self.live._queued if self.live else 0
        time.sleep(0.1)
        super().publish(image, metadata)
        self.spans.append((start, time.monotonic(), self.live._queued if self.live else 0, before))


def test_while_the_model_is_behind_publishing_takes_at_most_its_share_of_the_time(scan, predictor):
    """Was: a publish, then as long a wait: the server took up to half the cores that inference needed."""
    sink = _SlowSink()
    slow = _Slow(predictor.model, predictor.info, device="cpu")
    options = FAST.model_copy(update={"batch_size": 4, "publish_share_behind": 0.25})
    live = LiveReconstruction(slow, scan.grid, sink, {"raw_uid": "behind"}, options)
    sink.live = live
    live.submit(scan.frame_ids, scan.frames, scan.positions_m)  # 9 micro-batches of 0.1 s and more
    live.finish("complete")
    assert live.wait(30)
    # A 0.1 s publish with frames still queued, before and after it, is followed by at least 0.3 s
    # without one (0.25 of the time); the next comes sooner only once the model has caught up.
    gaps = [b[0] - a[1] for a, b in zip(sink.spans[:-2], sink.spans[1:-1], strict=True) if a[2] > 4 and b[3] > 4]
    assert gaps and min(gaps) >= 0.25, sink.spans
    assert sink.frames[-1] == live.metadata["frames_done"] == len(scan.frames)


def test_once_the_model_has_caught_up_the_image_updates_at_the_cadence_again(scan, predictor):
    """Was: a publish that found frames queued held the next one back for ten times its length, however
    soon the queue drained: on a paced scan the image stood still for seconds at a time."""
    sink = _SlowSink()
    slow = _Slow(predictor.model, predictor.info, device="cpu")
    options = FAST.model_copy(update={"batch_size": 4, "publish_share_behind": 0.01})  # held back 10 s
    live = LiveReconstruction(slow, scan.grid, sink, {"raw_uid": "caught-up"}, options)
    sink.live = live
    # A burst of 0.6 s of work: however the threads interleave, more than a micro-batch is still
    # queued when the first publish ends (with 16 frames, 4 were left at times: a test of nothing).
    live.submit(scan.frame_ids[:24], scan.frames[:24], scan.positions_m[:24])
    for start in range(24, len(scan.frame_ids), 4):  # then a pace the model keeps up with
        time.sleep(0.3)
        live.submit(*(a[start : start + 4] for a in (scan.frame_ids, scan.frames, scan.positions_m)))
    # The model catches up within about a second (longer on a loaded machine); the old publisher
    # would have held the next publish back until 10 s after the first.
    deadline = time.monotonic() + 5
    while max(sink.frames, default=0) <= 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    during = list(sink.frames)
    live.finish("complete")
    assert live.wait(30)
    assert sink.spans[0][2] > 4, "the first publish did not find the model behind: the test proves nothing"
    assert max(during) > 24, sink.spans


def test_a_failed_micro_batch_of_a_burst_loses_only_itself(scan, predictor):
    flaky = FailingOnce(predictor.model, predictor.info, device="cpu")
    live = LiveReconstruction(
        flaky, scan.grid, _Recording(), {"raw_uid": "burst-fault"}, FAST.model_copy(update={"batch_size": 8})
    )
    live.submit(scan.frame_ids, scan.frames, scan.positions_m)
    live.finish("complete")
    assert live.wait(30)
    assert live.metadata["frames_done"] == len(scan.frames) - 8
    assert [e for e in live.metadata["errors"] if "injected fault" in e][0].startswith("batch of 8 frames failed")


def test_a_result_is_prepared_in_ten_round_trips_and_a_restarted_sink_keeps_its_arrays(server, scan):
    """Each round trip to Tiled costs the server 35-70 ms of CPU on a small machine, at the start of every run.

    Was 16: the result's key was asked for twice and each of the four arrays of a container just
    created was looked up before being created. A sink that finds the result (a restarted
    consumer) looks its arrays up and keeps them.
    """
    client = from_uri(server.uri)
    requests: list[str] = []
    client.context.http_client.event_hooks["request"].append(lambda r: requests.append(f"{r.method} {r.url.path}"))
    TiledSink(client, "run-warm-up").prepare(scan.grid.shape, trust=True, metadata={})  # ``processed`` exists from here
    requests.clear()
    TiledSink(client, "run-trips").prepare(scan.grid.shape, trust=True, metadata={"raw_uid": "run-trips"})
    assert len(requests) <= 10, requests
    assert sum(r.startswith("POST") for r in requests) == 6  # the run's container, the result, four arrays

    requests.clear()
    again = TiledSink(client, "run-trips")
    again.prepare(scan.grid.shape, trust=True, metadata={"raw_uid": "run-trips"})
    assert not [r for r in requests if r.startswith("POST")], requests  # the four arrays found, none made again


def test_large_results_are_stored_in_tiles_and_a_block_patched_into_them_reads_back_exactly(server):
    """A patch rewrites every stored chunk it touches: one chunk made each publish cost the whole image.

    Tiles divide the side (tiled's zarr storage pads a smaller last chunk); a prime side stays whole.
    """
    from bluesky_ptychonn.core.geometry import ObjectGrid
    from bluesky_ptychonn.core.stitching import StitchedImage
    from bluesky_ptychonn.live.sink import read_image

    shape = (1222, 401)  # 2 x 611 and a prime
    grid = ObjectGrid(shape, 1e-8, (0.0, 0.0))
    client = from_uri(server.uri)
    sink = TiledSink(client, "run-tiles")
    expected = np.random.default_rng(0).random(shape, dtype=np.float32)
    sink.publish(StitchedImage(expected, expected, expected, grid, 1, trust=expected), {"frames_done": 1})
    block = np.full((130, 150), -1.0, np.float32)  # across the tile boundary at row 611
    sink.publish(StitchedImage(block, block, block, grid, 2, trust=block, offset=(550, 200)), {"frames_done": 2})
    expected[550:680, 200:350] = -1.0
    node = client["processed"]["run-tiles"]["ptychonn"]
    assert node["amplitude"].chunks == ((611, 611), (401,))
    arrays, metadata = read_image(node)
    for key in ("amplitude", "phase", "weight", "trust"):
        assert arrays[key].shape == shape and np.array_equal(arrays[key], expected), key
    assert metadata["frames_done"] == 2


def test_the_embedded_servers_streaming_cache_keeps_the_last_writes_not_an_hours(server):
    """tiled keeps each write's payload for websocket subscribers: in the scan's process, only the last few."""
    from bluesky_ptychonn.archive.servers import STREAM_CACHE_ENTRIES, STREAM_CACHE_TTL_S
    from bluesky_ptychonn.core.geometry import ObjectGrid
    from bluesky_ptychonn.core.stitching import StitchedImage

    grid = ObjectGrid((40, 40), 1e-8, (0.0, 0.0))
    sink = TiledSink(from_uri(server.uri), "run-stream-cache")
    image = np.ones((40, 40), np.float32)
    for k in range(1, 25):  # four patches and two metadata writes each: more than the cache keeps
        sink.publish(StitchedImage(image, image, image, grid, k, trust=image), {"frames_done": k})
    cache = server.catalog.context.streaming_cache._datastore._data_cache  # still written, for subscribers
    assert 0 < len(cache) <= STREAM_CACHE_ENTRIES and cache.ttl == STREAM_CACHE_TTL_S


def test_the_arrays_of_a_publish_are_patched_side_by_side_and_a_failed_one_fails_the_publish(server, scan, monkeypatch):
    """Was: one patch after another, each a round trip of 70-150 ms on a busy 2-core server.

    Still so, by default, to a server in this process (the embedded one), whose requests would hold
    the inference thread off Python's lock.
    """
    from tiled.client.array import ArrayClient

    import bluesky_ptychonn.live.sink as sinks
    from bluesky_ptychonn.core.stitching import StitchedImage
    from bluesky_ptychonn.live.sink import read_image

    client = from_uri(server.uri)
    assert not TiledSink(client, "run-side-by-side").side_by_side  # the session's server runs in this process
    monkeypatch.setattr(sinks, "IN_PROCESS_SERVERS", set())  # as if it ran on its own
    sink = TiledSink(client, "run-side-by-side")
    assert sink.side_by_side
    shape = scan.grid.shape

    def publish(k):
        image = np.full(shape, float(k), np.float32)
        sink.publish(StitchedImage(image, image, image, scan.grid, k, trust=image), {"frames_done": k})

    publish(1)
    together = threading.Barrier(4, timeout=10)  # broken (and the publish fails) unless all four are in flight at once
    patch = ArrayClient.patch

    def patch_together(self, *args, **kwargs):
        together.wait()
        if self.item["id"] == "weight" and failing:
            raise ConnectionError("injected: the weight's patch is lost")
        return patch(self, *args, **kwargs)

    monkeypatch.setattr(ArrayClient, "patch", patch_together)
    failing = True
    with pytest.raises(ConnectionError):
        publish(2)
    node = client["processed"]["run-side-by-side"]["ptychonn"]
    assert node.metadata["publish_seq"] % 2 == 1  # readers wait: the arrays hold two publishes
    together.reset()
    failing = False
    publish(3)
    arrays, md = read_image(node)
    assert {float(v) for a in arrays.values() for v in (a.min(), a.max())} == {3.0} and md["frames_done"] == 3


def test_the_first_image_goes_out_once_stitched_not_a_cadence_after_the_result_was_prepared(scan, predictor):
    """Was: a publisher pass with nothing new still waited a whole cadence, so the first image came a cadence late."""
    sink = _Recording()
    live = LiveReconstruction(
        predictor, scan.grid, sink, {"raw_uid": "first"}, FAST.model_copy(update={"publish_interval_s": 60})
    )
    assert sink.prepared.wait(10)
    time.sleep(0.3)  # the publisher has found nothing to publish and waits
    live.submit(scan.frame_ids[:8], scan.frames[:8], scan.positions_m[:8])
    assert sink.published.wait(10)
    live.finish("complete")
    assert live.wait(30)


def test_on_the_cpu_a_default_predictor_infers_a_live_micro_batch_in_one_forward(scan, predictor):
    """Was: 16 frames a forward on the CPU, four forwards a micro-batch of 64, and after each op the
    inference thread waits its turn for the interpreter lock behind the scan's threads and the Tiled
    server (``benchmarks/results/ab-forward-batch/``)."""
    forwards = []
    hook = predictor.model.register_forward_hook(lambda module, args, out: forwards.append(len(args[0])))
    try:
        options = FAST.model_copy(update={"batch_size": LiveOptions().batch_size})
        live = LiveReconstruction(predictor, scan.grid, None, {"raw_uid": "one-forward"}, options)
        frames, positions = np.concatenate([scan.frames] * 2), np.concatenate([scan.positions_m] * 2)
        live.submit(np.arange(len(frames)), frames, positions)  # 72 frames: a micro-batch of 64, then 8
        live.finish("complete")
        live.wait(30)
    finally:
        hook.remove()
    assert live.metadata["frames_done"] == 72
    assert forwards == [64, 8]
