"""Several consumers on one bluesky-0MQ-proxy, each reconstructing its share of the runs (``[share]``)."""

import logging
import shutil
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest
from bluesky.callbacks.zmq import Publisher
from test_callback import _inline_run
from test_service import _config
from tiled_servers import free_port
from tiny_models import write_tiny_checkpoint

from bluesky_ptychonn import schema
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.errors import ConfigurationError
from bluesky_ptychonn.live.callback import PtychoNNCallback
from bluesky_ptychonn.live.config import CallbackConfig, RunShare
from bluesky_ptychonn.live.service import Consumer, load_config
from bluesky_ptychonn.live.wire import serialize
from bluesky_ptychonn.sim.physics import simulate_scan


def _scan():
    scan = simulate_scan(
        geometry=DetectorGeometry(frame_pixels=32), scan_shape=(3, 3), probe={"kind": "gaussian", "fwhm_px": 8}
    )
    section = {
        "version": schema.VERSION,
        **DetectorGeometry(frame_pixels=32).model_dump(),
        "scan": {"shape": [3, 3], "step_m": scan.metadata["scan"]["step_m"], "center_m": [0, 0]},
    }
    return scan, section


def _status(client, uid):
    try:
        return client["processed"][uid]["ptychonn"].metadata["status"]
    except KeyError:
        return None


def test_a_share_by_uid_splits_any_uids_into_disjoint_covering_parts():
    shares = [RunShare(by="uid", index=i, count=3) for i in range(3)]
    for n in range(300):
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, str(n)))
        assert sum(share.takes({"uid": uid}) for share in shares) == 1
    beamline = RunShare(by="beamline", values=("2-ID-D", "26-ID"))
    assert beamline.takes({"uid": "a", "beamline_id": "26-ID"}) and not beamline.takes({"uid": "a"})
    assert beamline.takes_uid("a") is None  # the start document decides
    assert RunShare(by="plan", values=("ptycho_fly_scan",)).takes({"plan_name": "ptycho_fly_scan"})
    for bad in ({"by": "uid", "index": 2, "count": 2}, {"by": "plan"}):
        with pytest.raises(ValueError):
            RunShare(**bad)


def test_the_share_table_is_read_and_refused_inside_callback(tmp_path, monkeypatch):
    checkpoint = tmp_path / "model.safetensors"
    write_tiny_checkpoint(checkpoint)
    path = _config(tmp_path, checkpoint, "http://127.0.0.1:8000", tmp_path, "tcp://127.0.0.1:5578")
    path.write_text(path.read_text() + '\n[share]\nby = "uid"\nindex = 1\ncount = 2\n')
    config = load_config(path)
    assert config.callback_config().share == RunShare(by="uid", index=1, count=2)
    monkeypatch.setenv("PTYCHONN_SHARE__INDEX", "0")
    assert load_config(path).share.index == 0
    path.write_text(path.read_text().replace("[callback]\n", '[callback]\nshare = {by = "uid"}\n'))
    with pytest.raises(ConfigurationError, match=r"\[share\] table"):
        load_config(path)


def test_documents_of_another_share_are_ignored_and_never_marked(checkpoint, tiled_server):
    """Another consumer's run leaves no trace here, its start seen or missed (a restarted consumer)."""
    scan, section = _scan()
    share = RunShare(by="uid", index=0, count=2)
    uids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"share-{n}")) for n in range(6)]
    theirs = [u for u in uids if not share.takes_uid(u)]
    callback = PtychoNNCallback(
        Predictor.from_checkpoint(checkpoint, device="cpu"), tiled_server.client, CallbackConfig(share=share)
    )
    seen_start, missed_start = (_inline_run(scan.frames, scan.positions_m, section, uid=u) for u in theirs[:2])
    for name, doc in seen_start + missed_start[1:]:
        callback(name, doc)
    assert callback.flush(30)
    assert not callback.runs and not callback._missed
    processed = tiled_server.client["processed"] if "processed" in tiled_server.client else {}
    assert theirs[0] not in processed and theirs[1] not in processed


def test_two_consumers_on_one_proxy_split_a_batch_of_runs(tiled_server, tmp_path, monkeypatch, caplog):
    """Eight runs through one real proxy to two consumers sharing by uid: each run done once, none missed."""
    for name in ("TILED_API_KEY", "PTYCHONN_SHARE__INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TILED_API_KEY", tiled_server.server.api_key)
    checkpoint = tmp_path / "model.safetensors"
    write_tiny_checkpoint(checkpoint)
    zmq_in, zmq_out = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    tiled_uri = tiled_server.server.uri.split("/api/v1")[0]
    path = _config(tmp_path, checkpoint, tiled_uri, tmp_path, zmq_out)
    script = Path(sys.executable).with_name("bluesky-0MQ-proxy")
    proxy = subprocess.Popen(
        [str(script) if script.exists() else shutil.which("bluesky-0MQ-proxy"), "--in-address", zmq_in]
        + ["--out-address", zmq_out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    caplog.set_level(logging.INFO)
    consumers = [Consumer(load_config(path, share={"by": "uid", "index": i, "count": 2})) for i in range(2)]
    threads = [threading.Thread(target=c.run, name=f"consumer-{i}") for i, c in enumerate(consumers)]
    for thread in threads:
        thread.start()
    publisher = Publisher(zmq_in, serializer=serialize)
    try:
        # PUB drops what it sends before a subscriber is connected: poke with a message each consumer
        # refuses (not a document) until both have reported one.
        deadline = time.monotonic() + 60
        while {r.threadName for r in caplog.records if "dropped a 0MQ message" in r.getMessage()} != {
            "consumer-0",
            "consumer-1",
        }:
            assert time.monotonic() < deadline, caplog.text
            publisher._socket.send(publisher._prefix + b" " + b"start not-msgpack")
            time.sleep(0.2)

        scan, section = _scan()
        uids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tmp_path}-{n}")) for n in range(8)]
        for uid in uids:
            for name, doc in _inline_run(scan.frames, scan.positions_m, section, uid=uid):
                publisher(name, doc)
        client = tiled_server.client
        while time.monotonic() < deadline + 60:
            done = [u for u in uids if _status(client, u) == "complete"]
            if len(done) == len(uids):
                break
            time.sleep(0.2)
    finally:
        publisher.close()
        for consumer in consumers:
            consumer.stop()
        for thread in threads:
            thread.join(30)
        proxy.terminate()
        proxy.wait(10)
    assert len(done) == len(uids), (done, caplog.text)
    # What each consumer took is what it did not leave to the other: disjoint, and all of the batch.
    taken = [{u for u in uids if u not in c.callback._others} for c in consumers]
    assert not taken[0] & taken[1] and taken[0] | taken[1] == set(uids)
    assert all(taken), "uuid5 names chosen so that both shares get runs"
    for index, uids_taken in enumerate(taken):
        for uid in uids_taken:
            md = tiled_server.client["processed"][uid]["ptychonn"].metadata
            assert zlib.crc32(uid.encode()) % 2 == index
            assert md["consumer"]["share"] == f"uid hash {index} of 2" and md["frames_done"] == 9, md
