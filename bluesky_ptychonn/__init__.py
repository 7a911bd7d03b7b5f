"""bluesky-ptychonn: live PtychoNN ptychography reconstruction for Bluesky and Tiled.

Importing the package is cheap: torch, bluesky and tiled are imported only by the modules that
need them (``inference``, ``training``, ``network``, the Bluesky/Tiled edge).
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
    "__version__",
]
