"""Seeding pty-chi with a PtychoNN preview: the starting object, and the refinement's default options.

A stitched network image is a good first guess where the scan covered the sample and meaningless
elsewhere (zero weight, zero amplitude). :func:`seed_object` keeps the preview where it is covered
and starts the rest as free space (transmission 1), pty-chi's own flat start, so the refinement
begins at the network's answer instead of at nothing. Plain numpy: Tiled reading lives in
:mod:`bluesky_ptychonn.archive.refine`.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigurationError
from .iterative import IterativeOptions
from .stitching import StitchedImage

__all__ = ["REFINE_OPTIONS", "RUN_ARRIVAL_TIMEOUT_S", "SEED_COVERAGE_FRACTION", "seed_object"]

#: Pixels whose preview weight is at least this fraction of the peak weight seed the object. The
#: stitcher's window tapers to zero at the patch edges, so the outermost pixels of the scan carry
#: little weight and unreliable values; 0.1 is also :meth:`StitchedImage.covered`'s default.
SEED_COVERAGE_FRACTION = 0.1

#: Refinement defaults: LSQML (robust to a rough start, no step size to tune), at most 200 epochs,
#: stopped once the data-fit error falls by less than 1 % over 10 epochs.
REFINE_OPTIONS = IterativeOptions(engine="lsqml", epochs=200, stop_tolerance=0.01, stop_window=10, min_epochs=10)

#: Longest wait of automatic refinement for a run's stop document to reach Tiled, in seconds: the
#: archive writer and the live callback are separate subscribers and either may be first.
RUN_ARRIVAL_TIMEOUT_S = 120.0


def seed_object(preview: StitchedImage, coverage_fraction: float = SEED_COVERAGE_FRACTION) -> np.ndarray:
    """pty-chi's initial object from a stitched preview: ``amplitude * exp(i phase)`` where covered, 1 elsewhere.

    Parameters
    ----------
    preview : StitchedImage
        The PtychoNN image (H, W) on its grid; the refinement must run on the same grid.
    coverage_fraction : float
        Pixels with ``weight >= coverage_fraction * max(weight)`` take the preview's value.

    Returns
    -------
    (H, W) complex64
        The starting object on ``preview.grid``.

    Raises
    ------
    ConfigurationError
        Arrays of different shapes or not of the grid's shape, a weight that is not finite or
        never positive, a non-finite value inside the covered region, or a fraction outside (0, 1].
    """
    if not 0 < coverage_fraction <= 1:
        raise ConfigurationError(f"coverage fraction must be in (0, 1], got {coverage_fraction!r}")
    shapes = {key: np.shape(getattr(preview, key)) for key in ("amplitude", "phase", "weight")}
    if any(shape != tuple(preview.grid.shape) for shape in shapes.values()):
        raise ConfigurationError(f"preview arrays {shapes} must all have the grid's shape {preview.grid.shape}")
    weight = np.asarray(preview.weight)
    if not np.all(np.isfinite(weight)) or not weight.max() > 0:
        raise ConfigurationError("preview weight must be finite with a positive maximum (did any frame land?)")
    covered = preview.covered(coverage_fraction)
    amplitude, phase = np.asarray(preview.amplitude)[covered], np.asarray(preview.phase)[covered]
    if not (np.all(np.isfinite(amplitude)) and np.all(np.isfinite(phase))):
        raise ConfigurationError("preview holds NaN or infinite amplitude or phase inside its covered region")
    obj = np.ones(preview.grid.shape, np.complex64)
    obj[covered] = amplitude * np.exp(1j * phase)
    return obj
