"""Refinement: pty-chi seeded with the live PtychoNN image, written to ``processed/<uid>/refined``.

Real RunEngine, simulated devices writing HDF5, the session's in-process Tiled server, a tiny
untrained network and real pty-chi; 32-pixel frames, 4 x 6 scans and a few epochs, so each test
takes seconds.
"""

import json
import os
import signal
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from bluesky import RunEngine

from bluesky_ptychonn import schema
from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.labels import write_iterative
from bluesky_ptychonn.archive.refine import refine_run, refine_runs
from bluesky_ptychonn.archive.refine_worker import RefineWorker
from bluesky_ptychonn.archive.servers import ensure_raw_catalog, subscribe_archive
from bluesky_ptychonn.cli import main
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.iterative import IterativeOptions, IterativeResult
from bluesky_ptychonn.core.refine import seed_object
from bluesky_ptychonn.core.stitching import StitchedImage
from bluesky_ptychonn.errors import ConfigurationError, RunError
from bluesky_ptychonn.live.callback import PtychoNNCallback

pytest.importorskip("ptychi")
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")

STEP_M = 2e-7
SHAPE = (4, 6)
FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.1, retry_s=0.1)
FEW = IterativeOptions(engine="lsqml", epochs=8, device="cpu")
# A refinement the test stops: far more epochs than it can run before it is stopped. 400 could all
# end within the half second the interrupt test waits, on a fast moment of the 2-core CI machine.
LONG = FEW.model_copy(update={"epochs": 20_000, "stop_tolerance": None})


@pytest.fixture
def run_engine(tiled_server):
    """A RunEngine archiving into the session's Tiled server."""
    engine = RunEngine({})
    subscribe_archive(engine, tiled_server.client)
    return engine


@pytest.fixture
def devices(tiled_server, make_devices, tmp_path):
    return make_devices(tiled_server.data_dir / tmp_path.name)


def _scan(devices, **md):
    stage, detector = devices
    return ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=SHAPE, exposure_s=2e-3, md=md)


def _live_run(tiled_server, run_engine, devices, checkpoint, **callback_kwargs):
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint, tiled_server.client, device="cpu", data_roots=[tiled_server.data_dir], live=FAST, **callback_kwargs
    )
    run_engine.subscribe(callback)
    (uid,) = run_engine(_scan(devices))
    assert callback.wait(uid, 60)
    return uid


def _refined(client, uid):
    node = client["processed"][uid]["refined"]
    return {k: node[k].read() for k in node}, dict(node.metadata)


def test_refine_starts_from_the_live_image_and_writes_the_refined_result(tiled_server, run_engine, devices, checkpoint):
    client = tiled_server.client
    uid = _live_run(tiled_server, run_engine, devices, checkpoint)
    preview = dict(client["processed"][uid]["ptychonn"].metadata)

    md = refine_run(tiled_server.raw[uid], client, options=FEW)

    arrays, stored = _refined(client, uid)
    assert md["path"] == f"processed/{uid}/refined" and stored["status"] == "complete"
    assert set(arrays) == {"amplitude", "phase", "weight", "trust"}  # the preview's layout
    assert stored["trust"]["available"] and stored["trust"]["median"] < preview["trust"]["median"]
    grid = ObjectGrid.from_metadata(preview["grid"])
    assert stored["grid"] == preview["grid"]  # pixel for pixel with the live image
    for array in arrays.values():
        assert array.shape == grid.shape and array.dtype == np.float32
    assert np.isfinite(arrays["trust"][arrays["weight"] > 0.5 * arrays["weight"].max()]).all()
    assert stored["seed"]["source"] == "ptychonn" and stored["seed"]["path"] == f"processed/{uid}/ptychonn"
    assert stored["seed"]["model_hash"] == preview["model_hash"] and stored["seed"]["replayed"] is False
    assert stored["probe"] == {
        "source": "ptychography section",
        "refined": False,
        "description": stored["probe"]["description"],
    }
    assert stored["engine"] == "lsqml" and stored["max_epochs"] == 8 and stored["epochs"] == 8
    assert stored["stopped_by"] == "max_epochs" and len(stored["error_per_epoch"]) == 8
    assert stored["raw_uid"] == uid and stored["device"] == "cpu" and stored["package_version"]
    assert stored["started"] <= stored["finished"] == stored["updated"]
    assert stored["error_per_epoch"][-1] < stored["error_per_epoch"][0]

    # A flat start on the same run is the baseline; it lands on the run's grid.
    flat = refine_run(tiled_server.raw[uid], client, options=FEW, seed="flat")
    assert flat["seed"] == {"source": "flat"} and flat["status"] == "complete"


def test_a_running_refinement_records_its_progress_so_that_it_never_looks_stale(
    tiled_server, run_engine, devices, checkpoint, monkeypatch
):
    from bluesky_ptychonn.archive import refine

    client = tiled_server.client
    uid = _live_run(tiled_server, run_engine, devices, checkpoint)
    monkeypatch.setattr(refine, "HEARTBEAT_S", 0.05)
    # Epochs of this small scan can all end between two beats: slowed to 20 ms each, several beats fall among them.
    counted = refine._Heartbeat.epoch_done

    def slow_epoch(self, *args):
        time.sleep(0.02)
        return counted(self, *args)

    monkeypatch.setattr(refine._Heartbeat, "epoch_done", slow_epoch)
    seen: list[dict] = []
    worker = threading.Thread(
        target=refine_run,
        args=(tiled_server.raw[uid], client),
        kwargs={"options": FEW.model_copy(update={"epochs": 30})},
    )
    worker.start()
    while worker.is_alive():
        try:
            md = dict(client["processed"][uid]["refined"].metadata)
        except KeyError:  # not marked yet
            md = {}
        if md.get("status") == "running" and "epochs_done" in md:
            seen.append(md)
        time.sleep(0.02)
    worker.join()
    assert seen, "no progress seen while the refinement ran"
    assert all(0 <= md["epochs_done"] <= 30 and md["updated"] > md["started"] for md in seen)
    done = [md["epochs_done"] for md in seen]
    assert done == sorted(done) and done[-1] > 0, done
    _, stored = _refined(client, uid)
    assert stored["status"] == "complete" and stored["epochs_done"] == stored["epochs"]


def test_the_heartbeat_beats_between_epochs_and_never_after_it_stops(tiled_server, monkeypatch):
    """An epoch longer than the stale limit (a very large scan on a CPU) must not make the refinement look dead."""
    from bluesky_ptychonn.archive import refine
    from bluesky_ptychonn.live.sink import TiledSink

    uid = uuid.uuid4().hex
    sink = TiledSink(tiled_server.client, uid, "refined")
    sink.write_metadata({"status": "running", "started": time.time(), "updated": time.time()})
    node = tiled_server.client["processed"][uid]["refined"]
    marked = node.metadata["updated"]
    monkeypatch.setattr(refine, "HEARTBEAT_S", 0.05)
    beat = refine._Heartbeat(sink, uid)
    try:
        deadline = time.monotonic() + 10
        while node.refresh().metadata["updated"] == marked and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.metadata["updated"] > marked and node.metadata["epochs_done"] == 0  # no epoch yet, still alive
        assert beat.epoch_done(3, 0.1, None) is False  # the monitor never stops pty-chi
        while node.refresh().metadata["epochs_done"] != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.metadata["epochs_done"] == 3 and node.metadata["status"] == "running"
    finally:
        beat.stop()
    last = node.refresh().metadata["updated"]
    time.sleep(0.3)
    assert node.refresh().metadata["updated"] == last


def test_the_seed_is_the_preview_where_covered_and_free_space_elsewhere():
    grid = ObjectGrid((4, 5), 1e-7, (0.0, 0.0))
    weight = np.zeros(grid.shape, np.float32)
    weight[1:3, 1:4] = 1.0
    weight[0, 0] = 0.05  # below the coverage fraction
    preview = StitchedImage(
        amplitude=np.full(grid.shape, 0.5, np.float32),
        phase=np.full(grid.shape, 0.25, np.float32),
        weight=weight,
        grid=grid,
        frames=1,
    )
    obj = seed_object(preview)
    assert obj.dtype == np.complex64 and obj.shape == grid.shape
    np.testing.assert_allclose(obj[1:3, 1:4], 0.5 * np.exp(0.25j), rtol=1e-6)
    assert obj[0, 0] == 1 and obj[3, 4] == 1
    nan = StitchedImage(preview.amplitude.copy(), preview.phase, weight, grid, 1)
    nan.amplitude[2, 2] = np.nan
    with pytest.raises(ConfigurationError, match="NaN"):
        seed_object(nan)
    with pytest.raises(ConfigurationError, match="shape"):
        seed_object(StitchedImage(preview.amplitude[:3], preview.phase, weight, grid, 1))
    with pytest.raises(ConfigurationError, match="positive"):
        seed_object(StitchedImage(preview.amplitude, preview.phase, np.zeros_like(weight), grid, 1))


def test_a_run_without_a_live_result_is_an_error_unless_a_model_can_make_one(
    tiled_server, run_engine, devices, checkpoint, monkeypatch, capsys
):
    client = tiled_server.client
    (uid,) = run_engine(_scan(devices))  # archived, no live callback
    run = tiled_server.raw[uid]
    with pytest.raises(RunError, match=rf"run {uid} has no live PtychoNN result .*--checkpoint.*flat"):
        refine_run(run, client, options=FEW)
    # Nothing written before the checks pass (on a fresh server not even the `processed` container).
    assert "refined" not in (client["processed"].get(uid, {}) if "processed" in client else {})

    monkeypatch.setenv("TEST_TILED_KEY", tiled_server.server.api_key)
    common = ["--tiled-uri", tiled_server.server.uri.split("?")[0], "--api-key-env", "TEST_TILED_KEY"]
    few = ["--epochs", "4", "--device", "cpu", "--engine", "lsqml"]
    # A run of the batch that cannot be refined is reported in its summary (exit 1); the batch goes on.
    assert main(["refine", uid, *common, *few]) == 1
    (failed,) = json.loads(capsys.readouterr().out)
    assert failed["raw_uid"] == uid and "--checkpoint" in failed["error"]
    missing = str(uuid.uuid4())
    assert main(["refine", missing, *common, *few]) == 2
    assert missing in capsys.readouterr().err

    # With a model, the run is replayed first to make the seed, and the metadata says so.
    assert main(["refine", uid, *common, *few, "--checkpoint", str(checkpoint)]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["status"] == "complete" and summary["seed"] == "ptychonn" and summary["seed_replayed"] is True
    assert summary["epochs"] == 4 and summary["path"] == f"processed/{uid}/refined"
    _, stored = _refined(client, uid)
    assert stored["seed"]["replayed"] is True
    assert stored["seed"]["model_hash"] == Predictor.from_checkpoint(checkpoint, device="cpu").info.content_hash
    assert dict(client["processed"][uid]["ptychonn"].metadata)["source"] == "replay"


def test_a_run_without_a_probe_is_an_error_unless_one_is_stored(tiled_server, devices):
    from bluesky_tiled_plugins import TiledWriter

    client = tiled_server.client
    writer = TiledWriter(ensure_raw_catalog(client))

    def without_probe(name, doc):  # a measured run: its start document describes no probe
        if name == "start":
            doc = {**doc, "ptychography": {k: v for k, v in doc["ptychography"].items() if k != "probe"}}
        writer(name, doc)

    run_engine = RunEngine({})
    run_engine.subscribe(without_probe)
    (uid,) = run_engine(_scan(devices))
    run = tiled_server.raw[uid]
    with pytest.raises(RunError, match=rf"run {uid} has no probe.*processed/{uid}/iterative"):
        refine_run(run, client, options=FEW, seed="flat")

    # A probe stored with an iterative reconstruction (reconstructed once with a probe from elsewhere) serves.
    section = dict(run.metadata["start"]["ptychography"])
    probe = schema.probe({**section, "probe": {"kind": "gaussian", "fwhm_px": 8}})
    grid = ObjectGrid((8, 8), section["pixel_size_m"], (0.0, 0.0))
    ones = np.ones(grid.shape, np.float32)
    stored = IterativeResult(np.ones(grid.shape, np.complex64), probe, ones, grid, 1, "lsqml", 1, 1.0, [1.0], 0, "cpu")
    write_iterative(client, uid, stored, {"raw_uid": uid, "photons_per_frame": section["photons_per_frame"]})
    md = refine_run(run, client, options=FEW.model_copy(update={"epochs": 2}), seed="flat")
    assert md["status"] == "complete" and md["probe"]["source"] == f"processed/{uid}/iterative"


def test_a_failed_preview_cannot_seed_and_a_failure_after_the_marker_is_recorded(
    tiled_server, run_engine, devices, checkpoint
):
    client = tiled_server.client
    uid = _live_run(tiled_server, run_engine, devices, checkpoint)
    node = client["processed"][uid]["ptychonn"]
    node.update_metadata({**dict(node.metadata), "status": "failed", "errors": ["model did not fit"]})
    with pytest.raises(RunError, match=r"cannot seed.*'failed'.*model did not fit"):
        refine_runs(tiled_server.raw, [uid], client, options=FEW)
    node.update_metadata({**dict(node.metadata), "status": "complete"})

    # pty-chi refuses CUDA on this machine only once the marker is written: the result says failed, not running.
    if __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ConfigurationError, match="CUDA"):
        refine_run(tiled_server.raw[uid], client, options=FEW.model_copy(update={"device": "cuda"}))
    arrays, stored = _refined(client, uid)
    assert stored["status"] == "failed" and "CUDA" in stored["errors"][0] and not arrays


def test_runs_are_refined_automatically_after_their_final_live_image(
    tiled_server, run_engine, devices, checkpoint, caplog
):
    caplog.set_level("INFO", logger="bluesky_ptychonn.archive.refine_worker")
    # Not niced (that has a test of its own): at +19 the child gets next to no CPU while another test
    # worker or a demo keeps both cores busy, and the waits below are bounded.
    worker = RefineWorker(tiled_server.client, options=FEW.model_copy(update={"epochs": 3}), poll_s=0.05, nice=0)
    try:
        uid = _live_run(tiled_server, run_engine, devices, checkpoint, after_final=worker.submit)
        assert worker.wait(120), (worker.results, caplog.text[-2000:])
    finally:
        worker.close(60)
    assert worker.results[uid]["status"] == "complete", worker.results[uid]
    arrays, stored = _refined(tiled_server.client, uid)
    assert stored["status"] == "complete" and stored["epochs"] == 3 and arrays["amplitude"].any(), stored
    assert stored["seed"]["source"] == "ptychonn"
    line = f"run {uid[:8]}: refined, 3 epochs (stopped by max_epochs)"
    assert line in caplog.text, caplog.text[-2000:]  # the operator's line


def _nice_of_tasks(pid):
    """Nice value (field 19 of stat) of each thread of process ``pid`` that is still there."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                out.append(int(stat.read().rsplit(")", 1)[1].split()[16]))
        except OSError:  # the thread ended between the listing and the read
            pass
    return out


def _child_while_running(worker, client, uid, timeout=120):
    """The worker's child once its result says ``running`` (planned, pty-chi started), or None if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child = worker.child
        try:
            status = client["processed"][uid]["refined"].metadata.get("status")
        except KeyError:
            status = None
        if child is not None and status == "running":
            return child
        if uid in worker.results:
            return None
        time.sleep(0.05)
    raise AssertionError("the refinement did not start")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice values of threads: Linux")
def test_the_refinement_runs_in_a_child_process_whose_threads_all_yield(tiled_server, run_engine, devices):
    (uid,) = run_engine(_scan(devices))
    worker = RefineWorker(tiled_server.client, options=LONG, seed="flat", poll_s=0.05)
    try:
        worker.submit(uid)
        child = _child_while_running(worker, tiled_server.client, uid)
        assert child is not None, worker.results
        seen = _nice_of_tasks(child.pid)
        thread = os.getpriority(os.PRIO_PROCESS, worker._thread.native_id)
        key = tiled_server.client.context.api_key
        assert key and not any(key in arg for arg in child.args)  # the key goes in the environment
        child.kill()  # the rest of the epochs are not needed
        assert worker.wait(60)
    finally:
        worker.close(60)
    # Every thread of the child (pty-chi's, torch's OpenMP workers) at +19, the cap; the worker's own
    # thread in this process, which only waits, left where the process is.
    assert len(seen) >= 2 and set(seen) == {19}, seen
    assert thread == os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.parametrize(
    ("stop", "why"),
    [("kill", "exited with status -9"), ("terminate", "interrupted")],  # the OOM killer; a service manager
)
def test_a_refinement_process_that_is_stopped_leaves_a_failed_result_not_a_running_one(
    tiled_server, run_engine, devices, stop, why
):
    (uid,) = run_engine(_scan(devices))
    worker = RefineWorker(tiled_server.client, options=LONG, seed="flat", poll_s=0.05, nice=0)  # see the automatic test
    try:
        worker.submit(uid)
        child = _child_while_running(worker, tiled_server.client, uid)
        assert child is not None, worker.results
        getattr(child, stop)()
        assert worker.wait(60)
    finally:
        worker.close(60)
    assert worker.results[uid]["status"] == "failed" and why in worker.results[uid]["errors"][0]
    _, stored = _refined(tiled_server.client, uid)
    assert stored["status"] == "failed" and why in stored["errors"][0]


def test_interrupting_the_wait_for_the_run_in_progress_stops_the_child_which_says_so(tiled_server, run_engine, devices):
    (uid,) = run_engine(_scan(devices))
    worker = RefineWorker(tiled_server.client, options=LONG, seed="flat", poll_s=0.05, nice=0)  # see the automatic test
    worker.submit(uid)
    child = _child_while_running(worker, tiled_server.client, uid)
    assert child is not None, worker.results
    assert os.getpgid(child.pid) != os.getpgrp()  # a terminal's Ctrl-C reaches the consumer, not the child
    assert os.getsid(child.pid) == os.getsid(0)  # one session: its nice counts under the kernel's autogroups
    # The consumer's second Ctrl-C, while it waits in close(): a SIGINT to this process alone, with
    # Python's own handler (a pytest-xdist worker has its own).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            worker.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert worker.results[uid]["status"] == "failed"
    _, stored = _refined(tiled_server.client, uid)
    assert stored["status"] == "failed" and stored["errors"] == ["interrupted"]


def test_the_worker_records_a_run_that_never_arrives(tiled_server):
    missing = str(uuid.uuid4())
    worker = RefineWorker(tiled_server.client, options=FEW, run_timeout_s=0, poll_s=0.01)
    worker.submit(missing)  # returns at once
    assert worker.wait(30)
    worker.close(10)
    assert worker.results[missing]["status"] == "failed"
    stored = dict(tiled_server.client["processed"][missing]["refined"].metadata)
    assert stored["status"] == "failed" and "did not reach Tiled" in stored["errors"][0]


def test_replay_can_refine_what_it_replays(tiled_server, run_engine, devices, checkpoint):
    from bluesky_ptychonn.archive.replay import replay_runs

    (uid,) = run_engine(_scan(devices))
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    (result,) = replay_runs(
        tiled_server.raw, [uid], predictor, refine=FEW.model_copy(update={"epochs": 2}), progress=False
    )
    assert result["status"] == "complete" and result["refined"]["status"] == "complete"
    assert result["refined"]["seed"]["model_hash"] == result["model_hash"] and result["refined"]["epochs"] == 2
    with pytest.raises(ConfigurationError, match="seeds from"):
        replay_runs(tiled_server.raw, [uid], predictor, name="other", refine=True, progress=False)
