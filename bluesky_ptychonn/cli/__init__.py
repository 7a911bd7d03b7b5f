"""The ``bluesky-ptychonn`` command line.

Sub-commands are registered by small ``_add_*`` functions; each imports its heavy modules only
when it runs, so ``bluesky-ptychonn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import PtychoNNError

logger = logging.getLogger("bluesky_ptychonn")


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write a simulated scan and its ground truth to HDF5")
    p.add_argument("out", type=Path, help="HDF5 file to write")
    p.add_argument("--object-seed", type=int, default=0, help="seed of the random-features object")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of Poisson noise and position jitter")
    p.add_argument("--scan", choices=("raster", "snake", "fermat"), default="raster")
    p.add_argument("--rows", type=int, default=32, help="scan lines (raster/snake)")
    p.add_argument("--cols", type=int, default=32, help="points per line (raster/snake)")
    p.add_argument("--overlap", type=float, default=0.5, help="probe overlap between neighbours, 0..1")
    p.add_argument("--step-m", type=float, default=None, help="scan step in metres (overrides --overlap)")
    p.add_argument("--photons", type=float, default=1e6, help="photons per frame through free space")
    p.add_argument("--probe", choices=("zone_plate", "gaussian"), default="zone_plate")
    p.add_argument("--energy-ev", type=float, default=10_000.0)
    p.add_argument("--distance-m", type=float, default=2.0)
    p.add_argument("--detector-pixel-m", type=float, default=75e-6)
    p.add_argument("--frame-pixels", type=int, default=64)
    p.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> dict:
    from ..core.config import DetectorGeometry
    from ..files.scanfile import write_scan
    from ..sim.physics import simulate_scan

    geometry = DetectorGeometry(
        energy_ev=args.energy_ev,
        distance_m=args.distance_m,
        detector_pixel_m=args.detector_pixel_m,
        frame_pixels=args.frame_pixels,
    )
    scan = simulate_scan(
        geometry=geometry,
        object_seed=args.object_seed,
        noise_seed=args.noise_seed,
        scan_kind=args.scan,
        scan_shape=(args.rows, args.cols),
        overlap=args.overlap,
        step_m=args.step_m,
        probe={"kind": args.probe},
        photons_per_frame=args.photons,
    )
    write_scan(args.out, scan)
    return {
        "file": str(args.out),
        "frames": len(scan.frames),
        "pixel_size_m": scan.grid.pixel_size_m,
        **scan.metadata["scan"],
    }


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on simulated scan files (labels: their ground truth)")
    p.add_argument(
        "scans", nargs="+", help="HDF5 scan files with /entry/simulation_truth; FILE:0.6 = first 60 %% of lines"
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--lines", type=float, default=1.0, help="default fraction of each scan's lines to use (first lines)"
    )
    p.add_argument("--batch-norm", action="store_true", help="BatchNorm after every convolution (trains faster)")
    p.add_argument("--network", choices=("paper", "small"), default="paper")
    p.add_argument(
        "--transform",
        choices=("sqrt", "log1p", "none", "auto"),
        default="sqrt",
        help="input transform; 'auto' picks the best on the held-out block after short trials",
    )
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=5, help="epochs of plateau before the rate halves")
    p.add_argument("--loss-window", choices=("gaussian", "uniform"), default="gaussian")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> dict:
    from ..core.checkpoint import save_checkpoint
    from ..core.config import NetworkConfig, PreprocessRecipe, TrainConfig
    from ..core.training import choose_transform, fit
    from ..files.datasets import training_set_from_files

    data = training_set_from_files(args.scans, lines=args.lines)
    network = NetworkConfig.preset(args.network, data.amplitude.shape[-1]).model_copy(
        update={"batch_norm": args.batch_norm}
    )
    recipe = PreprocessRecipe(
        frame_shape=tuple(data.frames.shape[1:]), transform="sqrt" if args.transform == "auto" else args.transform
    )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        plateau_patience=args.patience,
        seed=args.seed,
        loss_window=args.loss_window,
    )
    scores = None
    if args.transform == "auto":
        trial = config.model_copy(update={"epochs": max(2, args.epochs // 5)})
        best, scores = choose_transform(data, network, recipe, trial, device=args.device)
        recipe = recipe.model_copy(update={"transform": best})
    model, info = fit(data, network, recipe, config, device=args.device)
    if scores:
        info.metrics["transform_trials"] = scores
    info = save_checkpoint(args.out, model, info)
    return {
        "checkpoint": str(args.out),
        "content_hash": info.content_hash,
        **{k: v for k, v in info.metrics.items() if k != "history"},
    }


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="stitched amplitude/phase of a scan file, with metrics and a PNG")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("scan", type=Path)
    p.add_argument("--out-dir", type=Path, default=Path("reconstruction"))
    p.add_argument("--skip-lines", type=float, default=0.0, help="reconstruct only after this fraction of scan lines")
    p.add_argument("--window", choices=("gaussian", "central", "uniform"), default="gaussian")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_reconstruct)


def _reconstruct(args: argparse.Namespace) -> dict:
    import time

    import numpy as np

    from ..core.geometry import ObjectGrid, split_lines
    from ..core.inference import Predictor
    from ..core.reconstruct import evaluate, reconstruct
    from ..files.figures import save_figure
    from ..files.results import write_result
    from ..files.scanfile import read_scan

    scan = read_scan(args.scan)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    idx = split_lines(scan.positions_m, args.skip_lines)[1] if args.skip_lines else np.arange(len(scan.frames))
    pixel = predictor.info.recipe.pixel_size_m(scan.geometry)
    grid = scan.truth_grid if scan.truth_grid is not None and np.isclose(scan.truth_grid.pixel_size_m, pixel) else None
    grid = grid or ObjectGrid.covering(scan.positions_m[idx], pixel, predictor.patch_pixels)
    started = time.perf_counter()
    image = reconstruct(predictor, scan.frames[idx], scan.positions_m[idx], grid=grid, window=args.window)
    summary: dict = {
        "frames": int(len(idx)),
        "device": str(predictor.device),
        "seconds": time.perf_counter() - started,
        "model_hash": predictor.info.content_hash,
    }
    panels = [("PtychoNN", image.amplitude, image.phase)]
    if scan.truth is not None and grid == scan.truth_grid:
        summary.update(evaluate(image, scan.truth, grid))
        panels.append(("ground truth", np.abs(scan.truth), np.angle(scan.truth)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_result(args.out_dir / "reconstruction.h5", image, summary)
    save_figure(
        args.out_dir / "reconstruction.png",
        panels,
        grid,
        mask=image.covered(0.5),
        title=f"{args.scan.name}: {len(idx)} frames",
    )
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _add_consume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("consume", help="reconstruct live the runs published through a bluesky-0MQ-proxy")
    p.add_argument(
        "--config", type=Path, required=True, help="TOML service configuration (see callbacks/ptychonn.toml)"
    )
    p.set_defaults(func=_consume)


def _consume(args: argparse.Namespace) -> None:
    from ..live.service import consume, load_config

    consume(load_config(args.config))


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from ..archive.servers import add_serve_command

    add_serve_command(sub)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    from ..archive.replay import add_replay_command

    add_replay_command(sub)


def _add_iterative(sub: argparse._SubParsersAction) -> None:
    from ..archive.labels import add_iterative_command

    add_iterative_command(sub)


def _add_train_runs(sub: argparse._SubParsersAction) -> None:
    from ..archive.training import add_train_runs_command

    add_train_runs_command(sub)


def _add_fine_tune(sub: argparse._SubParsersAction) -> None:
    from ..archive.training import add_fine_tune_command

    add_fine_tune_command(sub)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_simulate,
    _add_train,
    _add_reconstruct,
    _add_serve,
    _add_consume,
    _add_replay,
    _add_iterative,
    _add_train_runs,
    _add_fine_tune,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="bluesky-ptychonn", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the command's result as JSON. Exit 2 on a bad input, with the reason."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        result = args.func(args)
    except PtychoNNError as err:
        print(f"bluesky-ptychonn {args.command}: error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
