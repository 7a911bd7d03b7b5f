"""``callbacks/DEPLOYMENT.md`` stays true: its commands parse, and its Dask section runs here as written.

Commands that need a facility (PostgreSQL roles, a batch system, several nodes) are parsed by the
real parsers; the Dask scheduler, workers and reprocessing commands run on this machine against the
session's Tiled server, with the guide's addresses, selection and model replaced by the test's.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from bluesky import RunEngine
from tiled_servers import free_port

from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.servers import subscribe_archive
from bluesky_ptychonn.cli import build_parser, main

GUIDE = (Path(__file__).resolve().parents[1] / "callbacks" / "DEPLOYMENT.md").read_text()
SHELL = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", GUIDE, flags=re.S) if lang == "sh"]
BIN = Path(sys.executable).parent


def _lines() -> list[str]:
    """Every command line of the guide's shell blocks, environment assignments and ``export`` lines dropped."""
    found = []
    for body in SHELL:
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"^(\w+=\S+\s+)+", "", line.strip()).replace("$NODE_RANK", "0").replace("$HEAD", "head")
            if line and not line.startswith(("export ", "#")):
                found.append(line)
    return found


def _ours(line: str) -> list[str] | None:
    """The package's arguments of a line that runs it (directly or under torchrun), else None."""
    words = shlex.split(line)
    for i, word in enumerate(words):
        module = word in ("bluesky_ptychonn", "bluesky_ptychonn.cli") and words[i - 1] == "-m"
        if word == "bluesky-ptychonn" or module:
            return words[i + 1 :]
    return None


def test_the_guide_names_every_piece():
    lines = _lines()
    for piece in ("serve", "consume", "replay", "iterative", "refine", "train-runs", "pretrain", "fine-tune"):
        assert any((_ours(line) or [None])[0] == piece for line in lines), piece
    assert any(line.startswith("torchrun ") for line in lines)
    assert any(line.startswith("dask worker ") for line in lines)


@pytest.mark.parametrize("line", [line for line in _lines() if _ours(line) is not None])
def test_package_commands_parse(line):
    build_parser().parse_args(_ours(line))


@pytest.mark.parametrize(
    "line", [line for line in _lines() if line.split()[0] in ("dask", "bluesky-0MQ-proxy", "torchrun")]
)
def test_other_tools_take_the_options_the_guide_gives_them(line):
    words = shlex.split(line)
    program = [str(BIN / words[0])] + ([words[1]] if words[0] == "dask" else [])
    text = subprocess.run([*program, "--help"], capture_output=True, text=True, timeout=60).stdout
    if words[0] == "torchrun":  # its own options come before the program it runs
        words = words[: next(i for i, w in enumerate(words) if w in ("-m", "bluesky-ptychonn"))]
    used = [w.split("=")[0] for w in words if w.startswith("--")]
    assert used and all(option in text for option in used), (used, text[-2000:])


@pytest.mark.slow
def test_the_dask_section_runs_as_written(tiled_server, make_devices, tmp_path, checkpoint, monkeypatch, capsys):
    """A scheduler and two single-threaded workers as the guide starts them, then its replay command: the
    images equal those one process makes."""
    scheduler_line = next(line for line in _lines() if line.startswith("dask scheduler"))
    worker_line = next(line for line in _lines() if line.startswith("dask worker"))
    replay_line = next(line for line in _lines() if (_ours(line) or [None])[0] == "replay" and "--scheduler" in line)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "TILED_API_KEY": tiled_server.server.api_key}
    env["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__OMP_NUM_THREADS"] = "1"
    scheduler_words = shlex.split(scheduler_line.replace("0.0.0.0", "127.0.0.1").replace("8786", str(port)))
    worker_words = shlex.split(worker_line.replace("tcp://scheduler.example:8786", address))
    processes = [
        subprocess.Popen([str(BIN / "dask"), *scheduler_words[1:]], env=env, stderr=subprocess.DEVNULL),
        subprocess.Popen([str(BIN / "dask"), *worker_words[1:]], env=env, stderr=subprocess.DEVNULL),
    ]
    try:
        run_engine = RunEngine({})
        subscribe_archive(run_engine, tiled_server.client)
        stage, detector = make_devices(tiled_server.data_dir / tmp_path.name)
        tag = uuid.uuid4().hex
        scan = dict(step_m=2e-7, shape=(3, 4), exposure_s=2e-3, md={"campaign": tag})
        uids = [run_engine(ptycho_fly_scan(detector, stage, **scan))[0] for _ in range(3)]
        _wait_for_workers(address, 2)

        monkeypatch.setenv("TILED_API_KEY", tiled_server.server.api_key)
        args = _ours(replay_line.replace("tcp://scheduler.example:8786", address))
        args = [f"start.campaign={tag}" if a.startswith("sample_id=") else a for a in args]
        args[args.index("--checkpoint") + 1] = str(checkpoint)
        uri = tiled_server.server.uri.split("?")[0]
        assert main([*args, "--tiled-uri", uri, "--device", "cpu"]) == 0
        summaries = json.loads(capsys.readouterr().out)
        assert [s["raw_uid"] for s in summaries] == uids
        assert all(s["status"] == "complete" and s["frames_done"] == 12 for s in summaries), summaries
        # The same images as one process.
        assert main(["replay", *uids, "--name", "here", "--checkpoint", str(checkpoint), "--tiled-uri", uri]) == 0
        capsys.readouterr()
        for uid in uids:
            node = tiled_server.client["processed"][uid]
            for key in ("amplitude", "phase", "weight"):
                np.testing.assert_array_equal(node["ptychonn"][key].read(), node["here"][key].read())
    finally:
        for process in processes[::-1]:
            process.terminate()
            process.wait(30)


def _wait_for_workers(address: str, n: int, timeout_s: float = 120) -> None:
    from distributed import Client

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with Client(address, timeout="5s", set_as_default=False) as client:
                client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
