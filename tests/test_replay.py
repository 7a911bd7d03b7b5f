"""Replay of archived runs through Tiled, run selection through databroker, and their bad inputs.

Real RunEngine, simulated devices writing HDF5, the session's in-process Tiled server; 32-pixel
frames and a tiny untrained network, so every test runs in seconds.
"""

import json
import uuid

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plans as bp
from databroker.queries import TimeRange
from ophyd.sim import det
from tiled.queries import Key

from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.replay import replay_run, replay_runs
from bluesky_ptychonn.archive.runs import queries_for, select, select_matching, where
from bluesky_ptychonn.archive.servers import subscribe_archive
from bluesky_ptychonn.cli import main
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.errors import ConfigurationError, RunError
from bluesky_ptychonn.live.callback import PtychoNNCallback

STEP_M = 2e-7
FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.1, retry_s=0.1)


@pytest.fixture
def archive(tiled_server, make_devices, tmp_path):
    """(RunEngine archiving into Tiled, stage, detector writing below the server's readable storage)."""
    run_engine = RunEngine({})
    subscribe_archive(run_engine, tiled_server.client)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
    return run_engine, stage, detector


def _result(client, uid, name="ptychonn"):
    node = client["processed"][uid][name]
    return {k: node[k].read() for k in ("amplitude", "phase", "weight")}, dict(node.metadata)


def test_replayed_run_equals_the_live_result(tiled_server, archive, checkpoint):
    run_engine, stage, detector = archive
    client = tiled_server.client
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint, client, device="cpu", data_roots=[tiled_server.data_dir], live=FAST
    )
    run_engine.subscribe(callback)
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(6, 8), exposure_s=2e-3))
    assert callback.wait(uid, 60)
    live, live_md = _result(client, uid)
    assert live_md["source"] == "live" and live_md["frames_done"] == 48

    # Other batches than live's, over Tiled instead of the detector's file, replacing the live result.
    options = LiveOptions(batch_size=20, max_wait_s=0.01)
    md = replay_run(tiled_server.raw[uid], Predictor.from_checkpoint(checkpoint, device="cpu"), client, options=options)
    replayed, stored_md = _result(client, uid)
    assert md["path"] == f"processed/{uid}/ptychonn" and md["status"] == "complete"
    assert stored_md["source"] == "replay" and stored_md["status"] == "complete" and stored_md["frames_done"] == 48
    assert stored_md["grid"] == live_md["grid"] and stored_md["model_hash"] == live_md["model_hash"]
    assert stored_md["raw_exit_status"] == "success" and stored_md["errors"] == []
    for key in ("amplitude", "phase", "weight"):
        assert replayed[key].shape == live[key].shape
        np.testing.assert_allclose(replayed[key], live[key], atol=1e-5, err_msg=key)

    with pytest.raises(RunError, match=f"run {uid} already has processed/{uid}/ptychonn"):
        replay_run(tiled_server.raw[uid], Predictor.from_checkpoint(checkpoint, device="cpu"), client, replace=False)


def test_query_through_databroker_selects_exactly_the_intended_runs(tiled_server, archive):
    run_engine, stage, detector = archive
    raw, tag = tiled_server.raw, uuid.uuid4().hex
    scan = dict(step_m=STEP_M, shape=(2, 3), exposure_s=2e-3)
    (a,) = run_engine(ptycho_fly_scan(detector, stage, **scan, md={"campaign": tag, "operator": "ada"}))
    (b,) = run_engine(ptycho_fly_scan(detector, stage, **scan, md={"campaign": tag, "operator": "bo"}))
    (c,) = run_engine(bp.count([det], 2, md={"campaign": tag, "operator": "ada"}))
    (d,) = run_engine(ptycho_fly_scan(detector, stage, **scan, md={"campaign": "other", "operator": "ada"}))

    def picked(uids=(), conditions=(), **options):
        return {run.metadata["start"]["uid"] for run in select_matching(raw, uids, queries_for(conditions, **options))}

    assert picked(conditions=[f"start.campaign={tag}"]) == {a, b, c}
    assert picked(conditions=[f"start.campaign={tag}", "start.operator=ada"]) == {a, c}
    assert picked(conditions=[f"start.campaign={tag}"], plan_name="ptycho_fly_scan") == {a, b}
    # A bare key lives in the ptychography section, which count runs do not have.
    assert picked(conditions=[f"start.campaign={tag}", "sample_id=test-small"]) == {a, b}
    assert picked(conditions=["frame_pixels=32", "start.operator=ada", "start.campaign=other"]) == {d}
    t_a, t_b = raw[a].metadata["start"]["time"], raw[b].metadata["start"]["time"]
    # Uids with conditions: the named runs, each checked against every condition.
    assert picked([a[:8], b], [f"start.campaign={tag}"]) == {a, b}
    with pytest.raises(RunError, match=f"{b[:8]} do not meet"):
        picked([a, b], [f"start.campaign={tag}"], until=_iso(t_a + 1e-3))
    assert {run.metadata["start"]["uid"] for run in select(raw, [Key("campaign") == tag, a[:8]])} == {a, b, c}
    (x,) = select(raw, [(Key("campaign") == tag, TimeRange(since=t_a + 1e-3, until=t_b + 1e-3))])
    assert x.metadata["start"]["uid"] == b
    assert where("plan_args.exposure_s=0.002").value == 0.002 and where('sample_id="007"').value == "007"


def _iso(timestamp):
    from datetime import datetime

    return datetime.fromtimestamp(timestamp).isoformat()


def test_bad_selections_and_runs_are_errors_naming_the_run(tiled_server, archive, checkpoint):
    run_engine, _, _ = archive
    raw, missing = tiled_server.raw, str(uuid.uuid4())
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(RunError, match=missing):
        replay_runs(raw, [missing], predictor, progress=False)
    with pytest.raises(RunError, match="matches no run"):
        select_matching(raw, [], queries_for([f"start.campaign={uuid.uuid4().hex}"]))
    with pytest.raises(RunError, match="does not name one run"):
        select(raw, ["abc"])  # too short to be a partial uid
    (count,) = run_engine(bp.count([det], 2))
    with pytest.raises(RunError, match=f"run {count} .*not a ptychography run"):
        replay_runs(raw, [count], predictor, progress=False)
    with pytest.raises(RunError, match=f"run {count}"):
        replay_run(raw[count], predictor, tiled_server.client)
    with pytest.raises(ConfigurationError, match="KEY=VALUE"):
        queries_for(["sample_id"])
    with pytest.raises(ConfigurationError, match="name runs"):
        select_matching(raw, [], [])
    with pytest.raises(ConfigurationError, match="CatalogOfBlueskyRuns"):
        select(tiled_server.client, [count])  # the root, not the catalog of runs


def test_replay_command_takes_many_runs(tiled_server, archive, checkpoint, monkeypatch, capsys):
    run_engine, stage, detector = archive
    tag = uuid.uuid4().hex
    scan = dict(step_m=STEP_M, shape=(3, 4), exposure_s=2e-3, md={"campaign": tag})
    expected = {run_engine(ptycho_fly_scan(detector, stage, **scan))[0] for _ in range(2)}
    # The key travels in an environment variable, never on the command line.
    monkeypatch.setenv("TEST_TILED_KEY", tiled_server.server.api_key)
    uri = tiled_server.server.uri.split("?")[0]
    common = ["--checkpoint", str(checkpoint), "--tiled-uri", uri, "--api-key-env", "TEST_TILED_KEY", "--device", "cpu"]
    assert main(["replay", f"start.campaign={tag}", "--plan-name", "ptycho_fly_scan", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["raw_uid"] for r in out} == expected
    assert all(r["status"] == "complete" and r["frames_done"] == 12 and not r["errors"] for r in out)
    for uid in expected:
        assert _result(tiled_server.client, uid)[1]["source"] == "replay"

    missing = str(uuid.uuid4())
    assert main(["replay", missing, *common]) == 2
    assert missing in capsys.readouterr().err


class _Slow(Predictor):
    def predict_counts(self, frames):
        import time

        time.sleep(0.3)
        return super().predict_counts(frames)


def test_replay_keeps_the_live_result_until_its_own_is_complete_and_uses_the_live_grid(
    tiled_server, archive, checkpoint
):
    """Was: replay deleted the live result at its first write, and used the default grid margin."""
    import threading

    run_engine, stage, detector = archive
    client = tiled_server.client
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint, client, device="cpu", data_roots=[tiled_server.data_dir], live=FAST, grid_margin_pixels=40
    )
    run_engine.subscribe(callback)
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(4, 6), exposure_s=2e-3))
    assert callback.wait(uid, 60)
    _, live_md = _result(client, uid)
    base = Predictor.from_checkpoint(checkpoint, device="cpu")
    slow = _Slow(base.model, base.info, device="cpu")
    seen = []
    replaying = threading.Thread(
        target=lambda: seen.append(replay_run(tiled_server.raw[uid], slow, client, options=LiveOptions(batch_size=4)))
    )
    replaying.start()
    while replaying.is_alive():  # whenever a reader looks, there is a complete image
        _, md = _result(client, uid)
        assert md["status"] == "complete" and md["frames_done"] == 24
        replaying.join(0.2)
    _, md = _result(client, uid)
    assert seen and md["source"] == "replay" and md["grid"] == live_md["grid"]
    assert md["frames_expected"] == 24 and md["frames_missing"] == 0
