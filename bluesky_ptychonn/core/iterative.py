"""Options and results of the iterative reference reconstruction (pty-chi ePIE or LSQML).

The options are validated here, apart from the engine: :mod:`~bluesky_ptychonn.core.ptychi_engine`
runs pty-chi with them. Nothing here imports torch or pty-chi.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from .config import Frozen
from .geometry import ObjectGrid
from .stitching import StitchedImage

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "LSQML_STEP_SIZE",
    "EpochMonitor",
    "IterativeOptions",
    "IterativeResult",
    "StopReason",
    "converged",
    "epie_step_size",
]

#: Per-engine default batch sizes: those of pty-chi's own ePIE and LSQML tests.
DEFAULT_BATCH_SIZE: dict[str, int] = {"epie": 100, "lsqml": 96}

#: LSQML's step size scales its own line-searched step, so 1 is the natural default.
LSQML_STEP_SIZE = 1.0


class IterativeOptions(Frozen):
    """How to run the iterative engine; validated once, frozen."""

    engine: Literal["epie", "lsqml"] = Field(
        "epie", description="pty-chi engine: 'epie' (batched ePIE) or 'lsqml' (least-squares maximum likelihood)."
    )
    epochs: int = Field(100, ge=1, description="Passes over all frames: the most that run (see stop_tolerance).")
    stop_tolerance: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "Stop early once the data-fit error fell by less than this fraction over the last stop_window "
            "epochs (a rise counts as no decrease); None runs all epochs."
        ),
    )
    stop_window: int = Field(10, ge=1, description="Epochs over which the stopping rule measures the decrease.")
    min_epochs: int = Field(
        10, ge=1, description="Never stop on the tolerance before this many epochs (nor before stop_window + 1)."
    )
    batch_size: int | None = Field(
        None, ge=1, description="Frames per update; None takes the engine's default (ePIE 100, LSQML 96)."
    )
    object_step_size: float | None = Field(
        None,
        gt=0,
        description=(
            "Step size of the object (and probe) update. None: for LSQML 1; for ePIE the inverse of the expected "
            "overlap within one batch (see :func:`epie_step_size`), which keeps batched ePIE stable."
        ),
    )
    refine_probe: bool = Field(
        False,
        description=(
            "Also update the probe (with the object's step size). False trusts the given probe; pty-chi's "
            "object-probe rescaling is then switched off so the object keeps its absolute transmission."
        ),
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where to compute: 'auto' (CUDA when torch sees a GPU, else the CPU), 'cpu' or 'cuda[:n]'.",
    )
    seed: int | None = Field(
        0,
        description=(
            "Seed of torch's and numpy's global generators while pty-chi runs, so results repeat; the caller's "
            "generator states are restored afterwards. None leaves the generators as they stand."
        ),
    )


#: Why the epochs ended: the stopping rule, the epoch limit, or the caller's monitor.
StopReason = Literal["tolerance", "max_epochs", "monitor"]

#: Called after each epoch with (epoch counted from 1, its data-fit error, a function returning the
#: current (H, W) complex64 object); returning True stops the reconstruction. The object is copied
#: off the device only when the function is called, so a monitor that does not look costs nothing.
EpochMonitor = Callable[[int, float, Callable[[], np.ndarray]], bool]


def converged(errors: Sequence[float], options: IterativeOptions) -> bool:
    """Whether the stopping rule of ``options`` holds after the epochs whose errors are ``errors``.

    The rule compares the last error with the one ``stop_window`` epochs earlier, so a noisy
    error (LSQML's minibatches) does not stop the run on one lucky epoch; a relative decrease
    below ``stop_tolerance`` (or a rise) means more epochs no longer pay.
    """
    if options.stop_tolerance is None:
        return False
    if len(errors) < max(options.min_epochs, options.stop_window + 1):
        return False
    before, last = errors[-1 - options.stop_window], errors[-1]
    if not np.isfinite(last):  # diverged: more epochs will not bring it back
        return True
    return bool(before > 0 and (before - last) / before < options.stop_tolerance)


@dataclass
class IterativeResult:
    """An iterative reconstruction on an object grid.

    Attributes
    ----------
    obj : (H, W) complex64
        Transmission function; pixel ``(i, j)`` is at ``grid.origin_m + (i, j) * grid.pixel_size_m``.
    probe : (n, n) complex64
        Probe in the convention of :mod:`~bluesky_ptychonn.sim.physics` (flux divided out); the
        input probe unless ``refine_probe`` was set.
    illumination : (H, W) float32
        Sum of the given probe's intensity over all positions, in units of its peak intensity: how
        many probe windows overlap at each pixel, and the weight of :meth:`as_image`.
    grid : ObjectGrid
    frames : int
        Number of frames used.
    engine : str
        ``"epie"`` or ``"lsqml"``.
    epochs : int
        Epochs actually run (at most ``options.epochs``).
    step_size : float
        The step size used (the resolved default when none was given).
    error_per_epoch : list of float
        pty-chi's data-fit error after each epoch: the mean squared difference between modelled
        and measured amplitudes (square roots of counts) per detector pixel, averaged over the
        epoch's minibatches. Poisson noise alone leaves about 0.25 where counts are high.
    seconds : float
        Wall-clock time of the epochs, without the set-up or the time spent in a monitor.
    device : str
        The torch device that ran them, e.g. ``"cpu"`` or ``"cuda:0"``.
    stopped_by : {"tolerance", "max_epochs", "monitor"}
        Why the epochs ended (:data:`StopReason`).
    """

    obj: np.ndarray
    probe: np.ndarray
    illumination: np.ndarray
    grid: ObjectGrid
    frames: int
    engine: str
    epochs: int
    step_size: float
    error_per_epoch: list[float]
    seconds: float
    device: str
    stopped_by: StopReason = "max_epochs"

    @property
    def amplitude(self) -> np.ndarray:
        """(H, W) float32 amplitude of :attr:`obj`."""
        return np.abs(self.obj).astype(np.float32)

    @property
    def phase(self) -> np.ndarray:
        """(H, W) float32 phase of :attr:`obj` in radians, wrapped into [-pi, pi]."""
        return np.angle(self.obj).astype(np.float32)

    def as_image(self) -> StitchedImage:
        """The result as a :class:`~bluesky_ptychonn.core.stitching.StitchedImage` whose weight is the illumination.

        So it fits wherever a stitched network image does, e.g.
        :func:`~bluesky_ptychonn.core.reconstruct.evaluate`, with ``covered()`` selecting the well-lit region.
        """
        return StitchedImage(
            amplitude=self.amplitude,
            phase=self.phase,
            weight=self.illumination,
            grid=self.grid,
            frames=self.frames,
        )


def epie_step_size(peak_overlap: float, batch_size: int, n_frames: int) -> float:
    """Default ePIE step: the inverse of the probe overlap that one batch is expected to pile on a pixel.

    pty-chi's ePIE adds the updates of all frames of a batch, each weighted by
    ``conj(P) / max|P|^2``, so the step that converges shrinks with the overlap inside a batch (in
    our runs, ``step x`` summed ``|P|^2 / max|P|^2`` of a batch's windows above about 2, the
    gradient-descent bound, diverged). At the most illuminated pixel the whole scan piles
    ``peak_overlap`` (the maximum of :attr:`IterativeResult.illumination`); one batch brings the
    pixel's own window plus its share, ``batch_size / n_frames``, of the others. So sequential
    ePIE (batch 1) gets the classic step 1, and a batch holding the whole scan gets ``1 / peak_overlap``.
    """
    share = min(1.0, batch_size / n_frames)
    return 1.0 / max(1.0, 1.0 + (peak_overlap - 1.0) * share)
