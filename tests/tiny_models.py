"""A tiny untrained PtychoNN checkpoint for 32-pixel frames: fast, and enough to test plumbing."""

import torch

from bluesky_ptychonn.core.checkpoint import CheckpointInfo, save_checkpoint
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.network import PtychoNN

TINY_NET = NetworkConfig(input_pixels=32, base_channels=4, depth=2)


def write_tiny_checkpoint(path, seed: int = 0) -> CheckpointInfo:
    """Save a seeded tiny model to ``path``; returns its info (with the content hash)."""
    torch.manual_seed(seed)
    recipe = PreprocessRecipe(frame_shape=(32, 32), scale=0.05)
    return save_checkpoint(path, PtychoNN(TINY_NET).eval(), CheckpointInfo(TINY_NET, recipe))
