"""bluesky-ptychonn: live PtychoNN ptychography reconstruction for Bluesky and Tiled.

Importing the package is cheap: torch, bluesky and tiled are imported only by the modules that
need them. The layers, from the bottom up: ``core`` (the method), ``sim`` (the physics
simulator), ``files`` and ``schema`` (HDF5 files; the start-document section), ``acquisition``
and ``live`` (devices and plan; the document callback), ``archive`` (Tiled servers, replay,
training from runs) and ``cli``; see the README's Layout section.
"""

from .errors import (
    CheckpointError,
    ConfigurationError,
    DataPathError,
    FrameError,
    PositionError,
    PtychoNNError,
    RunError,
    ScanFileError,
    TiledKeyError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigurationError",
    "DataPathError",
    "FrameError",
    "PositionError",
    "PtychoNNError",
    "RunError",
    "ScanFileError",
    "TiledKeyError",
    "__version__",
]
