"""The command line end to end on a tiny scan: simulate, train, reconstruct; and its errors."""

import json

import numpy as np
import pytest

from bluesky_ptychonn.cli import main
from bluesky_ptychonn.files.scanfile import read_scan


def test_simulate_train_reconstruct(tmp_path, capsys):
    scan = tmp_path / "scan.h5"
    assert (
        main(["simulate", str(scan), "--rows", "10", "--cols", "8", "--frame-pixels", "32", "--probe", "gaussian"]) == 0
    )
    data = read_scan(scan)
    assert data.frames.shape == (80, 32, 32) and data.truth is not None and data.probe is not None
    capsys.readouterr()
    ckpt = tmp_path / "model.safetensors"
    assert (
        main(
            [
                "train",
                str(scan),
                "--out",
                str(ckpt),
                "--lines",
                "0.6",
                "--network",
                "small",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    trained = json.loads(capsys.readouterr().out)
    assert len(trained["content_hash"]) == 64 and trained["epochs_run"] == 1
    out = tmp_path / "recon"
    assert (
        main(["reconstruct", str(ckpt), str(scan), "--out-dir", str(out), "--skip-lines", "0.6", "--device", "cpu"])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 32  # the last 4 of 10 lines
    for key in ("amplitude_ssim", "phase_ssim", "amplitude_psnr", "phase_psnr"):
        assert np.isfinite(summary[key])
    assert (out / "reconstruction.png").stat().st_size > 10_000
    assert (out / "reconstruction.h5").exists()


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["reconstruct", str(tmp_path / "nope.safetensors"), str(tmp_path / "scan.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate"])


def test_option_defaults_are_the_configuration_models_defaults():
    from bluesky_ptychonn.archive.training import FINE_TUNE_EPOCHS, FINE_TUNE_LEARNING_RATE
    from bluesky_ptychonn.cli import build_parser
    from bluesky_ptychonn.cli.options import training_config
    from bluesky_ptychonn.core.config import DetectorGeometry, TrainConfig
    from bluesky_ptychonn.core.engine import LiveOptions
    from bluesky_ptychonn.core.iterative import IterativeOptions
    from bluesky_ptychonn.core.refine import REFINE_OPTIONS

    parser = build_parser()
    train = parser.parse_args(["train", "scan.h5", "--out", "m.safetensors"])
    assert training_config(train) == TrainConfig()  # every training option at the model's default
    simulate = parser.parse_args(["simulate", "scan.h5"])
    assert DetectorGeometry(**{k: getattr(simulate, k) for k in DetectorGeometry.model_fields}) == DetectorGeometry()
    runs = ["--tiled-uri", "http://127.0.0.1:8000"]
    iterative = parser.parse_args(["iterative", "abcdef", *runs])
    assert IterativeOptions(**{k: getattr(iterative, k) for k in IterativeOptions.model_fields if k != "seed"}) == (
        IterativeOptions()
    )
    refine = parser.parse_args(["refine", "abcdef", *runs])
    assert IterativeOptions(**{k: getattr(refine, k) for k in IterativeOptions.model_fields if k != "seed"}) == (
        REFINE_OPTIONS
    )
    assert refine.seed_source == "ptychonn" and refine.checkpoint is None
    assert parser.parse_args(["replay", "abcdef", "--checkpoint", "m", *runs]).batch_size == LiveOptions().batch_size
    tune = parser.parse_args(["fine-tune", "m.safetensors", "abcdef", "--labels", "truth", *runs])
    assert (tune.epochs, tune.learning_rate) == (FINE_TUNE_EPOCHS, FINE_TUNE_LEARNING_RATE)
    assert tune.iterative_engine == IterativeOptions().engine and tune.iterative_epochs == IterativeOptions().epochs
    # Typed from the model: a bad value is refused by argparse, before anything runs.
    with pytest.raises(SystemExit):
        parser.parse_args(["iterative", "abcdef", "--engine", "dm", *runs])
