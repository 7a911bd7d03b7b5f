"""Pretrained base models shipped in the package, verified before use.

Each entry names a safetensors file under ``bluesky_ptychonn/pretrained/`` and the sha256 of its
bytes; :func:`base_model_path` refuses a file whose bytes differ (a truncated install, an edit),
and loading then checks the checkpoint's own content hash as every checkpoint load does. The
training provenance (the command, the simulated family, the machine and the seconds) is in the
checkpoint's metadata; ``bluesky_ptychonn/pretrained/README.md`` says how to make it again.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from ..errors import CheckpointError, ConfigurationError
from .config import DetectorGeometry

#: name -> (file name, sha256 of the file's bytes, the frame geometry it was trained for)
BASE_MODELS: dict[str, tuple[str, str, DetectorGeometry]] = {
    "default-64": (
        "default-64.safetensors",
        "7eb13fb1b2674cc2701a0637cde97a9099656182232a33ccc434950402d80c3a",
        DetectorGeometry(),
    ),
}

DEFAULT_BASE = "default-64"


def base_model_path(name: str = DEFAULT_BASE) -> Path:
    """The verified path of a shipped base model.

    Raises :class:`ConfigurationError` for an unknown name, :class:`CheckpointError` when the
    file is missing or its bytes do not match the recorded hash.
    """
    if name not in BASE_MODELS:
        raise ConfigurationError(f"unknown base model {name!r}; shipped: {sorted(BASE_MODELS) or 'none'}")
    filename, sha256, _ = BASE_MODELS[name]
    path = Path(str(resources.files("bluesky_ptychonn") / "pretrained" / filename))
    if not path.is_file():
        raise CheckpointError(f"base model {name!r} is missing from the installation ({path})")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != sha256:
        raise CheckpointError(f"base model {name!r} at {path} has sha256 {actual[:12]}, expected {sha256[:12]}")
    return path


def base_for(geometry: DetectorGeometry) -> str | None:
    """The shipped base model trained for ``geometry`` (same frame size and real-space pixel), if any."""
    for name, (_, _, trained) in BASE_MODELS.items():
        if (
            trained.frame_pixels == geometry.frame_pixels
            and abs(trained.pixel_size_m() - geometry.pixel_size_m()) <= 1e-6 * geometry.pixel_size_m()
        ):
            return name
    return None
