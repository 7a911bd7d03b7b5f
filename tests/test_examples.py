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
    stdout = _run(
        "demo.py", "--out", str(tmp_path), "--rows", "8", "--family-objects", "0", "--epochs", "1", "--device", "cpu"
    )
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
    assert (tmp_path / "live_reconstruction.png").stat().st_size > 10_000
    assert "processed/" in summary["tiled_uri"] and summary["run_uid"] in stdout
    # A second run reuses the cached model.
    assert "reusing" in _run(
        "demo.py", "--out", str(tmp_path), "--rows", "8", "--family-objects", "0", "--epochs", "1", "--device", "cpu"
    )


def test_paper_protocol_runs_and_writes_its_table(tmp_path):
    _run(
        "paper_protocol.py",
        "--out",
        str(tmp_path),
        "--rows",
        "6",
        "--sparse-factor",
        "5",
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
    assert [s["lines_fraction"] for s in results["size_study"]] == [0.5, 1.0]
    assert "| dense |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "paper_dense.png").exists() and (tmp_path / "paper_5x_sparse.png").exists()
