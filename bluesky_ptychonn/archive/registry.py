"""The model registry: checkpoints described at ``models/<content hash>`` in Tiled.

Every result's ``model_hash`` then leads to the runs, label source and metrics behind the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.checkpoint import CheckpointInfo, read_info
from ..core.metadata import jsonable
from ..errors import ConfigurationError
from ..tiled_paths import MODELS, child_container


def register_model(client: Any, checkpoint: str | Path | CheckpointInfo) -> str:
    """Describe a model at ``models/<content hash>`` in Tiled; return that path.

    The metadata is the checkpoint's (network, recipe, provenance with run uids and label source,
    package version) and its metrics without the per-epoch history. A model already registered
    (same hash, so same weights and configuration) is left as it is.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_info(checkpoint)[0]
    if not info.content_hash:
        raise ConfigurationError("the checkpoint info has no content hash: save the checkpoint first")
    metadata = info.as_metadata()
    metadata["metrics"] = {k: v for k, v in info.metrics.items() if k != "history"}
    if not isinstance(checkpoint, CheckpointInfo):
        metadata["checkpoint_file"] = str(Path(checkpoint).resolve())
    child_container(child_container(client, MODELS), info.content_hash, metadata=jsonable(metadata))
    return f"{MODELS}/{info.content_hash}"
