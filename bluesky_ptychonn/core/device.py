"""Where torch computes: chosen at run time, never hard-coded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    import torch


def choose_device(preference: str = "auto") -> torch.device:
    """The torch device for ``preference``.

    ``"auto"`` is the first CUDA device when torch sees one, else the CPU; ``"cpu"``, ``"cuda"``
    and ``"cuda:<n>"`` are taken as named. Raises :class:`~bluesky_ptychonn.errors.ConfigurationError`
    for a CUDA device that this machine lacks or a name torch does not know.
    """
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as err:
        raise ConfigurationError(f"unknown device {preference!r}; expected 'auto', 'cpu' or 'cuda[:n]'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device {preference!r} was requested but torch sees no CUDA device")
    return device
