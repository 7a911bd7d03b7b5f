import numpy as np
import pytest
import torch

from bluesky_ptychonn.core.config import DetectorGeometry, NetworkConfig, PreprocessRecipe, TrainConfig
from bluesky_ptychonn.core.training import TrainingSet, choose_transform, fit, spatial_split
from bluesky_ptychonn.errors import ConfigurationError
from bluesky_ptychonn.sim.physics import simulate_scan

NET = NetworkConfig(input_pixels=32, base_channels=4, depth=2, batch_norm=True)
RECIPE = PreprocessRecipe(frame_shape=(32, 32))


@pytest.fixture(scope="module")
def tiny():
    scan = simulate_scan(
        geometry=DetectorGeometry(frame_pixels=32), scan_shape=(8, 8), probe={"kind": "gaussian", "fwhm_px": 8}
    )
    amp, phase = scan.truth_patches()
    return TrainingSet(scan.frames, amp, phase, scan.positions_m, np.zeros(len(amp), np.int64), [{"file": "tiny"}])


def test_validation_is_a_spatial_block_per_scan():
    y, x = np.mgrid[0:10, 0:10]
    pos = np.stack([y.ravel(), x.ravel()], axis=1).astype(float)
    pos = np.concatenate([pos, pos])
    groups = np.repeat([0, 1], 100)
    train, val = spatial_split(pos, groups, 0.1)
    assert len(val) == 20 and len(train) == 180
    # The held-out frames are the last row of each scan: no training frame shares their row.
    assert set(pos[val, 0]) == {9.0} and pos[train, 0].max() == 8
    assert set(groups[val]) == {0, 1}


def test_fit_learns_and_keeps_the_best_epoch(tiny):
    config = TrainConfig(epochs=4, batch_size=8, seed=1)
    model, info = fit(tiny, NET, RECIPE, config, device="cpu", progress=False)
    history = info.metrics["history"]
    assert len(history) == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert info.metrics["best_val_loss"] == min(h["val_loss"] for h in history)
    assert info.recipe.scale != 1.0  # fitted to the training frames
    assert info.provenance["train_frames"] + info.provenance["validation_frames"] == len(tiny.frames)
    assert info.provenance["sources"] == [{"file": "tiny"}]
    assert not model.training


def test_fit_is_repeatable(tiny):
    config = TrainConfig(epochs=2, batch_size=8, seed=3)
    a, _ = fit(tiny, NET, RECIPE, config, device="cpu", progress=False)
    b, _ = fit(tiny, NET, RECIPE, config, device="cpu", progress=False)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_early_stopping(tiny):
    config = TrainConfig(epochs=50, batch_size=32, early_stop_patience=1, learning_rate=1e-7, seed=0)
    _, info = fit(tiny, NET, RECIPE, config, device="cpu", progress=False)
    assert info.metrics["epochs_run"] < 50


def test_transform_is_chosen_on_the_held_out_block(tiny):
    best, scores = choose_transform(
        tiny, NET, RECIPE, TrainConfig(epochs=1, batch_size=16), ("sqrt", "log1p"), device="cpu"
    )
    assert best in ("sqrt", "log1p") and scores[best] == min(scores.values())


def test_mismatched_inputs_are_refused(tiny):
    with pytest.raises(ConfigurationError, match="64-pixel network"):
        fit(tiny, NetworkConfig(), PreprocessRecipe(frame_shape=(32, 32)), device="cpu", progress=False)
    with pytest.raises(ConfigurationError, match="entries"):
        TrainingSet(tiny.frames, tiny.amplitude[:3], tiny.phase, tiny.positions_m, tiny.groups)


def test_training_set_concatenation_renumbers_groups(tiny):
    both = TrainingSet.concatenate([tiny, tiny])
    assert set(both.groups) == {0, 1} and len(both.frames) == 2 * len(tiny.frames) and len(both.sources) == 2
