"""The model registry: checkpoints described at ``models/<content hash>`` in Tiled.

Every result's ``model_hash`` then leads to the runs, label source and metrics behind the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.checkpoint import CheckpointInfo, read_info
from ..core.metadata import jsonable
from ..errors import ConfigurationError
from ..tiled_paths import MODELS, child_container


def register_model(client: Any, checkpoint: str | Path | CheckpointInfo) -> str:
    """Describe a model at ``models/<content hash>`` in Tiled; return that path.

    The metadata is the checkpoint's (network, recipe, provenance with run uids and label source,
    package version), its metrics without the per-epoch history, and its file name. A model
    already registered (same hash, so same weights and configuration) is left as it is.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_info(checkpoint)[0]
    if not info.content_hash:
        raise ConfigurationError("the checkpoint info has no content hash: save the checkpoint first")
    metadata = info.as_metadata()
    metadata["metrics"] = {k: v for k, v in info.metrics.items() if k != "history"}
    if not isinstance(checkpoint, CheckpointInfo):
        metadata["checkpoint_file"] = Path(checkpoint).name
    metadata = _without_host_paths(jsonable(metadata))
    child_container(child_container(client, MODELS), info.content_hash, metadata=metadata)
    return f"{MODELS}/{info.content_hash}"


def _without_host_paths(value: Any) -> Any:
    """``value`` (plain JSON types) with every absolute path cut to its file name.

    Everyone who may read the server reads this metadata: the absolute path of a training file or
    a base model shows the host's layout and user names, and means nothing on another machine.
    The content hash, not a path, is what identifies a model.
    """
    if isinstance(value, str):
        return Path(value).name if os.path.isabs(value) else value
    if isinstance(value, dict):
        return {k: _without_host_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_host_paths(v) for v in value]
    return value
