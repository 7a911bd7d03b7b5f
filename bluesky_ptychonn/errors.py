"""The package's error family.

Every error subclasses both :class:`PtychoNNError` and the matching builtin, so a caller can
catch either (the event-model convention: ``EventModelValueError(EventModelError, ValueError)``).
"""

from __future__ import annotations


class PtychoNNError(Exception):
    """Base class of every error raised on purpose by bluesky-ptychonn."""


class FrameError(PtychoNNError, ValueError):
    """A diffraction frame (or batch) is unusable: wrong shape, NaN, negative counts."""


class PositionError(PtychoNNError, ValueError):
    """Scan positions are malformed or fall outside the object grid."""


class ConfigurationError(PtychoNNError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class CheckpointError(PtychoNNError, ValueError):
    """A checkpoint is corrupt, not safetensors, or does not match what it claims."""


class ScanFileError(PtychoNNError, ValueError):
    """A scan file lacks a dataset or attribute that the reader needs."""


class DataPathError(PtychoNNError, PermissionError):
    """A document names a file outside the configured data roots."""


class TiledKeyError(PtychoNNError, ValueError):
    """A name (a run uid, a sample id, a result name) is not one Tiled key: empty, ``..``, with a ``/``."""


class RunError(PtychoNNError, LookupError):
    """An archived run is missing, not a ptychography run, or lacks what is needed."""


class DocumentEncodeError(PtychoNNError, TypeError):
    """A Bluesky document holds a value the 0MQ wire format cannot carry (an object array, a set)."""


class DocumentDecodeError(PtychoNNError, ValueError):
    """A 0MQ message is not a document in the wire format (a pickle, truncated, too large, a bad array)."""
