"""Out of process: RunEngine -> Publisher -> bluesky-0MQ-proxy -> `bluesky-ptychonn consume` -> Tiled.

Also loads every file of ``callbacks/`` (the deployment surface), and checks the service
configuration: environment overrides, paths relative to the file, and an API key that stays secret.
"""

import json
import logging
import os
import pickle
import queue
import runpy
import shutil
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher
from bluesky_tiled_plugins import TiledWriter
from test_callback import _inline_run
from test_wire import Marker
from tiled_servers import free_port
from tiny_models import write_tiny_checkpoint

from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.replay import incomplete_runs
from bluesky_ptychonn.archive.servers import subscribe_archive
from bluesky_ptychonn.cli import main
from bluesky_ptychonn.core.base_model import base_model_path
from bluesky_ptychonn.core.checkpoint import CheckpointInfo, save_checkpoint
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN
from bluesky_ptychonn.core.reconstruct import reconstruct
from bluesky_ptychonn.errors import ConfigurationError
from bluesky_ptychonn.live.service import Consumer, ModelWatcher, build_callback, load_config
from bluesky_ptychonn.live.wire import deserialize, serialize

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS = ROOT / "callbacks"


@pytest.fixture
def environment(monkeypatch):
    """No API key and no PTYCHONN_* override from the environment the tests were started in."""
    for name in list(os.environ):
        if name.upper().startswith("PTYCHONN_") or name == "TILED_API_KEY":
            monkeypatch.delenv(name)
    return monkeypatch


def _config(tmp_path, checkpoint, tiled_uri, data_root, zmq_out, zmq_in="tcp://127.0.0.1:5577"):
    text = (CALLBACKS / "ptychonn.toml").read_text()
    text = text.replace('"default-64"', f'"{checkpoint}"')
    text = text.replace('"http://127.0.0.1:8000"', f'"{tiled_uri}"')
    text = text.replace('"tcp://127.0.0.1:5578"', f'"{zmq_out}"')
    text = text.replace('"tcp://127.0.0.1:5577"', f'"{zmq_in}"')
    text = text.replace('["../data"]', f'["{data_root}"]')
    text = text.replace("publish_interval_s = 1.0", "publish_interval_s = 0.2")
    path = tmp_path / "ptychonn.toml"
    path.write_text(text)
    return path


class _Lines:
    """A subprocess's stderr, read on a thread so that a test can act while it waits for a line."""

    def __init__(self, stream):
        self.seen = []
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, needle, timeout=120, poke=None):
        """Return the first new line holding ``needle``; call ``poke()`` every 0.25 s meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if poke is not None:
                poke()
            try:
                line = self._queue.get(timeout=0.25)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} not seen; output:\n{''.join(self.seen)}")

    def rest(self):
        """Everything the process wrote, once it has exited."""
        self._thread.join(10)
        while (line := self._queue.get_nowait() if not self._queue.empty() else None) is not None:
            self.seen.append(line)
        return "".join(self.seen)


class _Switchable:
    """The Publisher's serializer, switchable to send what a careless or hostile publisher would."""

    def __init__(self):
        self.encode = serialize

    def __call__(self, doc):
        return self.encode(doc)


def test_consumer_out_of_process_through_a_real_0mq_proxy(tiled_server, make_devices, tmp_path, environment, capsys):
    checkpoint = tmp_path / "model.safetensors"
    write_tiny_checkpoint(checkpoint)
    zmq_in, zmq_out = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    tiled_uri = tiled_server.server.uri.split("/api/v1")[0]
    config = _config(tmp_path, checkpoint, tiled_uri, tiled_server.data_dir, zmq_out)
    api_key = tiled_server.server.api_key
    # Each run is also refined by pty-chi once its live image is final (a few epochs: plumbing only).
    refine = {"PTYCHONN_REFINE__ENABLED": "true", "PTYCHONN_REFINE__EPOCHS": "3", "PTYCHONN_REFINE__DEVICE": "cpu"}
    env = {**os.environ, "TILED_API_KEY": api_key, **refine}
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
    consumer, lines = _start_consumer(config, env)
    assert api_key not in " ".join(consumer.args)  # the key travels in the environment only
    publisher = None
    marker = tmp_path / "unpickled"
    try:
        lines.wait_for("consuming documents")
        run_engine = RunEngine({})
        subscribe_archive(run_engine, tiled_server.client)
        serializer = _Switchable()
        publisher = Publisher(zmq_in, serializer=serializer)
        run_engine.subscribe(publisher)

        # A pickled start document whose unpickling would create `marker`, sent until the consumer
        # reports dropping one: that also proves the publisher-proxy-consumer path is connected.
        serializer.encode = lambda doc: pickle.dumps({**doc, "marker": Marker(marker)})
        lines.wait_for("dropped a 0MQ message", poke=lambda: publisher("start", {"uid": "hostile", "time": 0.0}))
        # An unknown document name ends bluesky's dispatcher; the service starts a new one.
        serializer.encode = serialize
        publisher("no_such_document", {"uid": "hostile"})
        lines.wait_for("unknown document name")
        serializer.encode = lambda doc: pickle.dumps({**doc, "marker": Marker(marker)})
        lines.wait_for("dropped a 0MQ message", poke=lambda: publisher("start", {"uid": "hostile", "time": 0.0}))
        serializer.encode = serialize

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
        while time.monotonic() < deadline:
            try:
                if client["processed"][uid]["refined"].metadata["status"] != "running":
                    break
            except KeyError:
                pass
            time.sleep(0.2)
        refined = dict(client["processed"][uid]["refined"].metadata)
        assert refined["status"] == "complete" and refined["epochs"] == 3, refined
        assert refined["seed"]["source"] == "ptychonn" and refined["grid"] == md["grid"]
        assert consumer.poll() is None  # still serving

        # Stopped with SIGTERM, as a service manager does, in the middle of a run: the run is
        # finished as interrupted with the frames it had, before the process exits.
        open_run = _inline_run(frames, positions, _section(tiled_server.client["raw"][uid]))[:-1]
        open_uid = open_run[0][1]["uid"]
        for name, doc in open_run:
            publisher(name, doc)
        while time.monotonic() < deadline:
            try:
                if client["processed"][open_uid]["ptychonn"].metadata["frames_done"] == len(frames):
                    break
            except KeyError:
                pass
            time.sleep(0.2)
        consumer.terminate()
        assert consumer.wait(60) == 0
        md = dict(client["processed"][open_uid]["ptychonn"].metadata)
        assert md["status"] == "interrupted" and md["frames_done"] == len(frames), md
        assert "stopped before" in md["reason"] and md["updated"] >= md["started"]

        # Killed (SIGKILL: no chance to say anything) mid-run: the result is left running. Once it is
        # stale, `replay --incomplete` finds it among the runs since this test began and finishes it
        # from the archive: the same image as the uninterrupted run of the same frames (`uid`).
        # (A consumer restarted mid-run marks such a result interrupted: test_live_hardening.)
        killed_run = _inline_run(frames, positions, _section(tiled_server.client["raw"][uid]))
        killed_uid = killed_run[0][1]["uid"]
        archive = TiledWriter(client["raw"])
        for name, doc in killed_run:
            archive(name, doc)
        env = {**os.environ, "TILED_API_KEY": api_key}  # no refinement from here on: it only slows the start
        consumer, lines = _start_consumer(config, env)
        _wait_connected(lines, publisher, serializer)
        for name, doc in killed_run[:-1]:
            publisher(name, doc)
        while time.monotonic() < deadline and _status(client, killed_uid) is None:
            time.sleep(0.2)
        consumer.kill()
        consumer.wait(10)
        assert _status(client, killed_uid) == "running"
        assert [s for _, s in incomplete_runs(client, [client["raw"][killed_uid]], stale_after_s=0)] == ["stale"]
        assert not incomplete_runs(client, [client["raw"][killed_uid]])  # a live consumer may still finish it
        environment.setenv("TILED_API_KEY", api_key)
        since = datetime.fromtimestamp(client["raw"][uid].metadata["start"]["time"] - 1).isoformat()
        args = ["replay", "--incomplete", "--since", since, "--checkpoint", str(checkpoint), "--tiled-uri", tiled_uri]
        assert main([*args, "--stale-after-s", "0"]) == 0
        (replayed,) = json.loads(capsys.readouterr().out)
        assert replayed["raw_uid"] == killed_uid and replayed["status"] == "complete", replayed
        finished = client["processed"][killed_uid]["ptychonn"]
        assert finished.metadata["frames_done"] == len(frames) and finished.metadata["source"] == "replay"
        for key in ("amplitude", "phase"):
            np.testing.assert_array_equal(finished[key].read(), client["processed"][uid]["ptychonn"][key].read())
        assert main(args) == 0 and json.loads(capsys.readouterr().out) == []  # nothing left to finish
    finally:
        if publisher is not None:
            publisher.close()  # else the 0MQ context waits for it at exit
        for p in (consumer, proxy):
            p.terminate()
            p.wait(10)
        output = lines.rest()
        consumer.stderr.close()
    assert not marker.exists(), "the consumer unpickled a message"
    assert api_key not in output


def _start_consumer(config, env):
    consumer = subprocess.Popen(
        [sys.executable, str(CALLBACKS / "launch_consumer.py"), "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    return consumer, _Lines(consumer.stderr)


def _wait_connected(lines, publisher, serializer):
    """Until the consumer reports a (harmless, pickled) message: PUB drops what it sends before then."""
    serializer.encode = pickle.dumps
    lines.wait_for("dropped a 0MQ message", poke=lambda: publisher("start", {"uid": "probe", "time": 0.0}))
    serializer.encode = serialize


def _status(client, uid):
    try:
        return client["processed"][uid]["ptychonn"].metadata["status"]
    except KeyError:
        return None


def _section(run):
    """The ptychography section of a run's start document, as the archive holds it."""
    return dict(run.metadata["start"]["ptychography"])


def _check_publisher_snippet(run_engine, address):
    """ipython_publisher.py subscribes a Publisher that sends msgpack to ``[zmq] publish_address``."""
    context = zmq.Context()
    receiver = context.socket(zmq.SUB)  # in the place of the proxy's input side
    receiver.bind(address)
    receiver.setsockopt(zmq.SUBSCRIBE, b"")
    namespace = runpy.run_path(str(CALLBACKS / "ipython_publisher.py"), init_globals={"RE": run_engine})
    publisher = namespace["ptychonn_publisher"]
    try:
        assert isinstance(namespace["ptychonn_publisher_token"], int)
        run_engine.unsubscribe(namespace["ptychonn_publisher_token"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # resend until the connection is up (PUB drops before it)
            publisher("start", {"uid": "probe", "shape": np.arange(3)})
            if receiver.poll(250):
                break
        _, name, body = receiver.recv().split(b" ", 2)
        assert name == b"start" and deserialize(body)["uid"] == "probe"
        assert deserialize(body)["shape"].tolist() == [0, 1, 2]
    finally:
        publisher.close()
        receiver.close()
        context.term()


def test_deployment_files_load(tmp_path, environment):
    """Every file in callbacks/ parses, validates and runs with a real checkpoint and RunEngine."""
    monkeypatch = environment
    shipped = load_config(CALLBACKS / "ptychonn.toml")
    # The shipped configuration runs as it is: its model (the shipped base model) exists after set-up.
    assert shipped.model.checkpoint == base_model_path() and shipped.model.checkpoint.is_file()
    assert shipped.zmq.address.startswith("tcp://127.0.0.1")
    assert shipped.zmq.publish_address.startswith("tcp://127.0.0.1") and shipped.tiled.api_key is None
    assert shipped.callback_config().frames_key == "diffraction"
    checkpoint = tmp_path / "model.safetensors"
    write_tiny_checkpoint(checkpoint)
    zmq_in = f"tcp://127.0.0.1:{free_port()}"
    config = _config(tmp_path, checkpoint, "http://127.0.0.1:1", tmp_path, "tcp://127.0.0.1:5578", zmq_in)
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
    _check_publisher_snippet(run_engine, zmq_in)
    with pytest.raises(ConfigurationError, match="API key"):
        build_callback(
            shipped.model_copy(update={"model": shipped.model.model_copy(update={"checkpoint": checkpoint})})
        )
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ncheckpoint = 'x'\nbogus = 1\n")
    with pytest.raises(ConfigurationError, match="bogus"):
        load_config(bad)


def test_new_model_is_picked_up_without_a_restart(tmp_path, environment):
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
    # A model for another frame size would fail every run to come: refused, the running one kept.
    net = NetworkConfig(input_pixels=64, base_channels=4, depth=2)
    other = CheckpointInfo(net, PreprocessRecipe(frame_shape=(64, 64)))
    save_checkpoint(tmp_path / "next.safetensors", PtychoNN(net).eval(), other)
    os.replace(tmp_path / "next.safetensors", checkpoint)
    os.utime(checkpoint, (time.time() + 15, time.time() + 15))
    assert not watcher.check() and callback.predictor.info.content_hash == second.content_hash


def _in_memory_config(tmp_path, checkpoint="model.safetensors"):
    """The shipped file without [tiled], its other values as shipped (relative paths included)."""
    text = (CALLBACKS / "ptychonn.toml").read_text()
    text = text[: text.index("[tiled]")] + text[text.index("[zmq]") :]
    path = tmp_path / "ptychonn.toml"
    path.write_text(text.replace('"default-64"', f'"{checkpoint}"'))
    return path


def test_environment_overrides_nested_keys_and_arguments_override_both(tmp_path, environment):
    path = _in_memory_config(tmp_path)
    environment.setenv("PTYCHONN_TILED__URI", "http://tiled.example:8000")
    environment.setenv("PTYCHONN_ZMQ__ADDRESS", "tcp://proxy.example:5578")
    environment.setenv("PTYCHONN_LIVE__BATCH_SIZE", "7")
    environment.setenv("PTYCHONN_CALLBACK__DATA_ROOTS", '["/srv/detector"]')
    config = load_config(path)
    assert config.tiled.uri == "http://tiled.example:8000" and config.tiled.api_key_env == "TILED_API_KEY"
    assert config.zmq.address == "tcp://proxy.example:5578"
    assert config.zmq.publish_address == "tcp://127.0.0.1:5577"  # the file's value for the keys not overridden
    assert config.callback_config().live.batch_size == 7 and config.callback_config().live.max_wait_s == 0.2
    assert config.callback_config().data_roots == (Path("/srv/detector"),)
    assert config.callback_config().frames_key == "diffraction"
    config = load_config(path, zmq={"address": "tcp://argument:1"}, live={"batch_size": 3})
    assert config.zmq.address == "tcp://argument:1" and config.zmq.publish_address == "tcp://127.0.0.1:5577"
    assert config.live.batch_size == 3 and config.live.publish_interval_s == 1.0


def test_the_refine_section_defaults_to_off_with_the_refinement_options(tmp_path, environment):
    from bluesky_ptychonn.core.refine import REFINE_OPTIONS

    shipped = load_config(CALLBACKS / "ptychonn.toml")
    assert shipped.refine.enabled is False and shipped.refine.options() == REFINE_OPTIONS
    environment.setenv("PTYCHONN_REFINE__ENABLED", "true")
    environment.setenv("PTYCHONN_REFINE__EPOCHS", "50")
    config = load_config(_in_memory_config(tmp_path), tiled={"uri": "http://tiled.example:8000"})
    assert config.refine.enabled and config.refine.options() == REFINE_OPTIONS.model_copy(update={"epochs": 50})


def test_relative_paths_resolve_against_the_file(tmp_path, environment):
    folder = tmp_path / "etc" / "ptychonn"
    folder.mkdir(parents=True)
    path = folder / "service.toml"
    path.write_text(
        '[model]\ncheckpoint = "../models/model.safetensors"\n[callback]\ndata_roots = ["data", "/absolute/data"]\n'
    )
    environment.chdir(tmp_path)  # not the file's folder
    config = load_config(Path("etc/ptychonn/service.toml"))
    assert config.model.checkpoint.resolve() == tmp_path / "etc" / "models" / "model.safetensors"
    roots = config.callback_config().data_roots
    assert roots[0].resolve() == folder / "data" and roots[1] == Path("/absolute/data")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[model]\ncheckpoint = 'm'\nreload_interval_s = -1\n", "model.reload_interval_s = -1"),
        ("[model]\ncheckpoint = 'm'\n[live]\nwindow = 'hann'\n", "live.window = 'hann'"),
        ("[model]\ncheckpoint = 'm'\n[callback]\nlive = {batch_size = 2}\n", "[live] table"),
        ("[model]\ncheckpoint = 'm'\n[zmq]\nprefix = 'two words'\n", "zmq.prefix"),
        ("[model]\ncheckpoint = 'm'\nbogus = 1\n", "model.bogus"),
        ("[modle]\ncheckpoint = 'm'\n", "model: Field required"),
        ("[model\n", "cannot read"),
        ("[model]\ncheckpoint = 'm'\n[refine]\nenabled = true\n", "needs a [tiled] section"),
        ("[model]\ncheckpoint = 'm'\n[refine]\nstop_tolerance = 2\n", "refine.stop_tolerance = 2"),
    ],
)
def test_a_bad_configuration_names_the_file_and_the_key(tmp_path, environment, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match="bad.toml") as info:
        load_config(path)
    assert expected in str(info.value)


def test_a_missing_file_is_an_error(tmp_path, environment):
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_config(tmp_path / "nowhere.toml")


def test_api_key_is_refused_in_the_file(tmp_path, environment):
    path = tmp_path / "keyed.toml"
    path.write_text("[model]\ncheckpoint = 'm'\n[tiled]\nuri = 'http://x'\napi_key = 'written-down-secret'\n")
    with pytest.raises(ConfigurationError, match=r"api_key must not be written.*TILED_API_KEY") as info:
        load_config(path)
    assert "written-down-secret" not in "".join(traceback.format_exception(info.value))


def test_api_key_stays_secret(tiled_server, tmp_path, environment, caplog):
    """From $TILED_API_KEY to the Tiled client, and never in a repr, a dump, a log line or an error."""
    key = tiled_server.server.api_key
    environment.setenv("TILED_API_KEY", key)
    checkpoint = tmp_path / "model.safetensors"
    write_tiny_checkpoint(checkpoint)
    tiled_uri = tiled_server.server.uri.split("/api/v1")[0]
    path = _config(tmp_path, checkpoint, tiled_uri, tiled_server.data_dir, f"tcp://127.0.0.1:{free_port()}")
    config = load_config(path)
    assert config.tiled.api_key.get_secret_value() == key
    for text in (repr(config), str(config), str(config.model_dump()), config.model_dump_json()):
        assert key not in text

    caplog.set_level(logging.DEBUG)
    consumer = Consumer(config)  # loads the model and connects to Tiled with the key
    thread = threading.Thread(target=consumer.run, name="consumer")
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not any("consuming documents" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and thread.is_alive(), caplog.text
            time.sleep(0.05)
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert any("service configuration" in r.getMessage() for r in caplog.records)  # the config is logged ...
    assert key not in caplog.text  # ... and the key is not
    assert all(key not in r.getMessage() for r in caplog.records)

    # pydantic's own message would show the whole [tiled] table, key included, as the bad input.
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace("uri = ", "url = "))
    environment.setenv("PTYCHONN_TILED__API_KEY", key)
    with pytest.raises(ConfigurationError) as info:
        load_config(bad)
    assert key not in "".join(traceback.format_exception(info.value))
    assert str(bad) in str(info.value) and "tiled.uri: Field required" in str(info.value)
    assert "tiled.url" in str(info.value)
