"""Out of process: RunEngine -> Publisher -> bluesky-0MQ-proxy -> `bluesky-ptychonn consume` -> Tiled.

Also loads every file of ``callbacks/`` (the deployment surface).
"""

import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher
from tiled_servers import free_port
from tiny_models import write_tiny_checkpoint

from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.servers import subscribe_archive
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.reconstruct import reconstruct
from bluesky_ptychonn.errors import ConfigurationError
from bluesky_ptychonn.live.service import ModelWatcher, build_callback, load_config

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS = ROOT / "callbacks"


def _config(tmp_path, checkpoint, tiled_uri, data_root, zmq_out):
    text = (CALLBACKS / "ptychonn.toml").read_text()
    text = text.replace('"../models/ptychonn.safetensors"', f'"{checkpoint}"')
    text = text.replace('"http://127.0.0.1:8000"', f'"{tiled_uri}"')
    text = text.replace('"tcp://127.0.0.1:5578"', f'"{zmq_out}"')
    text = text.replace('["../data"]', f'["{data_root}"]')
    text = text.replace("publish_interval_s = 1.0", "publish_interval_s = 0.2")
    path = tmp_path / "ptychonn.toml"
    path.write_text(text)
    return path


def _wait_for_line(process, needle, timeout=120):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} not seen; output:\n{''.join(lines)}")


def test_consumer_out_of_process_through_a_real_0mq_proxy(tiled_server, make_devices, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    write_tiny_checkpoint(checkpoint)
    zmq_in, zmq_out = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    tiled_uri = tiled_server.server.uri.split("/api/v1")[0]
    config = _config(tmp_path, checkpoint, tiled_uri, tiled_server.data_dir, zmq_out)
    env = {**os.environ, "TILED_API_KEY": tiled_server.server.api_key}
    # The proxy's script sits beside this Python (the venv need not be on PATH, as under `make test`).
    script = Path(sys.executable).with_name("bluesky-0MQ-proxy")
    proxy = subprocess.Popen(
        [
            str(script) if script.exists() else shutil.which("bluesky-0MQ-proxy"),
            "--in-address",
            zmq_in,
            "--out-address",
            zmq_out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    consumer = subprocess.Popen(
        [sys.executable, str(CALLBACKS / "launch_consumer.py"), "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    publisher = None
    try:
        _wait_for_line(consumer, "consuming documents")
        run_engine = RunEngine({})
        subscribe_archive(run_engine, tiled_server.client)
        publisher = Publisher(zmq_in)
        run_engine.subscribe(publisher)
        time.sleep(1.0)  # PUB/SUB slow joiner: the subscription must reach the proxy first
        stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
        (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=2e-7, shape=(5, 6), exposure_s=2e-3))
        client = tiled_server.client
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client["processed"][uid]["ptychonn"].metadata["status"] != "running":
                    break
            except KeyError:
                pass
            time.sleep(0.2)
        node = client["processed"][uid]["ptychonn"]
        md = dict(node.metadata)
        assert md["status"] == "complete" and md["frames_done"] == 30, md
        with h5py.File(detector.path, "r") as f:
            frames, positions = f["entry/data/data"][()], f["entry/data/positions_m"][()]
        offline = reconstruct(
            Predictor.from_checkpoint(checkpoint, device="cpu"),
            frames,
            positions,
            grid=ObjectGrid.from_metadata(md["grid"]),
        )
        np.testing.assert_allclose(node["amplitude"].read(), offline.amplitude, atol=1e-5)
        np.testing.assert_allclose(node["phase"].read(), offline.phase, atol=1e-5)
    finally:
        if publisher is not None:
            publisher.close()  # else the 0MQ context waits for it at exit
        for p in (consumer, proxy):
            p.terminate()
            p.wait(10)
        consumer.stderr.close()


def test_deployment_files_load(tmp_path, monkeypatch):
    """Every file in callbacks/ parses, validates and runs with a real checkpoint and RunEngine."""
    shipped = load_config(CALLBACKS / "ptychonn.toml")
    assert shipped.model.checkpoint.name == "ptychonn.safetensors" and shipped.zmq.address.startswith("tcp://127.0.0.1")
    assert shipped.callback_config().frames_key == "diffraction"
    checkpoint = tmp_path / "model.safetensors"
    write_tiny_checkpoint(checkpoint)
    config = _config(tmp_path, checkpoint, "http://127.0.0.1:1", tmp_path, "tcp://127.0.0.1:5578")
    text = config.read_text()
    config.write_text(text[: text.index("[tiled]")] + text[text.index("[zmq]") :])  # no Tiled: in memory only
    monkeypatch.setenv("PTYCHONN_CONFIG", str(config))
    run_engine = RunEngine({})
    namespace = runpy.run_path(str(CALLBACKS / "ipython_startup.py"), init_globals={"RE": run_engine})
    assert namespace["ptychonn_callback"].predictor.info.content_hash
    assert isinstance(namespace["ptychonn_token"], int)
    run_engine.unsubscribe(namespace["ptychonn_token"])
    launcher = runpy.run_path(str(CALLBACKS / "launch_consumer.py"), run_name="not_main")
    assert callable(launcher["main"])
    with pytest.raises(ConfigurationError, match="API key"):
        monkeypatch.delenv("TILED_API_KEY", raising=False)
        build_callback(
            shipped.model_copy(update={"model": shipped.model.model_copy(update={"checkpoint": checkpoint})})
        )
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ncheckpoint = 'x'\nbogus = 1\n")
    with pytest.raises(ConfigurationError, match="bogus"):
        load_config(bad)


def test_new_model_is_picked_up_without_a_restart(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    first = write_tiny_checkpoint(checkpoint, seed=0)
    config = _config(tmp_path, checkpoint, "http://127.0.0.1:1", tmp_path, "tcp://127.0.0.1:5578")
    text = config.read_text()
    config.write_text(text[: text.index("[tiled]")] + text[text.index("[zmq]") :])
    service = load_config(config)
    callback = build_callback(service)
    watcher = ModelWatcher(callback, service.model)
    assert not watcher.check()
    checkpoint.write_bytes(b"half-written garbage")
    os.utime(checkpoint, (time.time() + 5, time.time() + 5))
    assert not watcher.check() and callback.predictor.info.content_hash == first.content_hash
    second = write_tiny_checkpoint(tmp_path / "next.safetensors", seed=1)
    os.replace(tmp_path / "next.safetensors", checkpoint)  # how `train` should publish: atomically
    os.utime(checkpoint, (time.time() + 10, time.time() + 10))
    assert watcher.check()
    assert callback.predictor.info.content_hash == second.content_hash != first.content_hash
