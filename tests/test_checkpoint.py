import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bluesky_ptychonn.core.checkpoint import CheckpointInfo, load_model, read_info, save_checkpoint
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN
from bluesky_ptychonn.errors import CheckpointError

NET = NetworkConfig(input_pixels=32, base_channels=4, depth=2)
RECIPE = PreprocessRecipe(frame_shape=(32, 32), scale=0.5)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = PtychoNN(NET).eval()
    info = save_checkpoint(tmp_path / "m.safetensors", model, CheckpointInfo(NET, RECIPE, provenance={"runs": ["abc"]}))
    return tmp_path / "m.safetensors", model, info


def test_save_load_predict_identically(checkpoint):
    path, model, info = checkpoint
    frames = np.random.default_rng(0).poisson(20, (5, 32, 32)).astype(np.uint32)
    before = Predictor(model, info, device="cpu").predict(frames)
    loaded = Predictor.from_checkpoint(path, device="cpu")
    after = loaded.predict(frames)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.info.content_hash == info.content_hash and len(info.content_hash) == 64
    assert loaded.info.recipe == RECIPE and loaded.info.network == NET
    assert loaded.info.provenance == {"runs": ["abc"]} and loaded.info.package_version


def test_any_batch_size(checkpoint):
    path, _, _ = checkpoint
    frames = np.random.default_rng(1).poisson(20, (7, 32, 32)).astype(np.uint32)
    a = Predictor.from_checkpoint(path, device="cpu", batch_size=3).predict(frames)
    b = Predictor.from_checkpoint(path, device="cpu", batch_size=64).predict(frames)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    single = Predictor.from_checkpoint(path, device="cpu").predict(frames[0])
    assert single[0].shape == (1, 32, 32)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, bad)  # a pickle: must never be loaded
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_info(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_info(tmp_path / "missing.safetensors")


def test_corrupt_file(checkpoint):
    path, _, _ = checkpoint
    data = bytearray(path.read_bytes())
    data[-100:] = bytes(100)  # damage the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content hash"):
        load_model(path)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(CheckpointError):
        load_model(path)


def test_safetensors_without_our_metadata(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a bluesky-ptychonn checkpoint"):
        read_info(tmp_path / "other.safetensors")


def _rewrite(path, tensors=None, **changes):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()["bluesky_ptychonn"])
    doc.update(changes)
    save_file(tensors or load_file(str(path)), str(path), metadata={"bluesky_ptychonn": json.dumps(doc)})


def test_mismatched_configuration_or_weights(checkpoint):
    path, model, _ = checkpoint
    # Metadata edited after saving: the hash no longer matches.
    _rewrite(path, network={**NET.model_dump(mode="json"), "base_channels": 8})
    with pytest.raises(CheckpointError, match="content hash"):
        load_model(path)
    # Weights of another network, with a recomputed (consistent) hash: refused by shape.
    other = PtychoNN(NetworkConfig(input_pixels=32, base_channels=8, depth=2))
    save_checkpoint(path, other, CheckpointInfo(NetworkConfig(input_pixels=32, base_channels=8, depth=2), RECIPE))
    from safetensors.torch import load_file

    from bluesky_ptychonn.core.checkpoint import content_hash

    tensors = load_file(str(path))
    _rewrite(path, tensors, network=NET.model_dump(mode="json"), content_hash=content_hash(NET, RECIPE, tensors))
    with pytest.raises(CheckpointError, match="do not match the recorded network"):
        load_model(path)


def test_wrong_format_version_and_invalid_config(checkpoint):
    path, _, _ = checkpoint
    _rewrite(path, format_version=99)
    with pytest.raises(CheckpointError, match="version 99"):
        read_info(path)
    _rewrite(path, format_version=1, recipe={"transform": "cube"})
    with pytest.raises(CheckpointError, match="PreprocessRecipe"):
        read_info(path)
