"""Tiled on PostgreSQL: the same workflow gives the same results as on SQLite.

SQLite: the session's in-process server. PostgreSQL: a real server (``postgres.py``) under
``bluesky-ptychonn serve --catalog postgresql+asyncpg://...``, started as a facility starts it.
One small workflow runs on each (a fly scan archived into ``raw``, the live reconstruction,
a replay, training from the run with truth labels); each step is checked on its own backend,
then the two backends are compared. 32-pixel frames, 24 frames, a tiny network, one epoch.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from bluesky import RunEngine
from tiled.queries import Key

from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.replay import replay_run
from bluesky_ptychonn.archive.runs import select
from bluesky_ptychonn.archive.servers import FacilityServer, subscribe_archive
from bluesky_ptychonn.archive.training import train_from_runs
from bluesky_ptychonn.core.config import NetworkConfig, TrainConfig
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.errors import ConfigurationError
from bluesky_ptychonn.live.callback import PtychoNNCallback

STEP_M = 2e-7
SHAPE = (4, 6)
FRAMES = SHAPE[0] * SHAPE[1]
FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.1, retry_s=0.1)
TINY = NetworkConfig(input_pixels=32, base_channels=4, depth=2)
KEYS = ("amplitude", "phase", "weight")


class Outcome(NamedTuple):
    """What one backend gave: the live and replayed images with their metadata, and the trained model."""

    live: dict[str, np.ndarray]
    live_md: dict[str, Any]
    replayed: dict[str, np.ndarray]
    replayed_md: dict[str, Any]
    model_hash: str
    weights: dict[str, Any]


def _result(client, uid: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    node = client["processed"][uid]["ptychonn"]
    return {k: node[k].read() for k in KEYS}, dict(node.metadata)


def run_workflow(name: str, archive, make_devices, checkpoint: Path, tag: str) -> Outcome:
    """Scan, archive, reconstruct live, replay and train on one server; check each step there."""
    client, raw = archive.client, archive.raw
    run_engine = RunEngine({})
    callback = PtychoNNCallback.from_checkpoint(
        checkpoint, client, device="cpu", data_roots=[archive.data_dir], live=FAST
    )
    run_engine.subscribe(callback)
    subscribe_archive(run_engine, client)
    stage, detector = make_devices(archive.data_dir / f"{name}-{tag}")
    plan = ptycho_fly_scan(detector, stage, step_m=STEP_M, shape=SHAPE, exposure_s=2e-3, md={"campaign": tag})
    (uid,) = run_engine(plan)

    assert raw[uid].metadata["stop"]["exit_status"] == "success", name
    assert raw[uid]["primary"]["diffraction"].shape == (FRAMES, 32, 32), name
    found = [run.metadata["start"]["uid"] for run in select(raw, [Key("campaign") == tag])]
    assert found == [uid], name

    assert callback.wait(uid, 60), name
    live, live_md = _result(client, uid)
    assert live_md["status"] == "complete" and live_md["frames_done"] == FRAMES and live_md["errors"] == [], name

    options = LiveOptions(batch_size=10, max_wait_s=0.01)  # other batches than live's
    replay_run(raw[uid], Predictor.from_checkpoint(checkpoint, device="cpu"), client, options=options)
    replayed, replayed_md = _result(client, uid)
    assert replayed_md["source"] == "replay" and replayed_md["frames_done"] == FRAMES, name
    for key in KEYS:
        np.testing.assert_allclose(replayed[key], live[key], atol=1e-5, err_msg=f"{name}: replay {key}")

    model, info = train_from_runs(
        raw,
        [Key("campaign") == tag],
        label_source="truth",
        network=TINY,
        config=TrainConfig(epochs=1, batch_size=8, seed=7),
        device="cpu",
        progress=False,
    )
    assert info.provenance["run_uids"] == [uid] and info.provenance["label_source"] == "truth", name
    return Outcome(live, live_md, replayed, replayed_md, info.content_hash, model.state_dict())


def test_postgresql_gives_the_same_results_as_sqlite(postgres_serve, tiled_server, make_devices, checkpoint, request):
    tag = uuid.uuid4().hex
    sqlite = run_workflow("sqlite", tiled_server, make_devices, checkpoint, tag)  # while PostgreSQL's Tiled starts
    postgresql = run_workflow("postgresql", request.getfixturevalue("postgres_tiled"), make_devices, checkpoint, tag)

    for key in KEYS:
        np.testing.assert_allclose(postgresql.live[key], sqlite.live[key], atol=1e-5, err_msg=f"live {key}")
        np.testing.assert_allclose(postgresql.replayed[key], sqlite.replayed[key], atol=1e-5, err_msg=key)
    for field in ("status", "frames_done", "grid", "model_hash", "pixel_size_m"):
        assert postgresql.live_md.get(field) == sqlite.live_md.get(field), field
        assert postgresql.replayed_md.get(field) == sqlite.replayed_md.get(field), field
    # The same frames and truth labels from either catalog train the same weights from the same seed.
    for key, weight in sqlite.weights.items():
        np.testing.assert_allclose(postgresql.weights[key].numpy(), weight.numpy(), atol=1e-6, err_msg=key)
    assert postgresql.model_hash == sqlite.model_hash


def test_serve_keeps_the_api_key_and_database_password_off_command_lines(postgres_tiled, postgres):
    """``ps`` shows every user a command line: neither ``serve`` nor its tiled child may carry a secret."""
    proc = Path("/proc")
    if not proc.is_dir():
        pytest.skip("no /proc to read command lines from")
    serve = postgres_tiled.server.pid
    children = (proc / str(serve) / "task" / str(serve) / "children").read_text().split()
    assert children, "serve runs tiled as a child process"
    key = postgres_tiled.client.context.api_key
    for pid in (serve, *map(int, children)):
        argv = (proc / str(pid) / "cmdline").read_bytes().decode().split("\0")
        assert key not in " ".join(argv) and postgres.password not in " ".join(argv), argv[:6]
    tiled = (proc / children[0] / "cmdline").read_bytes().decode().split("\0")
    assert postgres.uri in tiled  # the catalog really is the PostgreSQL database


def test_a_catalog_database_that_cannot_be_opened_is_one_clear_error(postgres, tmp_path, monkeypatch):
    def server(catalog: str) -> FacilityServer:
        return FacilityServer(tmp_path, "a1" * 16, catalog=catalog)

    monkeypatch.setenv("PGPASSWORD", postgres.password)
    server(postgres.uri).check_catalog()  # reachable: nothing to say
    with pytest.raises(ConfigurationError, match='database "nope" does not exist'):
        server(postgres.uri.rsplit("/", 1)[0] + "/nope").check_catalog()
    with pytest.raises(ConfigurationError, match="Connect call failed|refused"):
        server(postgres.uri.replace(f":{postgres.port}/", ":1/")).check_catalog()
    monkeypatch.setenv("PGPASSWORD", "wrong")
    with pytest.raises(ConfigurationError, match="password authentication failed"):
        server(postgres.uri).check_catalog()
    with pytest.raises(ConfigurationError, match="PGPASSWORD") as refused:
        server(postgres.uri.replace("postgres@", "postgres:hunter2@"))
    assert "hunter2" not in str(refused.value)
