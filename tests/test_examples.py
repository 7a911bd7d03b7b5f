"""The example scripts run end to end (tiny settings), as a new user would run them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_demo_runs_and_writes_its_summary(tmp_path):
    quick = ["--rows", "8", "--family-objects", "0", "--epochs", "1", "--refine-epochs", "5", "--device", "cpu"]
    stdout = _run("demo.py", "--out", str(tmp_path), *quick)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "amplitude_ssim",
        "phase_ssim",
        "amplitude_psnr",
        "phase_psnr",
        "frames",
        "device",
        "seconds",
        "tiled_uri",
        "run_uid",
        "live_frames_per_s",
    ):
        assert key in summary, key
    assert summary["frames"] == 64 and summary["status"] == "complete" and summary["device"] == "cpu"
    assert summary["fine_tuned_from"]["base"] == "default-64"  # the demo starts from the shipped base model
    assert (tmp_path / "live_reconstruction.png").stat().st_size > 10_000
    assert "processed/" in summary["tiled_uri"] and summary["run_uid"] in stdout
    # The trust map came with the preview, and the refinement followed without being asked.
    assert summary["trust"]["available"] and summary["trust"]["frames_flagged"] >= 0
    assert -1 <= summary["trust"]["pearson_with_local_phase_error"] <= 1
    refined, blank = summary["refined"], summary["blank_start"]
    assert refined["epochs"] >= 1 and refined["stopped_by"] in ("tolerance", "max_epochs")
    assert "processed/" in refined["tiled_uri"] and refined["in_tiled_after_stop_s"] > 0
    assert blank["epochs"] >= 1 and "phase_frc_px" in refined and "phase_frc_px" in blank
    assert refined["epochs"] <= 5 and blank["epochs"] <= 5  # --refine-epochs caps both pty-chi runs
    # The model is cached under a pointer named by its training settings, for the next demo to reuse.
    (pointer,) = (tmp_path / "models").glob("settings-*.json")
    assert (tmp_path / "models" / json.loads(pointer.read_text())["checkpoint"]).exists()


def test_paper_protocol_runs_and_writes_its_table(tmp_path):
    _run(
        "paper_protocol.py",
        "--out",
        str(tmp_path),
        "--rows",
        "6",
        "--factors",
        "1,5",
        "--epochs",
        "1",
        "--ptychi-epochs",
        "3",
        "--sizes",
        "0.5",
        "--device",
        "cpu",
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["scan"] for s in results["scans"]] == ["dense", "5x sparse"]
    for row in results["scans"]:
        assert set(row["ptychonn"]) >= {"phase_ssim", "amplitude_psnr"} and row["ptychi_seconds"] >= 0
    study = [(s["lines_fraction"], s["start"]) for s in results["size_study"]]
    assert study == [(0.5, "base model"), (0.5, "scratch"), (1.0, "base model"), (1.0, "scratch")]
    assert "| dense |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "paper_dense.png").exists() and (tmp_path / "paper_5x_sparse.png").exists()
