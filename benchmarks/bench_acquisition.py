"""Acquisition rate of the simulated fly scan: frames/s with and without TiledWriter.

A 10,000-frame (100 x 100) snake of 64 x 64 frames over the default 2048 x 2048 sample, on a
real RunEngine. Three figures: the detector alone (simulate + HDF5 write, no RunEngine), the
plan with no subscriber, and the plan with ``TiledWriter(raw, batch_size=1)`` into an embedded
Tiled server (frames registered at every flush). Sample generation and server start-up are
excluded; the one-off cost of storing the sample's ground truth in Tiled is reported apart.
Then what archiving costs a paced scan (400 frames at 94 frames/s, the live benchmark's pace on
the 2-core CPU when this was written, a flush every 0.1 s): this process's CPU time over wall
time, in cores, with and without TiledWriter (the embedded server's threads are in this process),
and the requests it made.

    python benchmarks/bench_acquisition.py [--frames 10000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACED_SHAPE, PACED_PERIOD_S, PACED_CHUNK = (20, 20), 0.0106, 8  # 400 frames at a steady 94 frames/s


def _machine() -> dict:
    sys.path.insert(0, str(HERE))
    try:
        from machine import describe  # the project's machine description (benchmarks/machine.py)

        info = describe("cpu")
    except ImportError:
        import os

        info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    return {**info, "platform": platform.platform()}


def run(quick: bool = False, frames: int = 10_000, frame_pixels: int = 64) -> dict:
    """Run the three measurements; ``quick`` uses 2,000 frames."""
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.servers import start_embedded_server
    from bluesky_ptychonn.archive.truth import store_simulation_truth
    from bluesky_ptychonn.core.config import DetectorGeometry
    from bluesky_ptychonn.sim.sample import DetectorSettings, FlyScan, FlyTrajectory, SimulatedSample, default_registry

    frames = 2_000 if quick else frames
    cols = int(math.sqrt(frames))
    rows = frames // cols
    frames = rows * cols
    geometry = DetectorGeometry(frame_pixels=frame_pixels)
    sample = default_registry().register(SimulatedSample.for_geometry(f"bench-{frame_pixels}px", geometry, seed=0))
    started = time.perf_counter()
    _ = sample.object  # generated once, outside the timings
    generate_s = time.perf_counter() - started
    step_m = 2.5e-7
    result: dict = {
        "benchmark": "acquisition",
        "frames": frames,
        "scan_shape": [rows, cols],
        "frame_pixels": frame_pixels,
        "sample_pixels": list(sample.shape_px),
        "sample_generation_s": generate_s,
    }

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)

        def devices(data_dir: Path) -> tuple[SimStage, PtychoDetector]:
            stage = SimStage(name="stage")
            detector = PtychoDetector(
                name="ptycho",
                stage=stage,
                data_dir=data_dir,
                sample=sample.sample_id,
                settings=DetectorSettings(geometry=geometry, chunk_frames=64),
            )
            return stage, detector

        def plan(stage: SimStage, detector: PtychoDetector):
            return ptycho_fly_scan(
                detector, stage, step_m=step_m, shape=(rows, cols), exposure_s=1e-3, flush_period_s=0.5
            )

        # 1. The detector alone: simulate and write, no RunEngine.
        stage, detector = devices(tmp_path / "alone")
        trajectory = FlyTrajectory("snake", (rows, cols), step_m, (0.0, 0.0), period_s=1e-3, exposure_s=1e-3)
        detector.prepare(FlyScan(trajectory, detector.settings, sample))
        started = time.perf_counter()
        detector.kickoff()
        detector.complete().wait(600)
        result["detector_only_fps"] = frames / (time.perf_counter() - started)

        # 2. The plan on a RunEngine, no subscriber.
        stage, detector = devices(tmp_path / "plain")
        run_engine = RunEngine({})
        counts: dict[str, int] = {}
        run_engine.subscribe(lambda name, doc: counts.__setitem__(name, counts.get(name, 0) + 1))
        started = time.perf_counter()
        run_engine(plan(stage, detector))
        result["without_tiledwriter_fps"] = frames / (time.perf_counter() - started)
        result["documents"] = dict(counts)

        # 3. The same with TiledWriter into an embedded Tiled server.
        archive = start_embedded_server(tmp_path / "tiled-data", directory=tmp_path / "tiled")
        try:
            started = time.perf_counter()
            store_simulation_truth(archive.client, sample)
            result["store_truth_once_s"] = time.perf_counter() - started
            stage, detector = devices(archive.data_dir)
            run_engine = RunEngine({})
            run_engine.subscribe(TiledWriter(archive.raw, batch_size=1))
            started = time.perf_counter()
            (uid,) = run_engine(plan(stage, detector))
            result["with_tiledwriter_fps"] = frames / (time.perf_counter() - started)
            shape = archive.raw[uid]["primary"]["diffraction"].shape
            if shape != (frames, frame_pixels, frame_pixels):
                raise RuntimeError(f"Tiled holds {shape} frames, expected {frames}")
            result["tiled_frames_shape"] = list(shape)

            # 4. A paced scan: how many cores archiving takes while the detector runs at a steady rate.
            for archived in (False, True):
                stage, detector = devices(archive.data_dir)
                detector.settings = detector.settings.updated(paced=True, chunk_frames=PACED_CHUNK)
                run_engine = RunEngine({})
                requests: list[object] = []
                if archived:
                    run_engine.subscribe(TiledWriter(archive.raw, batch_size=1))
                    archive.client.context.http_client.event_hooks["request"].append(requests.append)
                wall, cpu = time.perf_counter(), time.process_time()
                run_engine(
                    ptycho_fly_scan(
                        detector, stage, step_m=step_m, shape=PACED_SHAPE, exposure_s=PACED_PERIOD_S, flush_period_s=0.1
                    )
                )
                cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
                result["paced_cores_with_tiledwriter" if archived else "paced_cores_without_tiledwriter"] = cores
            result["paced_tiled_requests"] = len(requests)
        finally:
            archive.close()
    result["machine"] = _machine()
    print(
        f"   {result['machine']['cpu']} ({result['machine']['cpu_count']} cores): {frames} frames of "
        f"{frame_pixels}x{frame_pixels}: detector alone {result['detector_only_fps']:.0f} frames/s, "
        f"fly scan without TiledWriter {result['without_tiledwriter_fps']:.0f} frames/s, "
        f"with TiledWriter {result['with_tiledwriter_fps']:.0f} frames/s; paced at {1 / PACED_PERIOD_S:.0f} frames/s, "
        f"this process used {result['paced_cores_without_tiledwriter']:.2f} cores, "
        f"{result['paced_cores_with_tiledwriter']:.2f} with TiledWriter ({result['paced_tiled_requests']} requests)"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON result")
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--frame-pixels", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2,000 frames")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, frames=args.frames, frame_pixels=args.frame_pixels)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_acquisition-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
