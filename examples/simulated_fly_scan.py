"""Fly-scan a simulated sample with a Bluesky RunEngine and archive the raw run in Tiled.

By default an embedded Tiled server runs in this process (catalog and files under --directory);
with --uri the run goes to a running server instead (for example one started with
``bluesky-ptychonn serve``), whose readable storage must include --data-dir; its API key comes
from ``$TILED_API_KEY``, never the command line. Prints the Tiled URI of the run and its uid.

    python examples/simulated_fly_scan.py --rows 16 --cols 16
    TILED_API_KEY=... python examples/simulated_fly_scan.py --uri http://127.0.0.1:8000/api/v1 --data-dir /data/det
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bluesky import RunEngine

from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.servers import connect, start_embedded_server, subscribe_archive, tiled_run_uri
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.sim.sample import DetectorSettings, SimulatedSample, default_registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--directory",
        type=Path,
        default=Path("fly-scan-output"),
        help="embedded server's catalog and storage (and default detector data)",
    )
    parser.add_argument("--uri", default=None, help="Tiled server to write to instead of an embedded one")
    parser.add_argument("--data-dir", type=Path, default=None, help="detector HDF5 folder (server-readable)")
    parser.add_argument("--rows", type=int, default=16, help="scan lines")
    parser.add_argument("--cols", type=int, default=16, help="points per line")
    parser.add_argument("--step-m", type=float, default=3e-7, help="scan step in metres")
    parser.add_argument(
        "--center-m",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        metavar=("Y", "X"),
        help="scan centre in metres; another centre scans a new region of the same sample",
    )
    parser.add_argument("--raster", action="store_true", help="raster with fly-back instead of snake")
    parser.add_argument("--exposure-s", type=float, default=1e-3)
    parser.add_argument("--photons", type=float, default=1e6, help="photons per frame")
    parser.add_argument("--frame-pixels", type=int, default=64)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--sample-pixels", type=int, default=2048, help="side of the simulated sample")
    parser.add_argument("--paced", action="store_true", help="produce frames in real time")
    parser.add_argument("--serve-s", type=float, default=0.0, help="keep the embedded server up this long")
    args = parser.parse_args(argv)

    geometry = DetectorGeometry(frame_pixels=args.frame_pixels)
    sample_id = f"sim-features-{args.sample_seed}"
    if (args.frame_pixels, args.sample_pixels) != (64, 2048):  # the registered samples suit 64-pixel frames
        sample_id += f"-{args.frame_pixels}px-{args.sample_pixels}"
    default_registry().register(
        SimulatedSample.for_geometry(sample_id, geometry, seed=args.sample_seed, shape_px=(args.sample_pixels,) * 2)
    )

    archive = None
    if args.uri:
        if args.data_dir is None:
            parser.error("--uri needs --data-dir, a folder the server can read")
        client, _ = connect(args.uri, api_key=os.environ.get("TILED_API_KEY"))
        data_dir = args.data_dir
    else:
        data_dir = args.data_dir or args.directory / "detector"
        archive = start_embedded_server(data_dir, directory=args.directory / "tiled")
        client = archive.client
    try:
        stage = SimStage(name="stage")
        settings = DetectorSettings(geometry=geometry, paced=args.paced)
        detector = PtychoDetector(name="ptycho", stage=stage, data_dir=data_dir, sample=sample_id, settings=settings)
        run_engine = RunEngine({})
        subscribe_archive(run_engine, client)
        plan = ptycho_fly_scan(
            detector,
            stage,
            step_m=args.step_m,
            shape=(args.rows, args.cols),
            center_m=tuple(args.center_m),
            snake=not args.raster,
            exposure_s=args.exposure_s,
            photons_per_frame=args.photons,
        )
        (uid,) = run_engine(plan)
        print(f"tiled_uri: {client.context.api_uri}")
        print(f"run_uri: {tiled_run_uri(client, uid)}")
        print(f"run_uid: {uid}")
        print(f"frames: {args.rows * args.cols} in {detector.path}")
        if archive is not None and args.serve_s > 0:
            print(f"serving for {args.serve_s} s (Ctrl-C stops); API key in: {archive.server.uri}", flush=True)
            time.sleep(args.serve_s)
    except KeyboardInterrupt:
        pass
    finally:
        if archive is not None:
            archive.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
