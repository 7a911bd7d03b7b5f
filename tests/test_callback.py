"""The live callback on a real RunEngine with the simulated devices and a real in-process Tiled server."""

import threading
import time

import event_model
import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plans as bp
from bluesky.utils import RunEngineInterrupted
from ophyd.sim import det
from tiled_servers import free_port, start_server

from bluesky_ptychonn import schema
from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.servers import subscribe_archive
from bluesky_ptychonn.archive.truth import read_simulation_truth
from bluesky_ptychonn.core.checkpoint import CheckpointInfo, save_checkpoint
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.metrics import compare
from bluesky_ptychonn.core.network import PtychoNN
from bluesky_ptychonn.core.reconstruct import reconstruct
from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback

STEP_M = 2e-7
FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.1, retry_s=0.1)


@pytest.fixture
def live_setup(tiled_server, make_devices, tmp_path, checkpoint):
    """(RunEngine, callback, stage, detector) with TiledWriter and the PtychoNN callback subscribed.

    The detector is paced: frames come at the exposure rate, as from a real one.
    """
    run_engine = RunEngine({})
    subscribe_archive(run_engine, tiled_server.client)
    data = tiled_server.data_dir / tmp_path.name
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint, tiled_server.client, device="cpu", data_roots=[tiled_server.data_dir], live=FAST
    )
    run_engine.subscribe(callback)  # the one line a beamline adds
    stage, detector = make_devices(data, paced=True)
    return run_engine, callback, stage, detector


def _result(client, uid):
    node = client["processed"][uid]["ptychonn"]
    return {k: node[k].read() for k in ("amplitude", "phase", "weight")}, dict(node.metadata)


def test_live_result_equals_offline_reconstruction(tiled_server, live_setup, checkpoint):
    run_engine, callback, stage, detector = live_setup
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(6, 8), exposure_s=2e-3))
    assert callback.wait(uid, 60)
    arrays, md = _result(tiled_server.client, uid)
    assert md["status"] == "complete" and md["frames_done"] == 48 and md["errors"] == []
    assert md["raw_uid"] == uid and md["model_hash"] == callback.predictor.info.content_hash
    assert md["package_version"] and md["timings"]["inference_s"] > 0

    # The same frames, the same model, reconstructed offline from the detector's file.
    with h5py.File(detector.path, "r") as f:
        frames, positions = f["entry/data/data"][()], f["entry/data/positions_m"][()]
    grid = ObjectGrid.from_metadata(md["grid"])
    offline = reconstruct(Predictor.from_checkpoint(checkpoint, device="cpu"), frames, positions, grid=grid)
    np.testing.assert_allclose(arrays["amplitude"], offline.amplitude, atol=1e-5)
    np.testing.assert_allclose(arrays["phase"], offline.phase, atol=1e-5)
    np.testing.assert_allclose(arrays["weight"], offline.weight, rtol=1e-5)

    # The result sits on the sample-aligned grid of the run's truth, so quality is one call away
    # (an untrained model here: the figure is reported, not judged).
    truth, truth_grid = read_simulation_truth(tiled_server.raw[uid])
    assert truth_grid == grid
    quality = compare(
        arrays["amplitude"],
        arrays["phase"],
        np.abs(truth),
        np.angle(truth),
        arrays["weight"] > 0.5 * arrays["weight"].max(),
    )
    assert set(quality) >= {"amplitude_ssim", "phase_ssim"}
    print("untrained tiny model against truth:", {k: round(v, 3) for k, v in quality.items()})


def test_reader_sees_partial_coverage_grow_during_the_scan(tiled_server, live_setup):
    run_engine, callback, stage, detector = live_setup
    seen = []
    done = threading.Event()
    uid_box = []
    run_engine.subscribe(lambda name, doc: uid_box.append(doc["uid"]), "start")

    def read_after_each_partial_publish():
        # Read Tiled whenever the callback has published more frames, as a user watching would.
        while not (uid_box and uid_box[0] in callback.runs and callback.runs[uid_box[0]].live) and not done.is_set():
            time.sleep(0.02)
        last = 0
        while not done.is_set():
            live = callback.runs[uid_box[0]].live
            published = live.publish_log[-1][1] if live.publish_log else 0
            if published > last:
                try:
                    node = tiled_server.client["processed"][uid_box[0]]["ptychonn"]
                    seen.append((node.metadata["status"], int((node["weight"].read() > 0).sum())))
                    last = published
                except Exception:  # caught between two requests of a publish: read again
                    pass
            time.sleep(0.05)

    reader = threading.Thread(target=read_after_each_partial_publish)
    reader.start()
    try:
        # 16 lines of 8 at 60 ms a frame: about 8 s of scanning, several snapshots on the way.
        (uid,) = run_engine(
            ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(16, 8), exposure_s=0.06, flush_period_s=0.1)
        )
        assert callback.wait(uid, 60)
    finally:
        done.set()
        reader.join()
    arrays, md = _result(tiled_server.client, uid)
    running = [covered for status, covered in seen if status == "running"]
    assert len(set(running)) >= 2, seen  # two different partial coverages read while the scan ran
    assert running == sorted(running) and running[-1] <= (arrays["weight"] > 0).sum()
    assert md["status"] == "complete"


def test_aborted_run_keeps_the_partial_image(tiled_server, live_setup):
    run_engine, callback, stage, detector = live_setup
    detector.settings = detector.settings.updated(chunk_frames=4)
    frames_seen = threading.Event()
    run_engine.subscribe(lambda name, doc: frames_seen.set(), "stream_datum")

    def abort_when_frames_arrive():
        if frames_seen.wait(30):
            run_engine.abort("operator abort")

    aborter = threading.Thread(target=abort_when_frames_arrive)
    aborter.start()
    with pytest.raises(RunEngineInterrupted):  # 400 frames at 10 ms: four seconds if nothing stops it
        run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(20, 20), exposure_s=0.01))
    aborter.join()
    uid = next(iter(callback.runs))
    assert callback.wait(uid, 60)
    arrays, md = _result(tiled_server.client, uid)
    assert md["status"] == "aborted" and md["exit_status"] == "abort"
    assert 0 < md["frames_done"] < 400 and arrays["weight"].any()


def test_other_runs_are_ignored(tiled_server, live_setup):
    run_engine, callback, _, _ = live_setup
    (uid,) = run_engine(bp.count([det], 3))
    run = callback.runs[uid]
    assert not run.active and run.live is None and not run.errors
    assert "processed" not in tiled_server.client or uid not in tiled_server.client["processed"]


def test_files_outside_the_data_roots_are_never_opened(tiled_server, make_devices, tmp_path, checkpoint):
    run_engine = RunEngine({})
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint, tiled_server.client, device="cpu", data_roots=[tmp_path / "elsewhere"], live=FAST
    )
    run_engine.subscribe(callback)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(3, 4), exposure_s=2e-3))
    assert callback.wait(uid, 60)  # the scan succeeded; the analysis says why it has nothing
    _, md = _result(tiled_server.client, uid)
    assert md["frames_done"] == 0 and md["status"] == "failed"
    assert any("outside the configured data roots" in e for e in md["errors"])


def _inline_run(frames, positions, section, frame_ids=None, uid=None, **start_metadata):
    """Documents of a run whose frames travel inline in one EventPage (no files)."""
    bundle = event_model.compose_run(uid=uid, metadata={"ptychography": section, **start_metadata})
    n = frames.shape[-1]
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "diffraction": {"source": "test", "dtype": "array", "shape": [n, n]},
            "positions_m": {"source": "test", "dtype": "array", "shape": [2]},
            "frame_id": {"source": "test", "dtype": "integer", "shape": []},
        },
    )
    ids = np.arange(len(frames)) if frame_ids is None else frame_ids
    page = desc.compose_event_page(
        data={"diffraction": list(frames), "positions_m": list(positions), "frame_id": list(ids)},
        timestamps={k: [0.0] * len(frames) for k in ("diffraction", "positions_m", "frame_id")},
        seq_num=list(range(1, len(frames) + 1)),
        time=[0.0] * len(frames),
        validate=False,
    )
    return [
        ("start", bundle.start_doc),
        ("descriptor", desc.descriptor_doc),
        ("event_page", page),
        ("stop", bundle.compose_stop()),
    ]


def test_inline_frames_and_malformed_documents(checkpoint):
    from bluesky_ptychonn.core.config import DetectorGeometry
    from bluesky_ptychonn.sim.physics import simulate_scan

    scan = simulate_scan(
        geometry=DetectorGeometry(frame_pixels=32), scan_shape=(4, 4), probe={"kind": "gaussian", "fwhm_px": 8}
    )
    step = scan.metadata["scan"]["step_m"]
    section = {
        "version": schema.VERSION,
        **DetectorGeometry(frame_pixels=32).model_dump(),
        "scan": {"shape": [4, 4], "step_m": step, "center_m": [0, 0]},
    }
    callback = PtychoNNCallback(Predictor.from_checkpoint(checkpoint, device="cpu"), None, CallbackConfig(live=FAST))
    # Garbage and out-of-order documents first: logged, never raised.
    callback("stream_datum", {"stream_resource": "nope", "indices": {"start": 0, "stop": 1}})
    callback("event_page", {"descriptor": "unknown"})
    callback("banana", {})
    callback("start", "not a dict")
    docs = _inline_run(scan.frames, scan.positions_m, section, frame_ids=scan.frame_ids[::-1].copy())
    for name, doc in docs:
        callback(name, doc)
    uid = docs[0][1]["uid"]
    assert callback.wait(uid, 60)
    live = callback.runs[uid].live
    assert live.metadata["status"] == "complete" and live.metadata["frames_done"] == 16
    # A second run with a wrong frame shape records the error and completes the scan.
    bad = _inline_run(np.zeros((4, 16, 16)), scan.positions_m[:4], section)
    for name, doc in bad:
        callback(name, doc)
    bad_uid = bad[0][1]["uid"]
    assert callback.wait(bad_uid, 60)
    assert callback.runs[bad_uid].live.metadata["frames_dropped"] == 4


def test_a_compiled_callback_serves_every_run_of_its_session_with_the_graph_built_at_load(
    tiled_server, make_devices, tmp_path, checkpoint
):
    """``compile=True``: the graph is built as the callback loads the model; the runs compile nothing
    more, on the engine's worker thread, and their images are eager's within rounding."""
    from torch._dynamo.utils import counters

    run_engine = RunEngine({})
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint, tiled_server.client, device="cpu", compile=True, data_roots=[tiled_server.data_dir], live=FAST
    )
    assert callback.predictor.compiled
    built = sum(counters["stats"].values())
    run_engine.subscribe(callback)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
    eager = Predictor.from_checkpoint(checkpoint, device="cpu")
    for _ in range(2):
        (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(4, 5), exposure_s=2e-3))
        assert callback.wait(uid, 60)
        arrays, md = _result(tiled_server.client, uid)
        assert md["status"] == "complete" and md["frames_done"] == 20 and md["errors"] == []
        with h5py.File(detector.path, "r") as f:
            frames, positions = f["entry/data/data"][()], f["entry/data/positions_m"][()]
        offline = reconstruct(eager, frames, positions, grid=ObjectGrid.from_metadata(md["grid"]))
        covered = offline.covered(0.1)
        assert np.abs(np.angle(np.exp(1j * (arrays["phase"] - offline.phase)))[covered]).max() < 0.05
    assert sum(counters["stats"].values()) == built, dict(counters["stats"])


def test_a_model_that_does_not_fit_the_run_leaves_a_failed_result(tiled_server, make_devices, tmp_path):
    net = NetworkConfig(input_pixels=64, base_channels=4, depth=2)
    path = tmp_path / "model64.safetensors"
    save_checkpoint(path, PtychoNN(net).eval(), CheckpointInfo(net, PreprocessRecipe(frame_shape=(64, 64))))
    run_engine = RunEngine({})
    callback = PtychoNNCallback.from_checkpoint(
        path, tiled_server.client, device="cpu", data_roots=[tiled_server.data_dir], live=FAST
    )
    run_engine.subscribe(callback)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)  # 32-pixel frames
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(3, 4), exposure_s=2e-3))
    assert callback.flush(30)
    md = dict(tiled_server.client["processed"][uid]["ptychonn"].metadata)
    assert md["status"] == "failed" and any("expects (64, 64)" in e for e in md["errors"])


def test_tiled_goes_away_mid_scan_the_scan_succeeds_and_the_final_image_is_complete(
    tiled_server, make_devices, tmp_path, checkpoint
):
    """The results server stops while the stage moves and comes back after the scan."""
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    port = free_port()
    results = SimpleTiledServer(directory=tmp_path / "results", port=port, api_key=tiled_server.server.api_key)
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint, from_uri(results.uri), device="cpu", data_roots=[tmp_path], live=FAST
    )
    run_engine = RunEngine({})
    run_engine.subscribe(callback)
    stage, detector = make_devices(tmp_path / "data", paced=True)
    uid_box = []
    run_engine.subscribe(lambda name, doc: uid_box.append(doc["uid"]), "start")

    def stop_server_once_frames_are_in():
        while not (
            uid_box
            and callback.runs.get(uid_box[0])
            and callback.runs[uid_box[0]].live
            and callback.runs[uid_box[0]].live.publish_log
        ):
            time.sleep(0.02)
        results.close()

    stopper = threading.Thread(target=stop_server_once_frames_are_in)
    stopper.start()
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(10, 8), exposure_s=0.05))
    stopper.join()
    assert run_engine.state == "idle"  # the scan itself succeeded
    live = callback.runs[uid].live
    assert not live.wait(0.2)  # final image still pending: the server is down
    results = start_server(
        SimpleTiledServer, directory=tmp_path / "results", port=port, api_key=tiled_server.server.api_key
    )
    try:
        assert callback.wait(uid, 120)
        arrays, md = _result(from_uri(results.uri), uid)
        assert md["status"] == "complete" and md["frames_done"] == 80
        np.testing.assert_allclose(arrays["amplitude"], live.snapshot().amplitude)
        assert arrays["weight"].shape == tuple(md["grid"]["shape"])
    finally:
        results.close()
