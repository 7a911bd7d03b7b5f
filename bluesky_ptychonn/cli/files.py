"""Commands on files: ``simulate`` a scan, ``train`` on scan files, ``pretrain`` a base model on the
simulated family, ``reconstruct`` a scan file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..core.config import DetectorGeometry, StreamConfig
from .options import (
    add_command,
    add_field,
    add_network_options,
    add_training_options,
    model_file,
    training_config,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate``, ``train`` and ``reconstruct`` to the sub-command parsers."""
    p = add_command(
        sub,
        "simulate",
        "write a simulated scan and its ground truth to HDF5",
        """  bluesky-ptychonn simulate scan.h5 --rows 24 --cols 24
  bluesky-ptychonn simulate test.h5 --object-seed 7 --scan fermat --photons 1e5""",
    )
    p.add_argument("out", type=Path, help="HDF5 file to write")
    p.add_argument("--object-seed", type=int, default=0, help="seed of the random-features object")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of Poisson noise and position jitter")
    p.add_argument(
        "--scan", choices=("raster", "snake", "fermat"), default="raster", help="scan pattern (default: raster)"
    )
    p.add_argument("--rows", type=int, default=32, help="scan lines (raster/snake)")
    p.add_argument("--cols", type=int, default=32, help="points per line (raster/snake)")
    p.add_argument("--overlap", type=float, default=0.5, help="probe overlap between neighbours, 0..1")
    p.add_argument("--step-m", type=float, default=None, help="scan step in metres (overrides --overlap)")
    p.add_argument("--photons", type=float, default=1e6, help="photons per frame through free space")
    p.add_argument(
        "--probe", choices=("zone_plate", "gaussian"), default="zone_plate", help="illumination (default: zone_plate)"
    )
    for name in DetectorGeometry.model_fields:
        add_field(p, "--" + name.replace("_", "-"), DetectorGeometry, name)
    p.set_defaults(func=simulate)

    p = add_command(
        sub,
        "train",
        "train a model on simulated scan files (labels: their ground truth)",
        """  bluesky-ptychonn train scan.h5:0.6 --out model.safetensors --network small --epochs 20
  bluesky-ptychonn train a.h5 b.h5 --out model.safetensors --transform auto""",
    )
    p.add_argument(
        "scans", nargs="+", help="HDF5 scan files with /entry/simulation_truth; FILE:0.6 = first 60 %% of lines"
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--lines", type=float, default=1.0, help="default fraction of each scan's lines to use (first lines)"
    )
    add_network_options(p, transforms=("sqrt", "log1p", "none", "auto"))
    add_training_options(p)
    p.set_defaults(func=train)

    p = add_command(
        sub,
        "pretrain",
        "train a base model on fresh simulated frames of a sample family",
        """  bluesky-ptychonn pretrain --out base.safetensors --minutes 30
  bluesky-ptychonn pretrain --out base.safetensors --probe-from beamline-scan.h5 --device cuda""",
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors), updated as it trains")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget (default: 60)")
    p.add_argument("--network", choices=("paper", "small"), default="small", help="network preset (default: small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated stream and the weights")
    for name in ("steps", "learning_rate", "physics_weight", "overlap_weight", "loss_window"):
        add_field(p, "--" + name.replace("_", "-"), StreamConfig, name)
    p.add_argument(
        "--probe-from",
        type=Path,
        default=None,
        help="scan file whose probe (a beamline's measured or reconstructed one) lights most scenes "
        "instead of the default zone plate",
    )
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:n]' (default: auto)")
    p.set_defaults(func=pretrain)

    p = add_command(
        sub,
        "reconstruct",
        "stitched amplitude/phase of a scan file, with metrics and a PNG",
        """  bluesky-ptychonn reconstruct model.safetensors scan.h5
  bluesky-ptychonn reconstruct default-64 scan.h5 --skip-lines 0.6 --out-dir held-out""",
    )
    p.add_argument("checkpoint", help="the model (.safetensors), or a shipped base model's name (default-64)")
    p.add_argument("scan", type=Path, help="HDF5 scan file (from `simulate`, or a beamline's in that layout)")
    p.add_argument("--out-dir", type=Path, default=Path("reconstruction"), help="folder for the image, metrics and PNG")
    p.add_argument("--skip-lines", type=float, default=0.0, help="reconstruct only after this fraction of scan lines")
    p.add_argument(
        "--window",
        choices=("gaussian", "central", "uniform"),
        default="gaussian",
        help="stitching weight of each patch (default: gaussian)",
    )
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:n]' (default: auto)")
    p.set_defaults(func=reconstruct)


def pretrain(args: argparse.Namespace) -> dict | None:
    """``pretrain``: a base model from the simulated family; returns its summary (None but in the writer).

    Under ``torchrun`` each process simulates its own stream (seed + rank) and only the writer
    (rank 0, whose stream is the one-process stream) writes the checkpoint.
    """
    import shlex
    import sys

    from ..core import distributed
    from ..core.config import NetworkConfig
    from ..errors import ConfigurationError
    from ..files.scanfile import read_scan
    from ..sim.family import FamilyConfig
    from ..sim.pretraining import pretrain

    config = StreamConfig(
        budget_s=args.minutes * 60,
        seed=args.seed,
        **{k: getattr(args, k) for k in ("steps", "learning_rate", "physics_weight", "overlap_weight", "loss_window")},
    )
    family = FamilyConfig(seed=args.seed + distributed.rank())
    probe = None
    if args.probe_from is not None:
        probe = read_scan(args.probe_from).probe
        n = family.geometry.frame_pixels
        if probe is None or probe.shape != (n, n):
            shape = None if probe is None else probe.shape
            raise ConfigurationError(f"{args.probe_from} holds no ({n}, {n}) probe for this geometry (found {shape})")
    _, info = pretrain(
        family,
        NetworkConfig.preset(args.network).model_copy(update={"batch_norm": True}),
        config,
        probe=probe,
        out=args.out if distributed.is_writer() else None,
        device=str(distributed.start(args.device)),  # under torchrun: this process's GPU
        command="bluesky-ptychonn " + shlex.join(sys.argv[1:]),
    )
    if not distributed.is_writer():
        return None
    keys = ("steps", "frames_seen", "train_seconds", "device")
    return (
        {"checkpoint": str(args.out), "content_hash": info.content_hash}
        | {k: info.provenance[k] for k in keys}
        | {"best_validation": info.metrics["best_validation"]}
    )


def simulate(args: argparse.Namespace) -> dict:
    """``simulate``: write a scan file; returns its summary."""
    from ..files.scanfile import write_scan
    from ..sim.physics import simulate_scan

    geometry = DetectorGeometry(**{name: getattr(args, name) for name in DetectorGeometry.model_fields})
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


def _model_config(args: argparse.Namespace, frame_shape: tuple[int, int], patch_pixels: int) -> tuple[Any, Any]:
    """(NetworkConfig, PreprocessRecipe) from the training options, for frames of ``frame_shape``."""
    from ..core.config import NetworkConfig, PreprocessRecipe

    network = NetworkConfig.preset(args.network, patch_pixels).model_copy(update={"batch_norm": args.batch_norm})
    transform = "sqrt" if args.transform == "auto" else args.transform
    return network, PreprocessRecipe(frame_shape=frame_shape, transform=transform)


def train(args: argparse.Namespace) -> dict | None:
    """``train``: fit a model on scan files and write its checkpoint; returns the metrics (None but in the writer)."""
    from ..core import distributed
    from ..core.checkpoint import save_checkpoint
    from ..core.training import choose_transform, fit
    from ..files.datasets import training_set_from_files

    data = training_set_from_files(args.scans, lines=args.lines)
    network, recipe = _model_config(args, tuple(data.frames.shape[1:]), data.amplitude.shape[-1])
    config = training_config(args)
    scores = None
    if args.transform == "auto":
        trial = config.model_copy(update={"epochs": max(2, args.epochs // 5)})
        best, scores = choose_transform(data, network, recipe, trial, device=args.device)
        recipe = recipe.model_copy(update={"transform": best})
    model, info = fit(data, network, recipe, config, device=args.device)
    if scores:
        info.metrics["transform_trials"] = scores
    if not distributed.is_writer():
        return None
    info = save_checkpoint(args.out, model, info)
    return {
        "checkpoint": str(args.out),
        "content_hash": info.content_hash,
        **{k: v for k, v in info.metrics.items() if k != "history"},
    }


def reconstruct(args: argparse.Namespace) -> dict:
    """``reconstruct``: stitch a scan file's predictions, compare with its truth, write HDF5, PNG and JSON."""
    import numpy as np

    from ..core.geometry import ObjectGrid, split_lines
    from ..core.inference import Predictor
    from ..core.reconstruct import evaluate, reconstruct
    from ..files.figures import save_figure
    from ..files.results import write_result
    from ..files.scanfile import read_scan

    scan = read_scan(args.scan)
    predictor = Predictor.from_checkpoint(model_file(args.checkpoint), device=args.device)
    idx = split_lines(scan.positions_m, args.skip_lines)[1] if args.skip_lines else np.arange(len(scan.frames))
    pixel = predictor.info.recipe.pixel_size_m(scan.geometry)
    grid = scan.truth_grid if scan.truth_grid is not None and np.isclose(scan.truth_grid.pixel_size_m, pixel) else None
    grid = grid or ObjectGrid.covering(scan.positions_m[idx], pixel, predictor.patch_pixels)
    started = time.perf_counter()
    image = reconstruct(
        predictor, scan.frames[idx], scan.positions_m[idx], grid=grid, window=args.window, progress=True
    )
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
