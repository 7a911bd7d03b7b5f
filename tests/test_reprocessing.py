"""Reprocessing many runs: a local two-worker Dask cluster with a failing run, and ``replay --incomplete``.

Real RunEngine and simulated devices writing HDF5 (or inline frames), the session's in-process
Tiled server, 32-pixel frames and a tiny untrained network.
"""

import json
import time
import uuid

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from test_callback import _inline_run
from test_shares import _scan

from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.replay import incomplete_runs
from bluesky_ptychonn.archive.servers import subscribe_archive
from bluesky_ptychonn.cli import main
from bluesky_ptychonn.live.sink import TiledSink


@pytest.fixture
def command(tiled_server, checkpoint, monkeypatch):
    """Arguments every command here needs; the key in an environment variable the workers inherit."""
    monkeypatch.setenv("TEST_TILED_KEY", tiled_server.server.api_key)
    uri = tiled_server.server.uri.split("?")[0]
    return ["--checkpoint", str(checkpoint), "--tiled-uri", uri, "--api-key-env", "TEST_TILED_KEY", "--device", "cpu"]


def _images(client, uid, name):
    node = client["processed"][uid][name]
    return {k: node[k].read() for k in ("amplitude", "phase", "weight")}


@pytest.mark.slow
def test_local_dask_workers_replay_a_query_and_report_the_run_that_fails(
    tiled_server, make_devices, tmp_path, command, capsys
):
    """``--workers 2``: a LocalCluster; the images equal one process's (test_deployment_guide checks that)."""
    run_engine = RunEngine({})
    subscribe_archive(run_engine, tiled_server.client)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
    tag = uuid.uuid4().hex
    scan = dict(step_m=2e-7, shape=(3, 4), exposure_s=2e-3, md={"campaign": tag})
    uids = [run_engine(ptycho_fly_scan(detector, stage, **scan))[0] for _ in range(2)]
    # A run whose frames the model cannot take (16 pixels, not 32): it fails, and only it.
    _, section = _scan()
    bad = _inline_run(np.zeros((4, 16, 16)), np.zeros((4, 2)), section, campaign=tag)
    archive = TiledWriter(tiled_server.client["raw"])
    for name, doc in bad:
        archive(name, doc)
    uids.append(bad[0][1]["uid"])

    assert main(["replay", f"start.campaign={tag}", "--workers", "2", "--name", "on-dask", *command]) == 1
    summaries = json.loads(capsys.readouterr().out)
    assert [s["raw_uid"] for s in summaries] == uids  # in the order of the selection
    assert all(s["status"] == "complete" and s["frames_done"] == 12 for s in summaries[:-1]), summaries
    assert "model expects" in summaries[-1]["error"] and "status" not in summaries[-1], summaries[-1]


def test_replay_incomplete_finishes_exactly_the_runs_without_a_final_live_result(tiled_server, command, capsys):
    client, scan_data = tiled_server.client, _scan()
    scan, section = scan_data
    tag = uuid.uuid4().hex
    archive = TiledWriter(client["raw"])
    states = ["missing", "complete", "interrupted", "fresh", "stale", "failed", "aborted", "acquiring"]
    uids = {}
    for state in states:
        docs = _inline_run(scan.frames, scan.positions_m, section, campaign=tag)
        for name, doc in docs[:-1] if state == "acquiring" else docs:  # "acquiring": no stop document yet
            archive(name, doc)
        uid = uids[state] = docs[0][1]["uid"]
        if state in ("missing", "acquiring"):
            continue
        status = {"fresh": "running", "stale": "running"}.get(state, state)
        updated = time.time() - (10_000 if state == "stale" else 0)
        TiledSink(client, uid).write_metadata({"raw_uid": uid, "status": status, "updated": updated, "source": "live"})

    runs = [client["raw"][uids[s]] for s in states]
    found = {run.metadata["start"]["uid"]: why for run, why in incomplete_runs(client, runs)}
    assert found == {uids[s]: s for s in ("missing", "interrupted", "stale", "failed")}

    selection = [f"start.campaign={tag}", "--incomplete"]
    assert main(["replay", *selection, "--dry-run", *command]) == 0
    assert {r["uid"] for r in json.loads(capsys.readouterr().out)} == set(found)
    # Finishing them (the same image as an uninterrupted run) is shown with a killed consumer's run in
    # test_service; here one of them, to see the selection act.
    assert main(["replay", *selection, "--uid", uids["missing"], *command]) == 0
    (finished,) = json.loads(capsys.readouterr().out)
    assert finished["raw_uid"] == uids["missing"] and finished["status"] == "complete", finished
    assert finished["frames_done"] == len(scan.frames)


def test_replay_with_compile_runs_the_graph_and_matches_eager_replays(tiled_server, command, capsys):
    """``--compile``: the worker's cached predictor runs a frozen graph; its image is eager's within rounding."""
    from bluesky_ptychonn.archive.cluster import load_predictor

    client = tiled_server.client
    scan, section = _scan()
    tag = uuid.uuid4().hex
    archive = TiledWriter(client["raw"])
    uids = []
    for _ in range(2):
        docs = _inline_run(scan.frames, scan.positions_m, section, campaign=tag)
        for name, doc in docs:
            archive(name, doc)
        uids.append(docs[0][1]["uid"])
    assert main(["replay", f"start.campaign={tag}", "--name", "eager", *command]) == 0
    capsys.readouterr()
    assert main(["replay", f"start.campaign={tag}", "--name", "compiled", "--compile", *command]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in summaries] == ["complete", "complete"], summaries
    checkpoint = command[command.index("--checkpoint") + 1]
    assert load_predictor(checkpoint, "cpu", compile=True).compiled  # built, used, not dropped for eager
    for uid in uids:
        eager, compiled = _images(client, uid, "eager"), _images(client, uid, "compiled")
        np.testing.assert_allclose(compiled["weight"], eager["weight"], rtol=1e-5)
        covered = eager["weight"] > 0.1 * eager["weight"].max()
        phase = np.angle(np.exp(1j * (compiled["phase"] - eager["phase"])))[covered]
        assert np.abs(phase).max() < 0.05, np.abs(phase).max()
