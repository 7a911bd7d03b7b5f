"""Reduced precision and device paths stay within a stated tolerance of the float32 CPU path.

bf16 autocast (with channels-last weights) is what ``Predictor(precision="auto")`` picks on a GPU
and on CPUs that compute bf16 natively; the stitched image of a trained model (the shipped base
model) on simulated frames must stay within :data:`~bluesky_ptychonn.core.inference.BF16_TOLERANCE`
of float32. The tests marked ``gpu`` run where torch sees a CUDA device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_ptychonn.core.base_model import base_model_path
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.engine import LiveOptions, LiveReconstruction
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.inference import BF16_TOLERANCE, Predictor
from bluesky_ptychonn.core.reconstruct import reconstruct
from bluesky_ptychonn.core.stitching import StitchedImage
from bluesky_ptychonn.sim.physics import simulate_scan

GEOMETRY = DetectorGeometry(frame_pixels=64)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(geometry=GEOMETRY, scan_shape=(6, 6))


@pytest.fixture(scope="module")
def reference(scan):
    """The float32 CPU image."""
    predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", precision="float32")
    pixel_size_m = predictor.info.recipe.pixel_size_m(GEOMETRY)
    grid = ObjectGrid.covering(scan.positions_m, pixel_size_m, predictor.patch_pixels)
    return reconstruct(predictor, scan.frames, scan.positions_m, grid=grid)


def _within_tolerance(image: StitchedImage, reference: StitchedImage) -> None:
    covered = reference.covered(0.1)
    phase = np.angle(np.exp(1j * (image.phase - reference.phase)))[covered]  # wrapped difference
    amplitude = (image.amplitude - reference.amplitude)[covered]
    span = float(np.ptp(reference.amplitude[covered]))
    assert np.abs(phase).max() < BF16_TOLERANCE["phase_rad"], np.abs(phase).max()
    assert np.abs(amplitude).max() < BF16_TOLERANCE["amplitude"] * span, (np.abs(amplitude).max(), span)
    assert np.corrcoef(image.phase[covered], reference.phase[covered])[0, 1] > 0.999


def test_bf16_on_the_cpu_stays_within_tolerance_of_float32(scan, reference):
    predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", precision="bfloat16")
    assert predictor.bf16
    _within_tolerance(reconstruct(predictor, scan.frames, scan.positions_m, grid=reference.grid), reference)


def test_precision_is_named_or_refused():
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Predictor.from_checkpoint(base_model_path(), device="cpu", precision="fp8")
    assert Predictor.from_checkpoint(base_model_path(), device="cpu").precision in ("float32", "bfloat16")


@pytest.mark.gpu
@cuda
def test_the_gpu_image_stays_within_tolerance_of_the_cpu_float32_image(scan, reference):
    predictor = Predictor.from_checkpoint(base_model_path(), device="cuda")
    assert predictor.device.type == "cuda" and predictor.bf16
    _within_tolerance(reconstruct(predictor, scan.frames, scan.positions_m, grid=reference.grid), reference)


@pytest.mark.gpu
@cuda
def test_a_live_reconstruction_on_the_gpu_matches_the_cpu_one(scan, reference):
    """Frames submitted in batches to the live engine on CUDA: the final image matches the float32 CPU image."""
    predictor = Predictor.from_checkpoint(base_model_path(), device="cuda")
    live = LiveReconstruction(predictor, reference.grid, None, {"raw_uid": "gpu"}, LiveOptions(max_wait_s=0.01))
    ids = np.arange(len(scan.frames))
    for part in np.array_split(ids, 5):
        live.submit(part, scan.frames[part], scan.positions_m[part])
    live.finish()
    assert live.wait(60)
    assert live.metadata["status"] == "complete" and live.metadata["frames_done"] == len(ids)
    _within_tolerance(live.snapshot(), reference)
