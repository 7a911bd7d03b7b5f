"""Training under ``torchrun``: two gloo processes on the CPU train the model that one process trains.

Each process takes ``batch[rank::2]`` of the same global batch and DistributedDataParallel averages
the gradients, so two processes compute the one-process step up to rounding: the order of the sums
in convolutions and in the all-reduce differs. Adam divides each gradient by its own running size,
which lifts rounding in near-zero gradients to steps of order ``lr``; the weights therefore agree to
``WEIGHT_ATOL``, not to float32 epsilon. Measured on the test's case (57 training frames in batches
of 7: shares of 4 and 3 frames, and a last batch of one frame that leaves rank 1 none; the weights
kept are the first epoch's, after 9 steps): 1.4e-5 between one and two processes; 3e-6 between one
process with 1 thread and with 2; 1.8e-2 for another split of the same frames (batches of 6), the size
of a real error. Dropping the weighting of the shares moves the best validation loss by 10 %.

Pretraining on streams: each process draws its own stream, the writer's clock, recipe and
validation decide, and every process ends at the same step with the same model.

One ``torchrun`` job (two processes) does both, as starting it costs more than either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bluesky_ptychonn.cli import main
from bluesky_ptychonn.core.checkpoint import read_info
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.files.scanfile import write_scan
from bluesky_ptychonn.sim.physics import simulate_scan

#: Largest difference allowed between a weight trained by one process and by two (see the module's docstring).
WEIGHT_ATOL = 1e-4
#: Relative difference allowed between their losses (measured: 3e-7 for the best validation loss).
LOSS_RTOL = 1e-3

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TRAIN_ARGS = ["--network", "small", "--epochs", "2", "--batch-size", "7", "--seed", "1", "--device", "cpu"]

#: What each of the two processes runs: the ``train`` command (``bluesky-ptychonn train``), then a
#: short pretraining on its own simulated stream, each process's results left in the folder.
JOB = """
import json, sys
import torch
from bluesky_ptychonn.cli import main
from bluesky_ptychonn.core import distributed
from bluesky_ptychonn.core.config import DetectorGeometry, NetworkConfig
from bluesky_ptychonn.core.pretrain import StreamConfig, fit_stream
from bluesky_ptychonn.sim.family import FamilyConfig, FamilySource
from bluesky_ptychonn.sim.pretraining import base_recipe

folder, train_args = sys.argv[1], sys.argv[2:]
assert main(train_args) == 0

rank = distributed.rank()
family = FamilyConfig(geometry=DetectorGeometry(frame_pixels=32), scenes_per_batch=2, seed=7 + rank)
source = FamilySource(family)
validation = [FamilySource(family.model_copy(update={"seed": 99 + rank})).batch(0)]  # differs by rank too
recipe = base_recipe(validation[0].frames)
network = NetworkConfig(input_pixels=32, base_channels=4, depth=2, batch_norm=True)
out = f"{folder}/stream{rank}.safetensors"
config = StreamConfig(steps=4, validate_every=2, seed=1)
model, info = fit_stream(source.stream(), validation, network, recipe, config, device="cpu", out=out, progress=False)
torch.save(model.state_dict(), f"{folder}/stream{rank}.pt")
summary = {k: info.provenance[k] for k in ("steps", "frames_seen", "distributed")}
summary |= {"mine": sum(len(source.batch(i).frames) for i in range(4)), "own_scale": recipe.scale}
summary |= {"scale": info.recipe.scale, "history": [h["step"] for h in info.metrics["history"]]}
with open(f"{folder}/stream{rank}.json", "w") as f:
    json.dump(summary, f)
"""


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory) -> Path:
    scan = simulate_scan(
        geometry=DetectorGeometry(frame_pixels=32), scan_shape=(7, 9), probe={"kind": "gaussian", "fwhm_px": 8}
    )
    return write_scan(tmp_path_factory.mktemp("scan") / "scan.h5", scan)


@pytest.fixture(scope="module")
def job(scan_file, tmp_path_factory) -> Path:
    """The folder of one two-process gloo job (``torchrun --standalone --nproc_per_node 2``).

    ``two/model.safetensors`` is the ``train`` command's checkpoint; ``logs`` holds each rank's stdout.
    """
    folder = tmp_path_factory.mktemp("job")
    (folder / "job.py").write_text(JOB)
    train = ["train", str(scan_file), *TRAIN_ARGS, "--out", str(folder / "two" / "model.safetensors")]
    torchrun([str(folder / "job.py"), str(folder), *train], folder / "logs")
    return folder


def torchrun(args: list[str], logs: Path, **env: str) -> None:
    """``args`` in two processes on this machine (gloo on the CPU), each one's stdout in ``logs``."""
    environ = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES} | env
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--log-dir", str(logs), "--redirects", "1", *args]
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def rank_stdout(logs: Path) -> dict[int, str]:
    """Each rank's stdout, by rank (torchrun writes ``<log dir>/<job>/attempt_0/<rank>/stdout.log``)."""
    return {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}


def test_two_gloo_processes_train_the_model_one_process_trains(job, scan_file, tmp_path, monkeypatch, capsys):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    one, two = tmp_path / "model.safetensors", job / "two" / "model.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: the comparison is of the split, not of threads
    try:
        assert main(["train", str(scan_file), *TRAIN_ARGS, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    info_one, weights_one = read_info(one)
    info_two, weights_two = read_info(two)
    # One process wrote and printed: rank 0's summary names the file; rank 1 printed nothing.
    out = rank_stdout(job / "logs")
    assert sorted(out) == [0, 1] and out[1] == ""
    assert json.loads(out[0])["content_hash"] == info_two.content_hash
    assert sorted(p.name for p in two.parent.iterdir()) == ["model.safetensors"]  # no second write left behind

    assert info_one.provenance["distributed"] == {"world_size": 1, "backend": None}
    assert info_two.provenance["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert info_two.recipe == info_one.recipe  # the input scale is fitted on the same frames
    assert info_two.metrics["best_epoch"] == info_one.metrics["best_epoch"]
    assert info_two.metrics["best_val_loss"] == pytest.approx(info_one.metrics["best_val_loss"], rel=LOSS_RTOL)
    for h_one, h_two in zip(info_one.metrics["history"], info_two.metrics["history"], strict=True):
        assert h_two["train_loss"] == pytest.approx(h_one["train_loss"], rel=LOSS_RTOL)
    worst = max(float((weights_two[k] - weights_one[k]).abs().max()) for k in weights_one)
    assert worst < WEIGHT_ATOL, f"weights differ by up to {worst:.2e}"


def test_streams_of_every_process_train_one_model_saved_once(job):
    out = {rank: json.loads((job / f"stream{rank}.json").read_text()) for rank in (0, 1)}
    assert (job / "stream0.safetensors").exists() and not (job / "stream1.safetensors").exists()
    saved, _ = read_info(job / "stream0.safetensors")
    assert saved.provenance["distributed"] == {"world_size": 2, "backend": "gloo"}
    # Every process stopped at the same step, counted both streams' frames and used the writer's scale.
    assert out[0]["steps"] == out[1]["steps"] == 4 and out[0]["history"] == out[1]["history"] == [0, 2, 4]
    assert out[0]["frames_seen"] == out[1]["frames_seen"] == out[0]["mine"] + out[1]["mine"]
    assert out[1]["own_scale"] != out[0]["own_scale"] and out[1]["scale"] == out[0]["scale"] == saved.recipe.scale
    # ... and returns the same model, weights and BatchNorm statistics alike.
    first, second = torch.load(job / "stream0.pt"), torch.load(job / "stream1.pt")
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


@pytest.mark.slow
def test_train_runs_under_torchrun_labels_and_registers_from_the_writer(tiled_server, make_devices, tmp_path):
    """Iterative labels are computed and stored by rank 0 alone; rank 1 reads them; one model is registered."""
    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.labels import read_iterative
    from bluesky_ptychonn.archive.servers import subscribe_archive

    run_engine = RunEngine({})
    subscribe_archive(run_engine, tiled_server.client)
    stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=3e-7, shape=(6, 8), exposure_s=2e-3))
    out = tmp_path / "model.safetensors"
    args = ["-m", "bluesky_ptychonn.cli", "train-runs", uid, "--labels", "iterative", "--iterative-epochs", "3"]
    args += ["--iterative-device", "cpu", "--from-scratch", "--network", "small", "--epochs", "1", "--device", "cpu"]
    args += ["--out", str(out), "--tiled-uri", tiled_server.server.uri.split("?")[0], "--api-key-env", "TEST_KEY"]
    torchrun(args, tmp_path / "logs", TEST_KEY=tiled_server.server.api_key)
    out_by_rank = rank_stdout(tmp_path / "logs")
    assert out_by_rank[1] == ""
    summary = json.loads(out_by_rank[0])
    info, _ = read_info(out)
    assert summary["content_hash"] == info.content_hash and summary["registered"] == f"models/{info.content_hash}"
    assert info.provenance["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert info.provenance["sources"][0]["computed_for_training"]  # by the writer, before the others read them
    assert read_iterative(tiled_server.client, uid)[2]["epochs"] == 3
