"""Self-describing checkpoints: safetensors weights with JSON metadata in the same file.

The safetensors header carries one metadata entry, ``"bluesky_ptychonn"``, a JSON document with
the network configuration, the preprocessing recipe, training provenance and metrics, the
package version and a content hash over configuration and weights. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .config import NetworkConfig, PreprocessRecipe, validated

if TYPE_CHECKING:
    import torch

    from .network import PtychoNN

FORMAT = "bluesky-ptychonn-checkpoint"
FORMAT_VERSION = 1
_KEY = "bluesky_ptychonn"


@dataclass
class CheckpointInfo:
    """Everything in a checkpoint but the weights.

    Attributes
    ----------
    network : NetworkConfig
    recipe : PreprocessRecipe
    provenance : dict
        Where the training data came from: run uids or files, label source, sizes, seed, timing.
    metrics : dict
        Training and validation figures (best validation loss, epochs, ...).
    package_version : str
    content_hash : str
        sha256 over configuration and weights; the model's identity in results and in Tiled.
    """

    network: NetworkConfig
    recipe: PreprocessRecipe
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    content_hash: str = ""

    def as_metadata(self) -> dict[str, Any]:
        """JSON-ready description (the document stored in the file)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "network": self.network.model_dump(mode="json"),
            "recipe": self.recipe.model_dump(mode="json"),
            "provenance": self.provenance,
            "metrics": self.metrics,
            "package_version": self.package_version,
            "content_hash": self.content_hash,
        }


def content_hash(network: NetworkConfig, recipe: PreprocessRecipe, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the configuration (canonical JSON) and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    config = {"network": network.model_dump(mode="json"), "recipe": recipe.model_dump(mode="json")}
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: PtychoNN, info: CheckpointInfo) -> CheckpointInfo:
    """Write ``model``'s weights and ``info`` to ``path`` atomically; returns ``info`` with version and hash set.

    The file gets the permissions of any new file (``0o666`` less the umask), so a consumer running
    under another account can read it; safetensors' own ``save_file`` makes it ``0o600``.
    """
    from safetensors.torch import save

    from .. import __version__

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info.package_version = __version__
    info.content_hash = content_hash(info.network, info.recipe, tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: a consumer watching the path never reads half a file.
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)  # a leftover of an interrupted save would keep its own mode
    with open(partial, "wb") as f:
        f.write(save(tensors, metadata={_KEY: json.dumps(info.as_metadata())}))
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(partial, path)
    return info


def read_info(path: str | Path) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint: its metadata document, its weights and their hash.

    Raises :class:`CheckpointError` for a file that is missing, not safetensors, lacks or has
    malformed metadata, or whose content hash does not match its contents.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    if _KEY not in header:
        raise CheckpointError(f"{path} is safetensors but has no '{_KEY}' metadata: not a bluesky-ptychonn checkpoint")
    try:
        doc = json.loads(header[_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: metadata is JSON of type {type(doc).__name__}, expected an object")
    # Edited metadata must fail here, with the file named, not later as a TypeError in the consumer.
    for key, kind in (("provenance", dict), ("metrics", dict), ("package_version", str), ("content_hash", str)):
        if not isinstance(doc.get(key, kind()), kind):
            found = type(doc[key]).__name__
            raise CheckpointError(f"{path}: metadata {key!r} has type {found}, expected {kind.__name__}")
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {doc.get('format')!r} version {doc.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    try:
        info = CheckpointInfo(
            network=validated(NetworkConfig, doc["network"]),  # type: ignore[arg-type]
            recipe=validated(PreprocessRecipe, doc["recipe"]),  # type: ignore[arg-type]
            provenance=doc.get("provenance", {}),
            metrics=doc.get("metrics", {}),
            package_version=doc.get("package_version", ""),
            content_hash=doc.get("content_hash", ""),
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid metadata: {err}") from err
    actual = content_hash(info.network, info.recipe, tensors)
    if actual != info.content_hash:
        raise CheckpointError(
            f"{path}: content hash {actual[:12]} does not match the recorded {info.content_hash[:12]} "
            "(the weights or configuration were changed after saving)"
        )
    return info, tensors


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[PtychoNN, CheckpointInfo]:
    """Rebuild the network from a checkpoint alone, in eval mode on ``device``.

    Raises :class:`CheckpointError` when the weights do not fit the recorded network configuration.
    """
    from .network import PtychoNN

    info, tensors = read_info(path)
    model = PtychoNN(info.network)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the recorded network {info.network}: {err}") from err
    return model.to(device).eval(), info
