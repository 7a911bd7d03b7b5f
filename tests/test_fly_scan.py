"""The fly-scan plan on a real RunEngine, archived by TiledWriter into a real in-process Tiled server."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted
from event_model import DocumentNames, schema_validators
from tiled.queries import Key

from bluesky_ptychonn import schema
from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.servers import API_KEY_ENV, FacilityServer, StreamDatumCoalescer, subscribe_archive
from bluesky_ptychonn.archive.truth import read_simulation_truth
from bluesky_ptychonn.cli import build_parser
from bluesky_ptychonn.errors import ConfigurationError, PositionError
from bluesky_ptychonn.files.scanfile import read_scan
from bluesky_ptychonn.sim.physics import TRUTH_NOTE

ROOT = Path(__file__).resolve().parents[1]
STEP_M = 2e-7


@pytest.fixture
def archived(tiled_server, make_devices, tmp_path):
    """(RunEngine, documents, stage, detector): runs go to Tiled; documents are also kept here."""
    run_engine = RunEngine({})
    docs = []
    run_engine.subscribe(lambda name, doc: docs.append((name, doc)))
    subscribe_archive(run_engine, tiled_server.client)
    # Inside the server's readable storage, one folder per test.
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
    return run_engine, docs, stage, detector


def _validate(docs):
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)


def test_fly_scan_round_trip_through_tiled(tiled_server, archived, small_sample):
    run_engine, docs, stage, detector = archived
    (uid,) = run_engine(
        ptycho_fly_scan(
            detector,
            stage,
            step_m=STEP_M,
            shape=(6, 8),
            center_m=(1e-7, -3e-7),
            exposure_s=2e-3,
            photons_per_frame=1e5,
            md={"operator": "test"},
        )
    )
    _validate(docs)
    names = [name for name, _ in docs]
    assert names[0] == "start" and names[-1] == "stop" and "event" not in names and "event_page" not in names
    assert names.count("stream_resource") == 3

    assert uid in tiled_server.raw.search(Key("ptychography.sample_id") == small_sample.sample_id)
    run = tiled_server.raw[uid]
    start, stop = run.metadata["start"], run.metadata["stop"]
    section = start["ptychography"]
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": 48}
    assert start["sample"] == small_sample.sample_id and start["operator"] == "test"
    assert schema.geometry(schema.read_section(start)) == detector.settings.geometry
    assert section["frame_shape"] == [32, 32] and section["probe"] == {"kind": "zone_plate"}
    assert section["scan"]["kind"] == "snake" and section["scan"]["shape"] == [6, 8]
    assert section["scan"]["step_m"] == STEP_M and section["scan"]["center_m"] == [1e-7, -3e-7]
    assert section["exposure_s"] == 2e-3 and section["photons_per_frame"] == 1e5
    assert section["data_keys"] == {"frames": "diffraction", "positions": "positions_m", "frame_id": "frame_id"}
    assert section["simulation_truth"]["note"] == TRUTH_NOTE

    stream = run["primary"]
    frames, positions = stream["diffraction"].read(), stream["positions_m"].read()
    with h5py.File(detector.path, "r", swmr=True) as f:
        np.testing.assert_array_equal(frames, f["entry/data/data"][()])
        np.testing.assert_array_equal(positions, f["entry/data/positions_m"][()])
    np.testing.assert_array_equal(stream["frame_id"].read(), np.arange(48))
    noise = section["encoder_noise_m"]
    assert np.abs(positions - schema.nominal_positions(schema.read_section(start))).max() < 6 * noise

    truth, grid = read_simulation_truth(run)
    assert grid.shape == truth.shape and grid.as_metadata() == section["region_grid"]
    _, (rows, cols) = small_sample.region(schema.nominal_positions(schema.read_section(start)), 32)
    np.testing.assert_allclose(truth, small_sample.object[rows, cols], atol=1e-5)
    node = tiled_server.client[section["simulation_truth"]["tiled_path"]]
    assert node.metadata["note"] == TRUTH_NOTE and node["amplitude"].metadata["note"] == TRUTH_NOTE


def test_a_new_region_of_the_same_sample(tiled_server, archived, small_sample):
    run_engine, _, stage, detector = archived
    uids = [
        run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(3, 3), center_m=c))[0]
        for c in ((0.0, 0.0), (0.0, 4e-6))
    ]
    (first, g1), (second, g2) = (read_simulation_truth(tiled_server.raw[u]) for u in uids)
    assert g2.origin_m[1] - g1.origin_m[1] == pytest.approx(4e-6, abs=small_sample.pixel_size_m)
    assert not np.allclose(first[:40, :40], second[:40, :40])
    assert list(tiled_server.client["simulation_truth"]).count(small_sample.sample_id) == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"step_m": 0.0}, ConfigurationError, "step must be positive"),
        ({"step_m": -1e-7}, ConfigurationError, "step must be positive"),
        ({"exposure_s": 0.0}, ConfigurationError, "exposure must be positive"),
        ({"exposure_s": -1e-3}, ConfigurationError, "exposure must be positive"),
        ({"photons_per_frame": 0}, ConfigurationError, "photons per frame must be positive"),
        ({"photons_per_frame": -10.0}, ConfigurationError, "photons per frame must be positive"),
        ({"center_m": (0.0, 4.99e-5)}, ConfigurationError, "outside its limits"),
        ({"step_m": 5e-6, "exposure_s": 1e-4}, ConfigurationError, "m/s"),
        ({"center_m": (0.0, 2e-5)}, PositionError, "beyond sample"),
        ({"sample_id": "no-such-sample"}, ConfigurationError, "unknown sample 'no-such-sample'"),
        ({"shape": (0, 4)}, ConfigurationError, "scan shape"),
    ],
)
def test_bad_input_fails_before_anything_moves(make_devices, tmp_path, kwargs, error, match):
    stage, detector = make_devices(tmp_path)
    stage.x.set(1e-7).wait(5)
    run_engine, docs = RunEngine({}), []
    run_engine.subscribe(lambda name, doc: docs.append(name))
    with pytest.raises(error, match=match):
        run_engine(ptycho_fly_scan(detector, stage, **{"step_m": STEP_M, "shape": (4, 4), **kwargs}))
    assert stage.position_m == (0.0, 1e-7) and docs == [] and detector.path is None


def test_abort_half_way_leaves_a_closed_readable_run(tiled_server, archived):
    run_engine, docs, stage, detector = archived
    detector.settings = detector.settings.updated(paced=True, chunk_frames=4)
    frames_seen = threading.Event()
    run_engine.subscribe(lambda name, doc: frames_seen.set(), "stream_datum")

    def abort_when_frames_arrive():
        if frames_seen.wait(30):
            run_engine.abort("operator abort")

    aborter = threading.Thread(target=abort_when_frames_arrive)
    aborter.start()
    # 400 frames at 10 ms: four seconds of flight if nothing stops it.
    with pytest.raises(RunEngineInterrupted):
        run_engine(ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=(20, 20), exposure_s=0.01))
    aborter.join()
    _validate(docs)
    uid, stop = docs[0][1]["uid"], docs[-1][1]
    assert docs[-1][0] == "stop" and stop["exit_status"] == "abort" and stop["reason"] == "operator abort"
    recorded = read_scan(detector.path)
    assert 0 < len(recorded.frames) < 400 and stop["num_events"] == {"primary": len(recorded.frames)}
    run = tiled_server.raw[uid]
    assert run.metadata["stop"]["exit_status"] == "abort"
    np.testing.assert_array_equal(run["primary"]["diffraction"].read(), recorded.frames)
    np.testing.assert_array_equal(run["primary"]["frame_id"].read(), recorded.frame_ids)


def test_example_script_archives_a_run(tiled_server, tmp_path):
    data_dir = tiled_server.data_dir / tmp_path.name
    api_key = tiled_server.server.api_key
    uri = tiled_server.server.uri.split("?")[0]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "simulated_fly_scan.py"),
            "--uri",
            uri,
            "--data-dir",
            str(data_dir),
            "--rows",
            "4",
            "--cols",
            "5",
            "--frame-pixels",
            "32",
            "--sample-pixels",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TILED_API_KEY": api_key},  # the key travels in the environment only
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["tiled_uri"].startswith(uri.removesuffix("/api/v1"))
    run = tiled_server.raw[lines["run_uid"]]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run["primary"]["diffraction"].shape == (20, 32, 32)


def test_serve_command_needs_an_api_key_and_keeps_it_off_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = build_parser().parse_args(["serve", str(tmp_path / "srv"), "-r", str(tmp_path / "det")])
    with pytest.raises(ConfigurationError, match="API key"):
        args.func(args)
    server = FacilityServer(tmp_path, "a1" * 16, readable=[tmp_path / "det"], catalog="postgresql://tiled@db/tiled")
    command = server.command()
    assert "a1" * 16 not in " ".join(command) and "postgresql://tiled@db/tiled" in command
    assert command[command.index("--host") + 1] == "127.0.0.1" and str(tmp_path / "det") in command
    with pytest.raises(ConfigurationError, match="catalog"):
        FacilityServer(tmp_path, "a1" * 16, catalog="mysql://x")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BLUESKY_PTYCHONN_SLOW_TESTS"), reason="starts tiled serve (~25 s)")
def test_facility_server_serves_raw_catalog_with_a_key(tmp_path):
    from tiled.client import from_uri

    key = "f00d" * 8
    with FacilityServer(tmp_path / "srv", key, readable=[tmp_path / "det"], port=_free_port()) as server:
        client = from_uri(server.uri, api_key=key)
        assert [(s.name, s.version) for s in client["raw"].specs] == [("CatalogOfBlueskyRuns", "3.0")]
        with pytest.raises(RuntimeError, match="API key"):
            from_uri(server.uri)
    assert server.process.returncode is not None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _datum(resource: str, start: int, stop: int) -> dict:
    return {
        "uid": f"{resource}/{start}",
        "stream_resource": resource,
        "descriptor": "primary",
        "indices": {"start": start, "stop": stop},
        "seq_nums": {"start": start + 1, "stop": stop + 1},
    }


def test_flushes_reach_the_archive_merged_over_the_interval_and_all_before_the_stop():
    """Was: every flush (10 a second) one registration request, 38 ms of the embedded server's CPU each."""
    sent, now = [], [0.0]
    coalescer = StreamDatumCoalescer(lambda name, doc: sent.append((name, doc)), 1.0, clock=lambda: now[0])
    coalescer("start", {"uid": "run"})
    for start, t in zip(range(0, 40, 8), (0.0, 0.4, 0.8, 1.0, 1.3), strict=True):
        now[0], stop = t, start + 8
        coalescer("stream_datum", _datum("frames", start, stop))
        coalescer("stream_datum", _datum("positions", start, stop))
    assert [(name, doc["stream_resource"], doc["indices"]) for name, doc in sent[1:]] == [
        ("stream_datum", "frames", {"start": 0, "stop": 32}),
        ("stream_datum", "positions", {"start": 0, "stop": 32}),
    ]
    assert sent[1][1]["seq_nums"] == {"start": 1, "stop": 33}
    coalescer("stop", {"uid": "stop"})  # what waits goes first, then the stop
    assert [(name, doc.get("indices")) for name, doc in sent[3:]] == [
        ("stream_datum", {"start": 32, "stop": 40}),
        ("stream_datum", {"start": 32, "stop": 40}),
        ("stop", None),
    ]


def test_a_flush_that_does_not_follow_the_one_waiting_sends_that_one_as_it_is():
    sent = []
    coalescer = StreamDatumCoalescer(lambda name, doc: sent.append(doc["indices"]), 1.0, clock=lambda: 0.0)
    coalescer("stream_datum", _datum("frames", 0, 8))
    coalescer("stream_datum", _datum("frames", 16, 24))  # a gap: not one range
    assert sent == [{"start": 0, "stop": 8}]
    coalescer.flush()
    assert sent == [{"start": 0, "stop": 8}, {"start": 16, "stop": 24}]
