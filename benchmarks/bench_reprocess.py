"""Reprocessing a query of runs: runs per minute in one process and on a one- and two-worker Dask cluster.

A real RunEngine flies the simulated detector (64x64 frames, HDF5 files) into an embedded Tiled
server, several runs of the same campaign; then ``bluesky-ptychonn replay start.campaign=...``
replays them all with the shipped base model, in this process and on a running ``LocalCluster``
of one and of two single-threaded worker processes (``--scheduler``, through
:func:`~bluesky_ptychonn.archive.cluster.map_runs`; each worker reads its runs and writes its
results through Tiled). Reported: runs per minute for each, the ratio to one process, whether
every image equals the one-process image (they must: same model, same frames, same grid), and
apart, the seconds the cluster took to start (``--workers N`` pays them on every command). Each
way runs the command twice: the first pays each worker's imports and model load, the second
is what a long-lived cluster gives.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from machine import describe, device_name


def run(quick: bool = False) -> dict:
    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.cluster import restore_environment
    from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_archive
    from bluesky_ptychonn.cli import main

    runs, shape = (4, (12, 12)) if quick else (8, (20, 20))
    machine = describe("cpu")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "server")
        try:
            stage = SimStage(name="stage")
            detector = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample="sim-features-0")
            run_engine = RunEngine({})
            subscribe_archive(run_engine, archive.client)
            tag = uuid.uuid4().hex
            for _ in range(runs):
                run_engine(ptycho_fly_scan(detector, stage, step_m=6e-7, shape=shape, md={"campaign": tag}))
            os.environ["BENCH_TILED_KEY"] = archive.server.api_key
            common = [f"start.campaign={tag}", "--checkpoint", "default-64", "--device", "cpu"]
            common += ["--tiled-uri", archive.server.uri.split("?")[0], "--api-key-env", "BENCH_TILED_KEY"]
            reference = None
            environ = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
            for label, workers in (("one process", 0), ("Dask, 1 worker", 1), ("Dask, 2 workers", 2)):
                name = label.replace(" ", "-").replace(",", "")
                started = time.perf_counter()
                cluster = _cluster(workers)
                up = time.perf_counter() - started
                extra = ["--scheduler", cluster.scheduler_address] if cluster else []
                try:
                    for attempt in ("first", "again"):  # again: imports done and the model loaded
                        started = time.perf_counter()
                        with contextlib.redirect_stdout(io.StringIO()):  # the command's JSON summaries
                            code = main(["replay", *common, *extra, "--name", name])
                        seconds = time.perf_counter() - started
                        images = _images(archive.client, name)
                        reference = reference or images
                        same = len(images) == runs and all(np.array_equal(images[u], reference[u]) for u in reference)
                        results.append(
                            {
                                "how": label,
                                "command": attempt,
                                "runs": runs,
                                "frames_per_run": shape[0] * shape[1],
                                "cluster_start_s": round(up, 1),
                                "seconds": round(seconds, 1),
                                "runs_per_minute": round(60 * runs / seconds, 1),
                                "exit_status": code,
                                "same_images_as_one_process": same,
                            }
                        )
                        print(
                            f"   {label}, {attempt}: {results[-1]['runs_per_minute']} runs/min, same: {same}",
                            flush=True,
                        )
                finally:
                    if cluster:
                        cluster.close()
                        restore_environment(environ)  # the nannies' OMP_NUM_THREADS=1 would stay in this process
        finally:
            archive.close()
    base = {row["command"]: row["runs_per_minute"] for row in results if row["how"] == "one process"}
    for row in results:
        row["ratio_to_one_process"] = round(row["runs_per_minute"] / base[row["command"]], 2)
    return {
        "benchmark": "reprocessing a query of runs (replay), one process against Dask workers",
        "machine": machine,
        "results": results,
        "note": f"On {device_name(machine)}; replay of the shipped base model (default-64); cluster start-up apart.",
    }


def _cluster(workers: int):
    """A LocalCluster of single-threaded worker processes, each with its share of the cores (None: 0 workers)."""
    if not workers:
        return None
    import dask
    from distributed import LocalCluster

    # torch's pool in each worker: the cores shared out (Dask would start each with OMP_NUM_THREADS=1); the
    # profiler off, as bluesky-ptychonn's own clusters have it (a worker hung starting a thread with it on).
    threads = max(1, (os.cpu_count() or 1) // workers)
    settings = {
        "distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": threads,
        "distributed.worker.profile.enabled": False,
    }
    with dask.config.set(settings):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")


def _images(client, name: str) -> dict[str, np.ndarray]:
    processed = client["processed"]
    return {uid: processed[uid][name]["phase"].read() for uid in processed if name in processed[uid]}
