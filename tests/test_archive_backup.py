"""Tiled goes away mid-scan with the archive subscribed: the scan finishes, nothing is lost.

A real Tiled server on a fixed port is stopped while a paced fly scan runs and started again
afterwards; the archive (TiledWriter with a backup folder) and the live callback are subscribed
in the safe order by :func:`subscribe_all`. The run is then restored from its backup into ``raw``
and read back through Tiled whole, and the live result is complete.
"""

import threading
import time

import h5py
import numpy as np
import tiled.client.utils
from tiled.client import from_uri
from tiled.server import SimpleTiledServer
from tiled_servers import free_port, start_server

from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.backup import restore_backups
from bluesky_ptychonn.archive.runs import scan_from_run
from bluesky_ptychonn.archive.servers import subscribe_all
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.live.callback import PtychoNNCallback

FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.1, retry_s=0.1)


def test_tiled_restarted_mid_scan_loses_nothing(tiled_server, make_devices, tmp_path, checkpoint, monkeypatch):
    from bluesky import RunEngine

    # The client's own retries (45 s by default) would only slow the test; the policy is the same.
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)
    # Tiled's server settings are process-wide: a second server in this process shares the key.
    port, key, data = free_port(), tiled_server.server.api_key, tmp_path / "data"
    server = SimpleTiledServer(directory=tmp_path / "tiled", port=port, api_key=key, readable_storage=[data])
    client = from_uri(server.uri)
    callback = PtychoNNCallback.from_checkpoint(checkpoint, client, device="cpu", data_roots=[data], live=FAST)
    run_engine = RunEngine({})
    subscribe_all(run_engine, client, callback, backup_directory=tmp_path / "backup")
    stage, detector = make_devices(data, paced=True)
    datums = []
    run_engine.subscribe(lambda name, doc: datums.append(doc), "stream_datum")

    def stop_server_once_frames_are_in():
        while len(datums) < 2:  # the scan is under way, and part of it archived
            time.sleep(0.01)
        server.close()

    stopper = threading.Thread(target=stop_server_once_frames_are_in)
    stopper.start()
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=2e-7, shape=(6, 8), exposure_s=0.05))
    stopper.join()
    assert run_engine.state == "idle"  # the scan itself succeeded
    assert list((tmp_path / "backup").glob("*.jsonl")), "the archive kept no backup"

    restarted = start_server(
        SimpleTiledServer, directory=tmp_path / "tiled", port=port, api_key=key, readable_storage=[data]
    )
    try:
        client = from_uri(restarted.uri)
        assert restore_backups(client, tmp_path / "backup") == [uid]
        scan = scan_from_run(client["raw"][uid], with_truth=False)
        with h5py.File(detector.path, "r") as f:  # the detector's file is still there, and whole in Tiled
            np.testing.assert_array_equal(scan.frames, f["entry/data/data"][()])
        assert len(scan.frames) == 48 and client["raw"][uid].metadata["stop"]["exit_status"] == "success"
        assert callback.wait(uid, 120)
        md = dict(client["processed"][uid]["ptychonn"].metadata)
        assert md["status"] == "complete" and md["frames_done"] == 48
    finally:
        restarted.close()
