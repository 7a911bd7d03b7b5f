"""Pretraining on the endless simulated family, the physics-informed losses, self-supervised adaptation
and the shipped base model."""

import hashlib
import json

import numpy as np
import pytest
import torch

from bluesky_ptychonn.cli import main
from bluesky_ptychonn.core import base_model
from bluesky_ptychonn.core.adapt import ADAPT_CONFIG, adapt
from bluesky_ptychonn.core.base_model import DEFAULT_BASE, base_model_path
from bluesky_ptychonn.core.checkpoint import load_model, read_info
from bluesky_ptychonn.core.config import DetectorGeometry, NetworkConfig
from bluesky_ptychonn.core.geometry import extract_patches
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.physics_loss import OverlapPairs, overlap_loss, poisson_deviance
from bluesky_ptychonn.core.pretrain import StreamConfig, fit_stream
from bluesky_ptychonn.core.reconstruct import evaluate, reconstruct
from bluesky_ptychonn.errors import CheckpointError
from bluesky_ptychonn.sim.family import FamilyConfig, FamilySource
from bluesky_ptychonn.sim.physics import far_field, make_probe, random_features_object, simulate_scan
from bluesky_ptychonn.sim.pretraining import VALIDATION_SEED_OFFSET, base_recipe

SMALL = FamilyConfig(geometry=DetectorGeometry(frame_pixels=32), scenes_per_batch=2, seed=7)
TINY = NetworkConfig(input_pixels=32, base_channels=8, depth=2, batch_norm=True)


def test_family_source_is_reproducible_from_its_seed():
    one, again = FamilySource(SMALL), FamilySource(SMALL)
    later = again.batch(4)  # any batch can be made first: it depends on (seed, index) only
    first = one.batch(3), one.batch(4)
    np.testing.assert_array_equal(first[1].frames, later.frames)
    np.testing.assert_array_equal(first[1].phase, later.phase)
    np.testing.assert_array_equal(first[1].pairs.shift_px, later.pairs.shift_px)
    assert not np.array_equal(first[0].frames, first[1].frames)
    other = FamilySource(SMALL.model_copy(update={"seed": 8})).batch(4)
    assert not np.array_equal(other.frames, later.frames)
    # Labels, probes and fluxes vary within the configured ranges; frames are counts.
    assert later.frames.dtype == np.uint32 and later.frames.shape == (18, 32, 32)
    assert later.probes.shape == (2, 32, 32) and set(later.probe_index) == {0, 1}
    assert np.all((later.photons >= 1e4) & (later.photons <= 1e7))
    assert later.phase.max() <= SMALL.phase_max_rad[1] + 1e-5 and later.amplitude.min() >= SMALL.amplitude_min[0] - 1e-5


def _exact_case(shift=(0, 9)):
    """Noiseless counts of two overlapping patches at integer corners, and the true patches."""
    n = 32
    obj = random_features_object((64, 64), seed=2, feature_px=(3, 12))
    corners = np.array([[10.0, 10.0], [10.0 + shift[0], 10.0 + shift[1]]])
    patches = extract_patches(obj, corners, n)
    probe = make_probe("zone_plate", n, pupil_radius_px=5)
    counts = torch.from_numpy(far_field(patches * probe) * 1e6)
    amp, phase = (torch.from_numpy(np.ascontiguousarray(f(patches), np.float32)) for f in (np.abs, np.angle))
    pairs = OverlapPairs(np.array([0]), np.array([1]), (corners[1:] - corners[:1]).astype(np.float32))
    return amp, phase, torch.from_numpy(probe), counts, pairs


def test_physics_loss_is_zero_for_exact_patches_and_rises_for_wrong_ones():
    amp, phase, probe, counts, pairs = _exact_case()
    exact = poisson_deviance(amp, phase, probe, counts)
    assert exact.shape == (2,) and float(exact.max()) < 1e-4
    # Neither the far field nor the loss sees a global phase offset or the flux.
    assert float(poisson_deviance(amp, phase + 0.7, probe, counts * 3).max()) < 1e-4
    blurred = torch.nn.functional.avg_pool2d(phase[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    assert float(poisson_deviance(amp, blurred, probe, counts).min()) > 100 * float(exact.max()) + 1e-3
    swapped = poisson_deviance(amp.flip(0), phase.flip(0), probe, counts)
    assert float(swapped.min()) > float(poisson_deviance(amp, blurred, probe, counts).min())

    light = probe.abs().square()
    assert float(overlap_loss(amp, phase, light, pairs)) < 1e-6
    offset = phase.clone()
    offset[1] += 0.3  # neighbours whose phase offsets disagree
    assert float(overlap_loss(amp, offset, light, pairs)) > 0.05
    assert float(overlap_loss(amp, phase.flip(0), light, pairs)) > 0.01
    # The family's true patches agree on their overlaps (up to bilinear resampling); shuffled ones do not.
    batch = FamilySource(SMALL).batch(0)
    a, p = torch.from_numpy(batch.amplitude), torch.from_numpy(batch.phase)
    lights = torch.from_numpy(np.abs(batch.probes[batch.probe_index]) ** 2)
    true = float(overlap_loss(a, p, lights, batch.pairs))
    shuffled = float(
        overlap_loss(a, p[torch.randperm(len(p), generator=torch.Generator().manual_seed(0))], lights, batch.pairs)
    )
    assert true < 0.2 * shuffled


def _validation(n=3):
    source = FamilySource(SMALL.model_copy(update={"seed": SMALL.seed + VALIDATION_SEED_OFFSET}))
    return [source.batch(i) for i in range(n)]


def test_quick_seeded_training_beats_an_untrained_model_on_held_out_frames(tmp_path):
    """60 steps of fresh frames more than halve the held-out label error of the untrained network."""
    validation = _validation()
    recipe = base_recipe(np.concatenate([b.frames for b in validation]))
    config = StreamConfig(steps=60, learning_rate=2e-3, validate_every=20, physics_weight=0.1, seed=1)
    model, info = fit_stream(
        FamilySource(SMALL).stream(),
        validation,
        TINY,
        recipe,
        config,
        device="cpu",
        out=tmp_path / "m.safetensors",
        progress=False,
    )
    history = info.metrics["history"]
    untrained, trained = history[0]["supervised"], info.metrics["best_validation"]["supervised"]
    assert trained < 0.5 * untrained, history
    assert [h["step"] for h in history] == [0, 20, 40, 60]
    saved, _ = read_info(tmp_path / "m.safetensors")
    assert saved.provenance["steps"] == 60 and saved.provenance["frames_seen"] == 60 * 18
    assert saved.provenance["stream_config"]["physics_weight"] == 0.1 and "CPU" in saved.provenance["device"]
    # Self-supervised adaptation to one scan lowers its physics loss without any label.
    scan = simulate_scan(geometry=SMALL.geometry, scan_shape=(6, 6), object_seed=5, probe={"kind": "zone_plate"})
    config = ADAPT_CONFIG.model_copy(
        update={"steps": 30, "validate_every": 10, "budget_s": None, "learning_rate": 1e-3}
    )
    _, adapted = adapt(
        model,
        info,
        scan.frames,
        scan.positions_m,
        scan.probe,
        scan.grid.pixel_size_m,
        photons_per_frame=1e6,  # the flux is known: the amplitude's level is learnt too
        config=config,
        device="cpu",
        progress=False,
    )
    before, after = adapted.metrics["history"][0]["total"], adapted.metrics["best_validation"]["total"]
    assert after < 0.9 * before and adapted.provenance["adapted_from"]["label_source"] == "none (self-supervised)"


def test_pretrain_command_writes_a_checkpoint_with_its_provenance(tmp_path, capsys, monkeypatch):
    out = tmp_path / "base.safetensors"
    assert main(["pretrain", "--out", str(out), "--steps", "2", "--device", "cpu", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    info, _ = read_info(out)
    assert summary["content_hash"] == info.content_hash and info.provenance["steps"] == 2
    assert info.provenance["command"].startswith("bluesky-ptychonn") and info.provenance["family"]["seed"] == 3
    assert info.recipe.normalize == "total" and info.metrics["consistency"]["threshold"] > 0

    # A probe taken from a scan file (a beamline's own) lights the scenes instead of the zone plate.
    scan_file = tmp_path / "scan.h5"
    assert main(["simulate", str(scan_file), "--rows", "2", "--cols", "2", "--probe", "gaussian"]) == 0
    capsys.readouterr()
    args = ["pretrain", "--out", str(out), "--steps", "1", "--device", "cpu", "--probe-from", str(scan_file)]
    assert main(args) == 0
    info, _ = read_info(out)
    assert info.provenance["probe"] == {"kind": "given"}
    small = tmp_path / "small.h5"
    assert main(["simulate", str(small), "--rows", "2", "--cols", "2", "--frame-pixels", "32"]) == 0
    assert main([*args[:-1], str(small)]) != 0
    assert "no (64, 64) probe" in capsys.readouterr().err


def test_shipped_base_model_loads_verifies_its_hash_and_predicts(tmp_path, monkeypatch):
    path = base_model_path(DEFAULT_BASE)
    model, info = load_model(path)
    assert info.provenance["kind"] == "pretrained base model" and info.provenance["command"].startswith(
        "bluesky-ptychonn"
    )
    scan = simulate_scan(scan_shape=(10, 10), object_seed=4242, noise_seed=3)  # an object never trained on
    image = reconstruct(Predictor(model, info, device="cpu"), scan.frames, scan.positions_m, grid=scan.grid)
    assert evaluate(image, scan.obj, scan.grid)["phase_pearson"] > 0.8
    # A file whose bytes differ from the recorded sha256 is refused before it is read.
    name, digest, geometry = base_model.BASE_MODELS[DEFAULT_BASE]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    monkeypatch.setitem(base_model.BASE_MODELS, DEFAULT_BASE, (name, "0" * 64, geometry))
    with pytest.raises(CheckpointError, match="sha256"):
        base_model_path(DEFAULT_BASE)
