"""Physics consistency and trust maps: the forward model, its scores, and the trust map in Tiled."""

import numpy as np
import pytest
import torch
from test_callback import _inline_run

from bluesky_ptychonn import schema
from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import DetectorGeometry, NetworkConfig, PreprocessRecipe, TrainConfig
from bluesky_ptychonn.core.consistency import ConsistencyModel, out_of_domain_threshold
from bluesky_ptychonn.core.engine import LiveOptions, LiveReconstruction
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN
from bluesky_ptychonn.core.stitching import PatchStitcher
from bluesky_ptychonn.core.training import TrainingSet, fit
from bluesky_ptychonn.errors import ConfigurationError
from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback
from bluesky_ptychonn.live.sink import TiledSink
from bluesky_ptychonn.sim.physics import far_field, simulate_scan

GEOMETRY = DetectorGeometry(frame_pixels=32)
RECIPE = PreprocessRecipe(frame_shape=(32, 32), scale=0.05)
FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.05, retry_s=0.1, final_retry_s=60)


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(geometry=GEOMETRY, scan_shape=(6, 6), probe={"kind": "gaussian", "fwhm_px": 8})


def _predictor(threshold=None):
    torch.manual_seed(0)
    net = NetworkConfig(input_pixels=32, base_channels=4, depth=2)
    metrics = {"consistency": {"threshold": threshold, "rule": "test"}} if threshold is not None else {}
    info = CheckpointInfo(net, RECIPE, metrics=metrics, content_hash="e" * 64)
    return Predictor(PtychoNN(net).eval(), info, device="cpu")


def test_the_forward_model_is_the_simulators(scan):
    amplitude, phase = scan.truth_patches()
    model = ConsistencyModel(scan.probe, RECIPE)
    expected = far_field(amplitude * np.exp(1j * phase) * scan.probe)
    np.testing.assert_allclose(model.model_intensity(amplitude, phase), expected, rtol=1e-4, atol=1e-9)


def test_exact_patches_score_at_the_noise_level_and_wrong_ones_badly(scan):
    amplitude, phase = scan.truth_patches()
    model = ConsistencyModel(scan.probe, RECIPE)
    exact = model.score(amplitude, phase, scan.frames)
    # Poisson noise only: chi-square about 1 and a small magnitude error.
    assert 0.8 < np.median(exact.chi2) < 1.2
    noise = float(np.median(exact.error))
    assert noise < 0.05
    # Scale and global phase are not errors.
    rescaled = model.score(0.5 * amplitude, phase + 1.0, scan.frames)
    np.testing.assert_allclose(rescaled.error, exact.error, rtol=1e-3, atol=1e-5)
    # A patch shifted by 3 pixels, a neighbour's patch, or a flat object are.
    shifted = model.score(np.roll(amplitude, 3, axis=2), np.roll(phase, 3, axis=2), scan.frames)
    neighbour = model.score(np.roll(amplitude, 1, axis=0), np.roll(phase, 1, axis=0), scan.frames)
    flat = model.score(np.ones_like(amplitude), np.zeros_like(phase), scan.frames)
    for wrong in (shifted, neighbour, flat):
        assert np.median(wrong.error) > 3 * noise and np.median(wrong.chi2) > 3


def test_a_probe_that_cannot_model_the_patches_is_refused(scan):
    with pytest.raises(ConfigurationError, match="crops, bins or resizes"):
        ConsistencyModel(scan.probe, RECIPE.model_copy(update={"bin_factor": 2}))
    with pytest.raises(ConfigurationError, match="probe has shape"):
        ConsistencyModel(np.ones((16, 16), np.complex64), RECIPE)
    with pytest.raises(ConfigurationError, match="finite"):
        ConsistencyModel(np.full((32, 32), np.nan, np.complex64), RECIPE)


def test_trust_map_is_the_footprint_weighted_mean(scan):
    model = ConsistencyModel(scan.probe, RECIPE)
    stitcher = PatchStitcher(scan.grid, 32, trust_window=model.footprint)
    ones = np.ones((len(scan.frames), 32, 32), np.float32)
    stitcher.add(ones, 0 * ones, scan.positions_m, trust=np.full(len(ones), 0.3))
    trust = stitcher.snapshot().trust
    assert np.nanmax(np.abs(trust - 0.3)) < 1e-6
    assert np.isnan(trust[0, 0])  # no footprint reaches the grid's corner
    with pytest.raises(Exception, match="trust"):
        stitcher.add(ones, 0 * ones, scan.positions_m)


def test_live_trust_map_in_tiled_with_flagged_frames(tiled_server, scan):
    client = tiled_server.client
    live = LiveReconstruction(
        _predictor(threshold=0.0),
        scan.grid,
        TiledSink(client, "trust-a"),
        {"raw_uid": "trust-a"},
        FAST,
        probe=scan.probe,
        probe_source="test",
    )
    live.submit(scan.frame_ids, scan.frames, scan.positions_m)
    live.finish("complete")
    assert live.wait(30)
    node = client["processed"]["trust-a"]["ptychonn"]
    trust, weight = node["trust"].read(), node["weight"].read()
    md = dict(node.metadata)["trust"]
    assert trust.shape == weight.shape and np.all(np.isfinite(trust[weight > 0.1 * weight.max()]))
    assert md["available"] and md["probe_source"] == "test" and md["threshold"] == 0.0
    assert md["frames_flagged"] == len(scan.frames) and len(md["flagged_ids"]) == len(scan.frames)
    assert 0 < md["median"] <= md["p95"]


def test_a_run_without_a_probe_gets_no_trust_map_and_a_note(tiled_server, scan):
    section = {
        "version": schema.VERSION,
        **GEOMETRY.model_dump(),
        "scan": {"shape": [6, 6], "step_m": scan.metadata["scan"]["step_m"], "center_m": [0, 0]},
    }
    callback = PtychoNNCallback(_predictor(), tiled_server.client, CallbackConfig(live=FAST))
    results = {}
    for probe in (None, {"kind": "gaussian", "fwhm_px": 8}):
        docs = _inline_run(scan.frames, scan.positions_m, {**section, **({"probe": probe} if probe else {})})
        for name, doc in docs:
            callback(name, doc)
        uid = docs[0][1]["uid"]
        assert callback.wait(uid, 60)
        results[bool(probe)] = tiled_server.client["processed"][uid]["ptychonn"]
    without, with_probe = results[False], results[True]
    assert "trust" not in without and not without.metadata["trust"]["available"]
    assert "describes no probe" in without.metadata["trust"]["reason"]
    assert "trust" in with_probe and with_probe.metadata["trust"]["available"]
    assert with_probe.metadata["trust"]["probe_source"].startswith("run start document")
    # No threshold in this checkpoint: a map, but nothing flagged, and the metadata says why.
    assert with_probe.metadata["trust"]["frames_flagged"] == 0
    assert with_probe.metadata["trust"]["threshold"] is None


def test_training_records_the_out_of_domain_threshold_and_the_probe(scan):
    amplitude, phase = scan.truth_patches()
    data = TrainingSet(
        scan.frames,
        amplitude,
        phase,
        scan.positions_m,
        np.zeros(len(scan.frames), np.int64),
        [{"probe": {"kind": "gaussian", "fwhm_px": 8}}],
        probes=[scan.probe],
    )
    net = NetworkConfig(input_pixels=32, base_channels=4, depth=2)
    _, info = fit(data, net, RECIPE, TrainConfig(epochs=1, batch_size=8), device="cpu", progress=False)
    calibration = info.metrics["consistency"]
    assert calibration["validation_frames"] > 0
    assert calibration["threshold"] == pytest.approx(1.25 * calibration["validation_p95"])
    assert info.provenance["probe"] == {"kind": "gaussian", "fwhm_px": 8}
    assert out_of_domain_threshold(np.array([0.1, np.nan]))["validation_frames"] == 1


def test_a_run_of_the_same_set_up_lends_its_stored_probe(tiled_server, scan):
    from bluesky_ptychonn.archive.labels import write_iterative
    from bluesky_ptychonn.core.iterative import IterativeResult

    client = tiled_server.client
    lender = "probe-lender"
    stored = IterativeResult(
        obj=scan.obj, probe=scan.probe, illumination=np.ones(scan.grid.shape, np.float32), grid=scan.grid,
        frames=len(scan.frames), engine="epie", epochs=1, step_size=1.0, error_per_epoch=[0.0], seconds=0.0,
        device="cpu",
    )  # fmt: skip
    write_iterative(client, lender, stored, {"engine": "epie"})
    section = {
        "version": schema.VERSION,
        **GEOMETRY.model_dump(),
        "scan": {"shape": [6, 6], "step_m": scan.metadata["scan"]["step_m"], "center_m": [0, 0]},
    }
    results = {}
    for probe_run in (lender, "no-such-run"):
        callback = PtychoNNCallback(_predictor(), client, CallbackConfig(live=FAST, probe_run=probe_run))
        docs = _inline_run(scan.frames, scan.positions_m, section)
        for name, doc in docs:
            callback(name, doc)
        assert callback.wait(docs[0][1]["uid"], 60)
        results[probe_run] = client["processed"][docs[0][1]["uid"]]["ptychonn"]
    lent = results[lender]
    assert "trust" in lent and lent.metadata["trust"]["probe_source"].startswith(
        f"iterative reconstruction of run {lender}"
    )
    missing = results["no-such-run"]
    assert "trust" not in missing and any("probe_run no-such-run" in e for e in missing.metadata["errors"])


def test_a_whole_object_is_scored_like_predictions(scan):
    from bluesky_ptychonn.core.consistency import object_consistency

    trust, scores = object_consistency(scan.obj, scan.grid, scan.frames, scan.positions_m, scan.probe)
    assert np.median(scores.error) < 0.05 and 0.8 < scores.summary()["chi2_median"] < 1.2
    flat, _ = object_consistency(np.ones_like(scan.obj), scan.grid, scan.frames, scan.positions_m, scan.probe)
    assert trust.shape == scan.grid.shape and np.nanmedian(flat) > 3 * np.nanmedian(trust)
