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
from bluesky_ptychonn.core.checkpoint import load_model
from bluesky_ptychonn.core.config import DetectorGeometry, PreprocessRecipe
from bluesky_ptychonn.core.engine import LiveOptions, LiveReconstruction
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.inference import BF16_TOLERANCE, PINNED_FRAMES, Predictor
from bluesky_ptychonn.core.preprocess import preprocess
from bluesky_ptychonn.core.reconstruct import reconstruct
from bluesky_ptychonn.core.stitching import StitchedImage
from bluesky_ptychonn.core.tensor_preprocess import preprocess_tensor
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


def test_batch_norm_folded_into_the_convolutions_changes_the_output_by_float32_rounding_only(scan):
    # The shipped base model has BatchNorm; the predictor runs a copy with it folded (5e-6 measured).
    model, info = load_model(base_model_path(), "cpu")
    predictor = Predictor(model, info, device="cpu", precision="float32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model passed in is kept
    x = preprocess(scan.frames, info.recipe)
    folded = predictor.predict_preprocessed(x)
    with torch.inference_mode():
        unfolded = model.eval()(torch.from_numpy(x)[:, None])
    for ours, theirs in zip(folded, unfolded, strict=True):
        assert np.abs(ours - theirs[:, 0].numpy()).max() < 1e-4


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
    """Frames submitted in batches to the live engine on CUDA (the device pipeline, trust map on): the
    final image matches the float32 CPU image, and the trust map the CPU's."""
    predictor = Predictor.from_checkpoint(base_model_path(), device="cuda")
    live = _live(predictor, scan, reference.grid, "auto")
    assert live.stitcher.device.type == "cuda"
    _within_tolerance(live.snapshot(), reference)
    host = _live(Predictor.from_checkpoint(base_model_path(), device="cpu", precision="float32"), scan, reference.grid)
    trust, expected = live.snapshot().trust, host.snapshot().trust
    assert np.array_equal(np.isnan(trust), np.isnan(expected))
    assert np.nanmax(np.abs(trust - expected)) < 0.05 * np.nanmax(expected)


def _live(predictor, scan, grid, pipeline="host"):
    options = LiveOptions(max_wait_s=0.01, pipeline=pipeline)
    live = LiveReconstruction(predictor, grid, None, {"raw_uid": "p"}, options, probe=scan.probe)
    ids = np.arange(len(scan.frames))
    for part in np.array_split(ids, 5):
        live.submit(part, scan.frames[part], scan.positions_m[part])
    live.finish()
    assert live.wait(60)
    assert live.metadata["status"] == "complete" and live.metadata["frames_done"] == len(ids)
    return live


RECIPES = [
    PreprocessRecipe(normalize="total", scale=0.33),
    PreprocessRecipe(transpose=True, flip_rows=True, flip_cols=True, threshold_counts=3, transform="log1p"),
    PreprocessRecipe(crop_pixels=48, bin_factor=2, resize_pixels=32, transform="none", scale=2.0),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
@pytest.mark.parametrize("recipe", RECIPES, ids=["normalised", "oriented", "resampled"])
def test_preprocessing_on_the_device_matches_the_numpy_recipe(scan, recipe, device):
    counts = torch.from_numpy(scan.frames.astype(np.float32)).to(device)
    on_device = preprocess_tensor(counts, recipe).cpu().numpy()
    expected = preprocess(scan.frames, recipe)
    np.testing.assert_allclose(on_device, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_auto_runs_the_torch_pipeline_on_the_cpu_too(scan, reference):
    """Measured faster there as well (1.1x the engine's frames/s on the 2-core CPU): 'auto' is 'device'."""
    predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", precision="float32")
    live = _live(predictor, scan, reference.grid, "auto")
    assert live.stitcher.device == predictor.device


def test_the_device_pipeline_gives_the_host_pipeline_image(scan, reference):
    """The path a GPU takes (upload once, preprocess, score and stitch beside the predictions), run
    on the CPU with torch: the same image and trust map as numpy on the host, to float32 rounding."""
    predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", precision="float32")
    host = _live(predictor, scan, reference.grid, "host").snapshot()
    device = _live(predictor, scan, reference.grid, "device")
    assert device.stitcher.device is not None
    image = device.snapshot()
    np.testing.assert_allclose(image.weight, host.weight, atol=1e-6)
    np.testing.assert_allclose(image.amplitude, host.amplitude, atol=1e-5)
    assert np.abs(np.angle(np.exp(1j * (image.phase - host.phase)))).max() < 1e-4
    np.testing.assert_allclose(image.trust, host.trust, rtol=1e-4, atol=1e-7)
    counts = predictor.upload(scan.frames)
    amplitude, phase = (t.numpy() for t in predictor.predict_counts(counts))
    expected = predictor.predict(scan.frames)
    np.testing.assert_allclose(amplitude, expected[0], atol=1e-5)
    np.testing.assert_allclose(phase, expected[1], atol=1e-4)


@pytest.mark.gpu
@cuda
def test_gpu_results_come_back_in_bounded_page_locked_blocks(scan):
    """A call larger than one page-locked block gives the patches of the same blocks called apart.

    (Same batches, same kernels: a frame in another batch size may differ by a bf16 rounding step.)
    """
    predictor = Predictor.from_checkpoint(base_model_path(), device="cuda", batch_size=1024)
    x = preprocess(np.concatenate([scan.frames] * (PINNED_FRAMES // len(scan.frames) + 2)), predictor.info.recipe)
    amplitude, phase = predictor.predict_preprocessed(x)
    assert amplitude.shape == (len(x), 64, 64) and len(x) > PINNED_FRAMES
    tail_amplitude, tail_phase = predictor.predict_preprocessed(x[PINNED_FRAMES:])
    np.testing.assert_allclose(amplitude[PINNED_FRAMES:], tail_amplitude, atol=1e-6)
    np.testing.assert_allclose(phase[PINNED_FRAMES:], tail_phase, atol=1e-6)


@pytest.mark.gpu
@cuda
def test_a_compiled_network_stays_within_tolerance_of_the_cpu_float32_image(scan, reference):
    """torch.compile (batches padded to one shape) changes rounding only: the bf16 tolerance holds."""
    predictor = Predictor.from_checkpoint(base_model_path(), device="cuda", batch_size=32, compile=True)
    assert predictor.compiled
    _within_tolerance(reconstruct(predictor, scan.frames, scan.positions_m, grid=reference.grid), reference)


def test_a_frozen_cpu_graph_stays_within_tolerance_of_the_float32_image(scan, reference):
    """On the CPU the compiled graph is frozen, with bf16 weights where bf16 is native: rounding only.

    The graph is built with the predictor, so frames of any number compile nothing more.
    """
    from torch._dynamo.utils import counters

    predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", batch_size=32, compile=True)
    assert predictor.compiled
    built = sum(counters["stats"].values())
    _within_tolerance(reconstruct(predictor, scan.frames, scan.positions_m, grid=reference.grid), reference)
    predictor.predict(scan.frames[:5])  # a short batch is padded to the graph's shape
    assert sum(counters["stats"].values()) == built, dict(counters["stats"])
    assert predictor.compiled  # the graph was built and used, not dropped for eager


def test_a_graph_that_cannot_be_built_leaves_the_network_eager(scan, caplog):
    """No working C++ compiler: a warning, then the eager network's own patches."""
    import torch._inductor.config as inductor

    eager_predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", batch_size=16)
    frames = preprocess(scan.frames[:20], eager_predictor.info.recipe)
    eager = eager_predictor.predict_preprocessed(frames)
    with inductor.patch({"cpp.cxx": ("no-such-compiler",), "fx_graph_cache": False}):
        predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", batch_size=16, compile=True)
        amplitude, phase = predictor.predict_preprocessed(frames)
    assert not predictor.compiled
    assert "torch.compile failed" in caplog.text
    np.testing.assert_array_equal(amplitude, eager[0])
    np.testing.assert_array_equal(phase, eager[1])
